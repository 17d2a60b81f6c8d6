"""Issue 12: nothing lost and nothing resurrected under races, crashes and operator mistakes.

Each test is one case of the issue, on real LFW faces, real share files and real processes
(SIGKILLed by their PID); each failed before the fix."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import unicodedata
from pathlib import Path

import pytest
from vault_support import fresh_jpeg, header_fields, load_faces, make_stores, offline, share_files

from facefed.client.forget.erase import run_forget, settle
from facefed.client.forget.requests import RequestLog
from facefed.client.holder.proto.shares import check_share_id
from facefed.client.vault import InvalidConfig, InvalidImage, Vault, VaultError
from facefed.client.vault.config import load_config, write_config
from facefed.client.vault.errors import DuplicateImage, StoreError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def faces(lfw):
    return load_faces(lfw, 12)


def all_shares(stores) -> dict[str, list[tuple[str, bytes]]]:
    return {str(s): [(f.name, f.read_bytes()) for f in share_files(s)] for s in stores}


def owner_files(stores, vault: Vault, pseudonym: str) -> list[Path]:
    owner = vault._core.keys.owner(pseudonym)
    return [f for s in stores for f in share_files(s) if header_fields(f.read_bytes())["owner"] == owner]


def run_child(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"child exited with {proc.returncode} before {path.name}"
        assert time.monotonic() < deadline, f"timed out waiting for {path}"
        time.sleep(0.02)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


# A put whose batch is written but not yet committed when it pauses (the window of the race).
PAUSED_PUT = """
    import sys, time
    from pathlib import Path
    from facefed.client.vault import Vault
    from facefed.client.vault.manifest import Manifest
    vault_dir, person, flags, *images = sys.argv[1:]
    original = Manifest.commit_images
    def hook(self, plans):
        Path(flags, "ready").touch()
        while not Path(flags, "go").exists():
            time.sleep(0.02)
        return original(self, plans)
    Manifest.commit_images = hook
    with Vault.open(vault_dir) as v:
        try:
            v.put_many([(person, Path(i).read_bytes(), Path(i).name) for i in images])
        except Exception as e:
            print("refused:", e)
"""


# -- forget during import -----------------------------------------------------------------------------
def test_forget_during_an_import_batch_does_not_bring_the_person_back(tmp_path, faces):
    stores = make_stores(tmp_path, 3)
    person = "Ahmed_Chalabi"
    imgs = faces[person]
    with Vault.create(tmp_path / "vault", stores, 2) as v:
        v.put_many([(person, d, n) for n, d in imgs[:2]])
    files = []
    for name, data in imgs[2:]:
        (tmp_path / name).write_bytes(data)
        files.append(str(tmp_path / name))
    (tmp_path / "flags").mkdir()
    child = run_child(PAUSED_PUT, str(tmp_path / "vault"), person, str(tmp_path / "flags"), *files)
    try:
        wait_for(tmp_path / "flags" / "ready", child)  # the batch is written, its commit is next
        result: dict[str, object] = {}
        forget = threading.Thread(target=lambda: result.update(o=run_forget(tmp_path / "vault", None, person)))
        forget.start()
        time.sleep(0.5)  # forget has laid its tombstone and now waits for the batch's writer lock
        (tmp_path / "flags" / "go").touch()
        assert child.wait(timeout=60) == 0
        forget.join(timeout=60)
    finally:
        stop(child)
    outcome = result["o"]
    assert outcome.request.stage == "data_erased"  # type: ignore[attr-defined]
    with Vault.open(tmp_path / "vault") as v:
        assert person not in [p.person_id for p in v.people()]
        assert owner_files(stores, v, outcome.request.pseudonym) == []  # type: ignore[attr-defined]
        assert v.verify().ok
        # the next import batch of that person is refused by the tombstone
        with pytest.raises(VaultError, match="asked to be forgotten"):
            v.put(person, fresh_jpeg(imgs[0][1]))


def test_erase_waits_for_a_batch_in_another_thread(tmp_path, faces):
    """The same race with threads of one process: an erase issued while a batch is written (and not
    yet committed) takes effect after the commit, so it erases that batch too."""
    stores = make_stores(tmp_path, 3)
    person, imgs = "Ahmed_Chalabi", faces["Ahmed_Chalabi"]
    with Vault.create(tmp_path / "vault", stores, 2) as v:
        v.put(person, imgs[0][1])
        writer = Vault.open(tmp_path / "vault")
        written, go = threading.Event(), threading.Event()
        commit = writer._core.manifest.commit_images

        def paused_commit(plans):
            written.set()
            go.wait(30)
            return commit(plans)

        writer._core.manifest.commit_images = paused_commit  # type: ignore[method-assign]
        try:
            t = threading.Thread(target=lambda: writer.put_many([(person, d, n) for n, d in imgs[1:]]))
            t.start()
            assert written.wait(30)
            reports = []
            eraser = threading.Thread(target=lambda: reports.append(v.erase(person)))
            eraser.start()
            time.sleep(0.3)
            go.set()
            t.join(30)
            eraser.join(30)
        finally:
            writer.close()
        assert person not in [p.person_id for p in v.people()]
        assert reports[0].images == len(imgs)
        assert all(share_files(s) == [] for s in stores) and v.verify().ok


# -- swapped and foreign stores ------------------------------------------------------------------------
def test_swapped_store_directories_lose_nothing_and_remap_puts_them_back(tmp_path, faces):
    stores = make_stores(tmp_path, 3)
    with Vault.create(tmp_path / "vault", stores, 2) as v:
        stored = dict(zip(v.put_many([(p, d, n) for p, im in list(faces.items())[:3] for n, d in im]), ()))
        ids = v.put_many([("Extra_Person", fresh_jpeg(faces["Ahmed_Chalabi"][0][1]), "x.jpg")])
        stored = {i: v.get(i) for _, i, _ in v.iter_images()}
    before = all_shares(stores)
    a, b = Path(stores[0]), Path(stores[1])
    a.rename(tmp_path / "tmp"), b.rename(a), (tmp_path / "tmp").rename(b)  # mount points after a reboot
    swapped = {str(a): before[str(b)], str(b): before[str(a)], stores[2]: before[stores[2]]}
    with Vault.open(tmp_path / "vault") as v:
        assert len(v.people()) == 4  # `vault ls` works
        report = v.verify()
        assert not report.ok and len(report.misplaced_stores) == 2
        assert "holds the shares of x=2" in report.misplaced_stores[0] and "vault remap" in report.misplaced_stores[0]
        with pytest.raises(StoreError, match="holds the shares of x="):
            v.put("New_Person", fresh_jpeg(faces["Ahmed_Chalabi"][1][1]))  # nothing written into a swapped store
        v.repair()
        assert v.remap() == [(1, str(b)), (2, str(a)), (3, stores[2])]
    assert all_shares(stores) == {k: swapped[k] for k in all_shares(stores)}  # nothing deleted
    with Vault.open(tmp_path / "vault") as v:
        v.remap(apply=True)
    with Vault.open(tmp_path / "vault") as v:
        assert v.verify().ok and {i: v.get(i) for i in stored} == stored and ids[0] in stored


def test_reordered_vault_toml_loses_nothing(tmp_path, faces):
    stores = make_stores(tmp_path, 3)
    with Vault.create(tmp_path / "vault", stores, 2) as v:
        v.put_many([(p, d, n) for p, im in list(faces.items())[:3] for n, d in im])
    before = all_shares(stores)
    config = load_config(tmp_path / "vault")
    write_config(tmp_path / "vault", config.model_copy(update={"stores": list(reversed(config.stores))}))
    with Vault.open(tmp_path / "vault") as v:
        v.people()
        report = v.verify()
        assert len(report.unrecoverable) == report.images  # only x=2 sits in place: k=2 not met, but...
        assert len(report.misplaced_stores) == 2
        v.repair()
    assert all_shares(stores) == before  # ...nothing is deleted
    with Vault.open(tmp_path / "vault") as v:
        v.remap(apply=True)
    with Vault.open(tmp_path / "vault") as v:
        assert v.verify().ok


def test_two_vaults_cannot_share_stores_and_a_foreign_store_is_left_alone(tmp_path, faces):
    stores = make_stores(tmp_path, 3)
    Vault.create(tmp_path / "v1", stores, 2).close()  # nothing imported yet
    with pytest.raises(InvalidConfig, match="already belongs to a vault"):
        Vault.create(tmp_path / "v2", stores, 2)
    other = make_stores(tmp_path / "other", 3)
    with Vault.create(tmp_path / "v2", other, 2) as v2:
        v2.put_many([(p, d, n) for p, im in list(faces.items())[:2] for n, d in im])
    with Vault.create(tmp_path / "v3", make_stores(tmp_path / "third", 3), 2) as v3:
        v3.put("Ahmed_Chalabi", faces["Ahmed_Chalabi"][0][1])
    # v3's config now points at v2's second store (a foreign disk mounted in its place)
    config = load_config(tmp_path / "v3")
    write_config(tmp_path / "v3", config.model_copy(update={"stores": [config.stores[0], other[1], config.stores[2]]}))
    before = all_shares(other)
    with Vault.open(tmp_path / "v3") as v3:
        report = v3.verify()
        assert any("belongs to another vault" in m for m in report.misplaced_stores)
        v3.repair()
        assert v3.get(v3.image_ids("Ahmed_Chalabi")[0]) == faces["Ahmed_Chalabi"][0][1]
    assert all_shares(other) == before


# -- the manifest --------------------------------------------------------------------------------------
def test_empty_manifest_refuses_to_open_and_deletes_nothing(tmp_path, faces):
    stores = make_stores(tmp_path, 3)
    with Vault.create(tmp_path / "vault", stores, 2) as v:
        v.put_many([(p, d, n) for p, im in list(faces.items())[:3] for n, d in im])
    before = all_shares(stores)
    manifest = tmp_path / "vault" / "manifest.sqlite"
    manifest.write_bytes(b"")  # `: > manifest.sqlite`
    with pytest.raises(InvalidConfig, match=r"is empty .*manifest.sqlite.bak"):
        Vault.open(tmp_path / "vault")
    assert manifest.stat().st_size == 0 and all_shares(stores) == before
    # an empty database (valid SQLite, no tables) is refused too
    manifest.unlink()
    with sqlite3.connect(manifest) as db:
        db.execute("PRAGMA user_version=1")  # a valid SQLite file without tables
    with pytest.raises(InvalidConfig, match="no tables"):
        Vault.open(tmp_path / "vault")
    manifest.unlink()
    with pytest.raises(InvalidConfig, match="missing"):
        Vault.open(tmp_path / "vault")
    assert not manifest.exists() and all_shares(stores) == before
    # the backup written after the last change brings it all back
    shutil.copy(tmp_path / "vault" / "manifest.sqlite.bak", manifest)
    with Vault.open(tmp_path / "vault") as v:
        assert v.verify().ok and len(v.people()) == 3


def test_corrupt_manifest_page_is_one_clear_error(tmp_path, faces):
    stores = make_stores(tmp_path, 3)
    with Vault.create(tmp_path / "vault", stores, 2) as v:
        v.put_many([(p, d, n) for p, im in list(faces.items())[:6] for n, d in im])
    manifest = tmp_path / "vault" / "manifest.sqlite"
    raw = bytearray(manifest.read_bytes())
    page = 4096
    assert len(raw) > 4 * page
    raw[-2 * page : -page] = os.urandom(page)  # garbage in a data page near the end (opening alone passed)
    manifest.write_bytes(bytes(raw))
    before = all_shares(stores)
    with pytest.raises(InvalidConfig, match="damaged|not a readable") as e:
        Vault.open(tmp_path / "vault")
    assert "\n" not in str(e.value) and "restore" in str(e.value).lower()
    assert all_shares(stores) == before
    for command in ("ls", "verify", "repair"):
        cli = subprocess.run(
            [sys.executable, "-m", "facefed.client.cli.main", "vault", command, "--vault", str(tmp_path / "vault")],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert cli.returncode == 2 and "Traceback" not in cli.stderr, (command, cli.stderr[-2000:])
        assert len(cli.stderr.strip().splitlines()) == 1
    assert all_shares(stores) == before


# -- a forget killed while destroying shares ------------------------------------------------------------
KILLED_FORGET = """
    import os, signal, sys
    from facefed.client.forget.erase import run_forget
    from facefed.client.vault.stores.local import LocalDirStore
    vault_dir, person = sys.argv[1:3]
    original, count = LocalDirStore.delete, [0]
    def delete(self, share_id):
        count[0] += 1
        if count[0] == 4:
            os.kill(os.getpid(), signal.SIGKILL)  # killed while destroying shares
        return original(self, share_id)
    LocalDirStore.delete = delete
    run_forget(vault_dir, None, person)
"""


def test_forget_killed_while_destroying_shares_finishes_on_rerun(tmp_path, faces):
    stores = make_stores(tmp_path, 3)
    person = "Ahmed_Chalabi"
    with Vault.create(tmp_path / "vault", stores, 2) as v:
        v.put_many([(p, d, n) for p, im in list(faces.items())[:3] for n, d in im])
        v.put_many([(person, d, n) for n, d in faces[person]])
        pseudonym = v.person(person).pseudonym
        n = len(faces[person])
    child = run_child(KILLED_FORGET, str(tmp_path / "vault"), person)
    try:
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        stop(child)
    outcome = run_forget(tmp_path / "vault", None, person)  # the rerun finishes the job
    req = outcome.request
    assert req.stage == "data_erased" and req.pseudonym == pseudonym
    assert req.shares_pending == 0 and req.shares_destroyed == 3 * n
    with Vault.open(tmp_path / "vault") as v:
        assert owner_files(stores, v, pseudonym) == [] and v.verify().ok
    assert settle(tmp_path / "vault") == []  # the site's answer to the server's query works


def test_forget_status_stops_counting_deletions_that_finished(tmp_path, faces):
    stores = make_stores(tmp_path, 3)
    person = "Ahmed_Chalabi"
    with Vault.create(tmp_path / "vault", stores, 2) as v:
        v.put_many([(person, d, n) for n, d in faces[person]])
    with offline(stores[2]):
        req = run_forget(tmp_path / "vault", None, person).request
        assert req.shares_pending == len(faces[person])
    settle(tmp_path / "vault")  # the store is back: the open finished the deletions
    with RequestLog(tmp_path / "vault") as log:
        req = log.get(req.request_id)
    assert req.shares_pending == 0 and req.shares_destroyed == 3 * len(faces[person])


# -- concurrent imports --------------------------------------------------------------------------------
IMPORTER = """
    import sys
    from pathlib import Path
    from facefed.client.vault import Vault
    vault_dir, listing = sys.argv[1:3]
    items = [line.split("\\t") for line in Path(listing).read_text().splitlines()]
    with Vault.open(vault_dir) as v:
        for start in range(0, len(items), 8):
            batch = [(p, Path(f).read_bytes(), Path(f).name) for p, f in items[start : start + 8]]
            v.add_images(batch)
"""


def test_two_concurrent_imports_store_each_image_once(tmp_path, faces):
    stores = make_stores(tmp_path, 3)
    Vault.create(tmp_path / "vault", stores, 2).close()
    lines = []
    for person, imgs in faces.items():
        for name, data in imgs:
            (tmp_path / name).write_bytes(data)
            lines.append(f"{person}\t{tmp_path / name}")
    (tmp_path / "list.tsv").write_text("\n".join(lines))
    procs = [run_child(IMPORTER, str(tmp_path / "vault"), str(tmp_path / "list.tsv")) for _ in range(2)]
    try:
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
    finally:
        for p in procs:
            stop(p)
    with Vault.open(tmp_path / "vault") as v:
        assert sum(p.n_images for p in v.people()) == len(lines)
        assert all(len(share_files(s)) == len(lines) for s in stores)
        assert v.verify().ok


# -- smaller cases -------------------------------------------------------------------------------------
def test_share_id_with_a_trailing_newline_is_refused():
    check_share_id("ab" * 16)
    with pytest.raises(ValueError, match="invalid share id"):
        check_share_id("ab" * 16 + "\n")


def test_nfd_spelling_of_a_forgotten_person_is_refused(tmp_path, faces):
    stores = make_stores(tmp_path, 3)
    nfc = unicodedata.normalize("NFC", "José_Núñez")
    nfd = unicodedata.normalize("NFD", nfc)
    assert nfc != nfd
    imgs = faces["Ahmed_Chalabi"]
    with Vault.create(tmp_path / "vault", stores, 2) as v:
        v.put(nfc, imgs[0][1])
    run_forget(tmp_path / "vault", None, nfc)
    with Vault.open(tmp_path / "vault") as v:
        with pytest.raises(VaultError, match="asked to be forgotten"):
            v.put(nfd, imgs[1][1])
        assert v.people() == []


def _eoi_inside_scan(jpeg: bytes) -> bytes:
    sos = jpeg.find(b"\xff\xda")
    mid = sos + (len(jpeg) - sos) // 2
    return jpeg[:mid] + b"\xff\xd9" + jpeg[mid:]


def test_corrupt_jpeg_and_duplicates_are_caught_at_put(tmp_path, faces):
    stores = make_stores(tmp_path, 3)
    a, b = "Ahmed_Chalabi", "Aaron_Eckhart"
    (name, data), (name2, data2) = faces[a][:2]
    with Vault.create(tmp_path / "vault", stores, 2) as v:
        with pytest.raises(InvalidImage, match="end-of-image marker inside the scan"):
            v.put(a, _eoi_inside_scan(data), source_name=name)
        first = v.put(a, data, source_name=name)
        assert v.put(a, data, source_name="again.jpg") == first  # same bytes, same person: skipped
        assert v.person(a).n_images == 1
        with pytest.raises(DuplicateImage, match=f"already stored for person '{a}'.*refused for person '{b}'"):
            v.put(b, data)
        outcomes = v.add_images([(a, data2, name2), (a, data2, "copy.jpg"), (b, data, "b.jpg"), (b, b"junk", "j")])
        assert [o.status for o in outcomes] == ["stored", "duplicate", "refused", "refused"]
        assert a in outcomes[2].detail and b in outcomes[2].detail
        assert v.person(a).n_images == 2 and b not in [p.person_id for p in v.people()]
        assert all(len(share_files(s)) == 2 for s in stores)


def test_repair_does_not_claim_success_with_a_broken_audit_chain(tmp_path, faces):
    stores = make_stores(tmp_path, 3)
    with Vault.create(tmp_path / "vault", stores, 2) as v:
        v.put_many([(p, d, n) for p, im in list(faces.items())[:2] for n, d in im])
        v.erase(list(faces)[0])
    log = tmp_path / "vault" / "audit.log"
    lines = log.read_bytes().splitlines(keepends=True)
    entry = json.loads(lines[0])
    entry["k"] = 1
    log.write_bytes(json.dumps(entry, sort_keys=True, separators=(",", ":")).encode() + b"\n" + b"".join(lines[1:]))
    with Vault.open(tmp_path / "vault") as v:
        rep = v.repair()
        assert not rep.ok and "chain broken" in (rep.audit_error or "")


WRITER_KILLED = """
    import os, signal, sys
    from pathlib import Path
    from facefed.client.vault import Vault
    from facefed.client.vault.manifest import Manifest
    def die(self, plans):
        os.kill(os.getpid(), signal.SIGKILL)
    Manifest.commit_images = die
    with Vault.open(sys.argv[1]) as v:
        v.put("Killed_Writer", Path(sys.argv[2]).read_bytes())
"""


def test_killed_writers_leave_no_lock_files_or_shares(tmp_path, faces):
    stores = make_stores(tmp_path, 3)
    Vault.create(tmp_path / "vault", stores, 2).close()
    for i in range(3):
        img = tmp_path / f"{i}.jpg"
        img.write_bytes(fresh_jpeg(faces["Ahmed_Chalabi"][0][1], i))
        child = run_child(WRITER_KILLED, str(tmp_path / "vault"), str(img))
        try:
            assert child.wait(timeout=60) == -signal.SIGKILL
        finally:
            stop(child)
    assert [p.name for p in (tmp_path / "vault" / "locks").iterdir()] == ["writer.lock"]
    with Vault.open(tmp_path / "vault") as v:
        assert v.verify().ok and all(share_files(s) == [] for s in stores)


def test_a_failed_add_against_a_down_store_does_not_speak_of_deletions(tmp_path, faces, caplog):
    stores = make_stores(tmp_path, 3)
    with (
        Vault.create(tmp_path / "vault", stores, 2) as v,
        offline(stores[1]),
        caplog.at_level(logging.WARNING, logger="facefed.vault"),
        pytest.raises(StoreError),
    ):
        v.put("Ahmed_Chalabi", faces["Ahmed_Chalabi"][0][1])
    assert "deletion left pending" not in caplog.text
    with Vault.open(tmp_path / "vault") as v:
        assert v.verify().ok and all(share_files(s) == [] for s in stores)


# -- the CLIs: one line, documented exit codes --------------------------------------------------------
def client_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "facefed.client.cli.main", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def one_line_error(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    return lines[0]


def test_import_reports_bad_files_by_full_path_and_goes_on(tmp_path, faces):
    tree = tmp_path / "lfw"
    people = [(p, im) for p, im in faces.items() if len(im) >= 3][:2]
    for person, imgs in people:
        (tree / person).mkdir(parents=True)
        for name, data in imgs[:3]:
            (tree / person / name).write_bytes(data)
    bad = tree / people[0][0] / people[0][1][1][0]
    bad.write_bytes(_eoi_inside_scan(bad.read_bytes()))
    dup = tree / people[1][0] / f"{people[1][0]}_0004.jpg"
    dup.write_bytes(people[1][1][0][1])  # the same image twice under two names
    stores = make_stores(tmp_path, 3)
    Vault.create(tmp_path / "vault", stores, 2).close()
    proc = client_cli("vault", "import", "--vault", str(tmp_path / "vault"), "--lfw", str(tree), "--people", "all")
    assert proc.returncode == 1, proc.stderr
    assert str(bad) in proc.stdout + proc.stderr and "end-of-image marker inside the scan" in proc.stdout
    assert "duplicate images skipped: 1" in proc.stdout and "1 file(s) were not imported" in proc.stdout
    with Vault.open(tmp_path / "vault") as v:
        assert sum(p.n_images for p in v.people()) == 5 and v.verify().ok


def test_cli_repair_fails_on_a_broken_audit_chain_and_verify_names_a_swapped_store(tmp_path, faces):
    stores = make_stores(tmp_path, 3)
    with Vault.create(tmp_path / "vault", stores, 2) as v:
        v.put_many([(p, d, n) for p, im in list(faces.items())[:2] for n, d in im])
    log = tmp_path / "vault" / "audit.log"
    log.write_bytes(log.read_bytes().replace(b'"k":2', b'"k":1'))
    proc = client_cli("vault", "repair", "--vault", str(tmp_path / "vault"))
    assert proc.returncode == 1 and "vault repaired" not in proc.stdout and "audit log" in proc.stdout
    a, b = Path(stores[0]), Path(stores[2])
    a.rename(tmp_path / "tmp"), b.rename(a), (tmp_path / "tmp").rename(b)
    proc = client_cli("vault", "verify", "--vault", str(tmp_path / "vault"))
    assert proc.returncode == 1 and f"{a} (x=1 in vault.toml) holds the shares of x=3" in proc.stdout
    proc = client_cli("vault", "remap", "--vault", str(tmp_path / "vault"), "--yes")
    assert proc.returncode == 0, proc.stderr
    with Vault.open(tmp_path / "vault") as v:
        assert not v.verify().misplaced_stores


def test_holder_with_a_corrupt_index_is_one_line(tmp_path):
    from facefed.client.holder.disk import ShareDir

    d = ShareDir(tmp_path / "h" if (tmp_path / "h").mkdir() is None else tmp_path)
    for i in range(200):
        d.put(f"{i:032x}", os.urandom(64))
    d.close()
    index = tmp_path / "h" / "index.sqlite"
    raw = bytearray(index.read_bytes())
    raw[4096 : 2 * 4096] = os.urandom(4096)
    index.write_bytes(bytes(raw))
    certs = client_cli("store", "certs", "--out", str(tmp_path / "tls"), "--hosts", "127.0.0.1")
    assert certs.returncode == 0, certs.stderr
    proc = client_cli(
        "store", "serve", "--dir", str(tmp_path / "h"), "--listen", "127.0.0.1:0", "--tls-dir", str(tmp_path / "tls")
    )
    assert "holder index" in one_line_error(proc) and "damaged" in proc.stderr


def test_store_certs_out_an_existing_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    assert "is a file" in one_line_error(client_cli("store", "certs", "--out", str(tmp_path / "file"), "--hosts", "h1"))
    one_line_error(client_cli("store", "certs", "--out", str(tmp_path / "file" / "sub"), "--hosts", "h1"))


def test_start_refuses_a_directory_that_is_not_a_vault_with_exit_2(tmp_path):
    (tmp_path / "notavault").mkdir()
    proc = client_cli(
        "start", "--site", "site-a", "--vault", str(tmp_path / "notavault"), "--server", "127.0.0.1:1", "--insecure"
    )
    assert "is not a vault" in one_line_error(proc, 2)
    proc = client_cli("start", "--site", "site-a", "--vault", str(tmp_path / "notavault"), "--server", "nope")
    one_line_error(proc, 2)
    assert not (tmp_path / "notavault" / "site").exists()


def server_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "facefed.server.cli.main", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("command", [["status"], ["requests"], ["sites", "ls"]])
def test_server_read_commands_refuse_a_directory_that_is_not_a_server_state(tmp_path, command):
    (tmp_path / "typo").mkdir()
    proc = server_cli(*command, "--state", str(tmp_path / "typo"))
    assert "not a facefed server state directory" in one_line_error(proc)
    assert list((tmp_path / "typo").iterdir()) == []  # no ledger created in it


def test_server_start_with_a_bad_tls_dir_creates_nothing_and_certs_out_a_file_is_one_line(tmp_path):
    (tmp_path / "bad").mkdir()
    proc = server_cli("start", "--state", str(tmp_path / "st"), "--tls-dir", str(tmp_path / "bad"))
    assert "lacks" in one_line_error(proc) and not (tmp_path / "st").exists()
    (tmp_path / "file").write_text("x")
    assert "is a file" in one_line_error(server_cli("certs", "--out", str(tmp_path / "file")))
    one_line_error(server_cli("certs", "--out", str(tmp_path / "file" / "sub")))
