"""Writers that die (SIGKILL) or are still running when another process opens the vault."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from vault_support import fresh_jpeg, header_fields, load_faces, make_stores, share_files

from facefed.client.vault import Vault

REPO = Path(__file__).resolve().parents[1]

# Runs in a child process: open the vault and put one image, with a hook between "all shares
# durable" and "manifest row committed" (the window an orphan sweep must get right).
CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    from facefed.client.vault import Vault
    from facefed.client.vault.manifest import Manifest
    vault_dir, image, mode, flag_dir = sys.argv[1:5]
    original = Manifest.commit_images
    def hook(self, images):
        Path(flag_dir, "ready").touch()
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        while not Path(flag_dir, "go").exists():
            time.sleep(0.02)
        return original(self, images)
    Manifest.commit_images = hook
    with Vault.open(vault_dir) as v:
        v.put("Child_Person", Path(image).read_bytes(), source_name="child.jpg")
""")


@pytest.fixture(scope="module")
def faces(lfw):
    return load_faces(lfw, 12)


def start_child(tmp_path: Path, image: bytes, mode: str) -> subprocess.Popen:
    (tmp_path / "child.jpg").write_bytes(image)
    (tmp_path / "flags").mkdir(exist_ok=True)
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD,
            str(tmp_path / "vault"),
            str(tmp_path / "child.jpg"),
            mode,
            str(tmp_path / "flags"),
        ],
        cwd=REPO,
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None and not path.exists():
            raise AssertionError(f"child exited with {proc.returncode} before {path.name}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.02)


def pending_writes(vault_dir: Path) -> int:
    with sqlite3.connect(vault_dir / "manifest.sqlite") as db:
        return db.execute("SELECT COUNT(*) FROM pending_writes").fetchone()[0]


def test_writer_killed_after_writing_shares_leaves_no_orphans(tmp_path, faces):
    stores = make_stores(tmp_path, 3)
    person, imgs = next(iter(faces.items()))
    with Vault.create(tmp_path / "vault", stores, 2) as vault:
        kept = dict(zip(vault.put_many([(person, d, n) for n, d in imgs]), (d for _, d in imgs)))
    child = start_child(tmp_path, fresh_jpeg(imgs[0][1]), "kill")
    try:
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
    assert (tmp_path / "flags" / "ready").exists()
    assert all(len(share_files(s)) == len(kept) + 1 for s in stores)  # its shares were durable, then it died
    assert pending_writes(tmp_path / "vault") == 3
    with Vault.open(tmp_path / "vault") as vault:
        assert all(len(share_files(s)) == len(kept) for s in stores)  # swept at open
        assert pending_writes(tmp_path / "vault") == 0
        assert "Child_Person" not in [p.person_id for p in vault.people()]
        report = vault.verify()
        assert report.ok and report.images == len(kept)
        assert all(vault.get(i) == d for i, d in kept.items())
    assert [p.name for p in (tmp_path / "vault" / "locks").iterdir()] == ["writer.lock"]  # one, reused


def test_open_does_not_sweep_a_live_writers_shares(tmp_path, faces):
    stores = make_stores(tmp_path, 3)
    person, imgs = next(iter(faces.items()))
    Vault.create(tmp_path / "vault", stores, 2).close()
    child = start_child(tmp_path, imgs[0][1], "wait")
    try:
        wait_for(tmp_path / "flags" / "ready", child)
        assert all(len(share_files(s)) == 1 for s in stores)
        with Vault.open(tmp_path / "vault") as vault:  # sweeps, but the writer is alive
            assert all(len(share_files(s)) == 1 for s in stores)
            assert not vault.verify().orphans
        (tmp_path / "flags" / "go").touch()
        assert child.wait(timeout=60) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    with Vault.open(tmp_path / "vault") as vault:
        (iid,) = vault.image_ids("Child_Person")
        assert vault.get(iid) == imgs[0][1] and vault.verify().ok


# The real `vault import` command in a child process (its module only: test_cli_vault runs the console script).
IMPORT_CHILD = "import sys; from facefed.client.cli.vault import app; app(sys.argv[1:])"


@pytest.mark.slow
def test_import_killed_with_sigkill_reopens_clean_and_resumes(tmp_path, lfw_file):
    stores = make_stores(tmp_path, 3)
    Vault.create(tmp_path / "vault", stores, 2).close()
    args = [
        sys.executable,
        "-c",
        IMPORT_CHILD,
        "import",
        "--vault",
        str(tmp_path / "vault"),
        "--lfw",
        str(lfw_file),
        "--site-index",
        "1",
        "--num-sites",
        "3",
        "--max-people",
        "100",
    ]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(os.listdir(stores[0])) < 40:  # some batches committed, one probably in flight
            assert proc.poll() is None, "import finished before it could be killed"
            assert time.monotonic() < deadline, "import made no progress"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with Vault.open(tmp_path / "vault") as vault:
        report = vault.verify()
        assert report.ok, report  # every row's shares present and valid, no orphans, nothing pending
        assert report.images > 0
        referenced = {i for _, i, _ in vault.iter_images()}
        for s in stores:
            assert {header_fields(f.read_bytes())["image_id"] for f in share_files(s)} == referenced
        partial = report.images
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"({partial} already in the vault)" in done.stdout
    with Vault.open(tmp_path / "vault") as vault:
        total = sum(p.n_images for p in vault.people())
        assert len(vault.people()) == 100 and total > partial and vault.verify().ok
        assert len(vault.sources()) == total  # resumed without duplicates
