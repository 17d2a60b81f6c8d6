"""Bad input gets a clear error and loses nothing; lost stores and corrupt shares are survived and repaired."""

from __future__ import annotations

import io
import logging
import shutil
import sqlite3
from contextlib import nullcontext
from pathlib import Path

import pytest
from PIL import Image
from vault_support import fresh_jpeg, header_fields, load_faces, make_stores, offline, read_only, share_files

from facefed.client.vault import (
    InvalidConfig,
    InvalidImage,
    InvalidPersonId,
    NotEnoughShares,
    StoreError,
    UnknownPerson,
    Vault,
)
from facefed.client.vault.sharefile import HEADER


@pytest.fixture(scope="module")
def faces(lfw):
    return load_faces(lfw, 12)


def fill(vault: Vault, faces) -> dict[str, bytes]:
    items = [(person, data, name) for person, imgs in faces.items() for name, data in imgs]
    return dict(zip(vault.put_many(items), (data for _, data, _ in items)))


def snapshot(tmp_path: Path) -> dict[str, object]:
    """Every file under the test directory (stores, key, config, audit log) and the manifest's rows,
    to prove a failure changed nothing. (The manifest file's bytes change on any transaction.)"""
    files: dict[str, object] = {
        str(p.relative_to(tmp_path)): p.read_bytes()
        for p in sorted(tmp_path.rglob("*"))
        if p.is_file() and "locks" not in p.parts and p.name != "manifest.sqlite"
    }
    with sqlite3.connect(tmp_path / "vault" / "manifest.sqlite") as db:
        for table in ("people", "images", "shares", "pending_writes", "pending_deletions"):
            files[table] = sorted(db.execute(f"SELECT * FROM {table}").fetchall())
    return files


def share_of(vault: Vault, image_id: str, x: int) -> Path:
    for f in share_files(vault.stores[x - 1].url):
        fields = header_fields(f.read_bytes())
        if fields["image_id"] == image_id:
            return f
    raise AssertionError(f"no share x={x} of {image_id}")


@pytest.fixture
def vault(tmp_path, faces):
    v = Vault.create(tmp_path / "vault", make_stores(tmp_path, 3), 2)
    v.stored = fill(v, faces)  # type: ignore[attr-defined]
    yield v
    v.close()


# -- parameters and stores --------------------------------------------------------------------------
@pytest.mark.parametrize("n,k,msg", [(3, 4, "need 1 <= k <= n"), (3, 0, "need 1 <= k <= n"), (256, 2, "at most 255")])
def test_bad_threshold_or_store_count(tmp_path, n, k, msg):
    with pytest.raises(InvalidConfig, match=msg):
        Vault.create(tmp_path / "vault", [str(tmp_path / f"s{i}") for i in range(n)], k)
    assert not (tmp_path / "vault").exists()


def test_missing_store_is_named(tmp_path):
    stores = make_stores(tmp_path, 2) + [str(tmp_path / "not-mounted")]
    with pytest.raises(StoreError, match="not-mounted.*does not exist"):
        Vault.create(tmp_path / "vault", stores, 2)
    assert not (tmp_path / "vault").exists()


def test_read_only_store_is_named_at_init(tmp_path):
    stores = make_stores(tmp_path, 3)
    with read_only(Path(stores[1])), pytest.raises(StoreError, match=f"{stores[1]} is read-only"):
        Vault.create(tmp_path / "vault", stores, 2)
    assert not (tmp_path / "vault").exists()


def test_same_store_twice_is_refused(tmp_path):
    stores = make_stores(tmp_path, 2)
    with pytest.raises(InvalidConfig, match="same place"):
        Vault.create(tmp_path / "vault", [stores[0], stores[1], stores[0] + "/."], 2)


def test_read_only_store_at_put_keeps_nothing(tmp_path, vault, faces):
    before = snapshot(tmp_path)
    person, imgs = next(iter(faces.items()))
    with (
        read_only(Path(vault.stores[2].url)),
        pytest.raises(StoreError, match=f"{vault.stores[2].url} is read-only"),
    ):
        vault.put_many(
            [(person, fresh_jpeg(data), None) for _, data in imgs] + [("New_Person", fresh_jpeg(imgs[0][1], 1), None)]
        )
    assert snapshot(tmp_path) == before  # no share files, no manifest change
    assert "New_Person" not in [p.person_id for p in vault.people()]
    assert vault.verify().ok


def test_missing_store_at_put_keeps_nothing(tmp_path, vault, faces):
    person, imgs = next(iter(faces.items()))
    n_before = vault.person(person).n_images
    with (
        offline(vault.stores[0].url),
        pytest.raises(StoreError, match=f"{vault.stores[0].url}: directory is missing"),
    ):
        vault.put(person, fresh_jpeg(imgs[0][1]))
    assert vault.person(person).n_images == n_before
    assert vault.verify().ok


# -- bad images and ids ----------------------------------------------------------------------------
def test_bad_images_are_refused_and_nothing_is_written(tmp_path, vault, faces):
    person, imgs = next(iter(faces.items()))
    jpeg = imgs[0][1]
    before = snapshot(tmp_path)
    gif = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(gif, "GIF")
    tiny = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).resize((8, 8)).save(tiny, "JPEG")
    cases = {
        "text file": (b"this is not an image\n", "not a JPEG or PNG"),
        "truncated JPEG": (jpeg[: len(jpeg) // 2], "not a decodable"),
        "empty": (b"", "empty"),
        "GIF": (gif.getvalue(), "only JPEG and PNG"),
        "8x8 pixels": (tiny.getvalue(), "not a sane face image size"),
    }
    for name, (data, msg) in cases.items():
        with pytest.raises(InvalidImage, match=msg):
            vault.put_many([(person, jpeg, "good.jpg"), (person, data, name)])  # a good one first: not kept
    for bad_id in ["", "tab\there", " padded ", "x" * 129, "bell\x07"]:
        with pytest.raises(InvalidPersonId):
            vault.put(bad_id, jpeg)
    assert snapshot(tmp_path) == before


def test_png_is_accepted_and_kept_byte_identical(vault, faces):
    person, imgs = next(iter(faces.items()))
    png = io.BytesIO()
    Image.open(io.BytesIO(imgs[0][1])).save(png, "PNG")
    iid = vault.put(person, png.getvalue(), source_name="face.png")
    assert vault.get(iid) == png.getvalue()


def test_unknown_person(vault):
    for call in (vault.person, vault.image_ids, vault.erase):
        with pytest.raises(UnknownPerson, match="unknown person 'Nobody'"):
            call("Nobody")


# -- lost stores and corrupt shares -----------------------------------------------------------------
def test_lost_store_recovered_by_get_and_fixed_by_repair(vault):
    stored = vault.stored
    lost = Path(vault.stores[1].url)
    shutil.rmtree(lost)  # the disk died; the operator mounts a blank one in its place
    lost.mkdir()
    assert all(vault.get(i) == d for i, d in stored.items())
    report = vault.verify()
    assert len(report.missing) == len(stored) and not report.ok
    assert {p.x for p in report.missing} == {2}
    repaired = vault.repair()
    assert len(repaired.regenerated) == len(stored) and repaired.ok
    assert vault.verify().ok
    # The regenerated shares are real: rebuild everything without store 1.
    with offline(vault.stores[0].url):
        assert dict((i, d) for _, i, d in vault.iter_images()) == stored


def test_unmounted_store_is_reported_and_reads_still_work(vault):
    with offline(vault.stores[2].url):
        assert all(vault.get(i) == d for i, d in vault.stored.items())
        report = vault.verify()
        assert not report.ok and not report.stores[2].reachable and "directory is missing" in report.stores[2].error
        assert len(report.unreachable) == len(vault.stored)
        repaired = vault.repair()
        assert not repaired.ok and len(repaired.not_repaired) == len(vault.stored)
    assert vault.verify().ok  # back again: nothing was lost


def test_corrupt_share_detected_skipped_reported_and_repaired(vault, caplog):
    stored = vault.stored
    iid, data = next(iter(stored.items()))
    f = share_of(vault, iid, 1)
    blob = bytearray(f.read_bytes())
    blob[HEADER.size + 100] ^= 0x01  # one flipped bit in the payload
    f.write_bytes(bytes(blob))
    with caplog.at_level(logging.WARNING, logger="facefed.vault"):
        assert vault.get(iid) == data
    assert any(iid in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)
    report = vault.verify()
    assert [(p.image_id, p.x, p.problem) for p in report.corrupt] == [(iid, 1, "corrupt")]
    assert "tag does not verify" in report.corrupt[0].detail
    assert len(vault.repair().regenerated) == 1
    assert vault.verify().ok and vault.get(iid) == data


def test_share_moved_to_another_image_is_rejected(vault):
    a, b = list(vault.stored)[:2]
    fa, fb = share_of(vault, a, 2), share_of(vault, b, 2)
    shutil.copy(fa, fb)  # a valid share of image a under image b's share id
    report = vault.verify()
    assert [(p.image_id, p.problem) for p in report.corrupt] == [(b, "corrupt")]
    assert "moved or renamed" in report.corrupt[0].detail
    assert vault.get(b) == vault.stored[b]
    assert vault.repair().ok and vault.verify().ok


def test_fewer_than_k_valid_shares_names_image_person_and_counts(vault, faces):
    person = next(iter(faces))
    iid = vault.image_ids(person)[0]
    share_of(vault, iid, 1).unlink()
    f = share_of(vault, iid, 3)
    blob = f.read_bytes()
    f.write_bytes(blob[:-1] + bytes([blob[-1] ^ 0x80]))  # break its tag
    with pytest.raises(NotEnoughShares, match=rf"image {iid} of person {person}: 1 of 2 required shares valid"):
        vault.get(iid)
    report = vault.verify()
    assert [p.image_id for p in report.unrecoverable] == [iid]
    repaired = vault.repair()
    assert [p.image_id for p in repaired.unrecoverable] == [iid] and not repaired.ok
    others = [i for i in vault.stored if i != iid]
    assert all(vault.get(i) == vault.stored[i] for i in others)  # nothing else affected


# -- erasing while a store is away --------------------------------------------------------------------
@pytest.mark.parametrize("down,unrecoverable", [(1, True), (2, False)])
def test_erase_with_unreachable_stores_destroys_what_it_can_and_finishes_later(
    tmp_path, vault, faces, down, unrecoverable
):
    person = next(iter(faces))
    images = set(vault.image_ids(person))
    away = [vault.stores[i].url for i in range(3 - down, 3)]
    with offline(away[0]), offline(away[1]) if down == 2 else nullcontext():
        report = vault.erase(person)
        assert report.shares_destroyed == (3 - down) * len(images)
        assert report.shares_pending == down * len(images) and not report.complete
        assert report.unreachable_stores == sorted(away)
        assert report.unrecoverable is unrecoverable  # n-k+1 = 2 shares gone per image makes it so
        assert vault.verify().pending_deletions == down * len(images)
    vault.close()
    with Vault.open(tmp_path / "vault") as reopened:  # stores back: open finishes the deletions
        assert reopened.verify().ok
        entries = reopened.audit_entries()
    assert entries[-1]["event"] == "erase_resumed" and entries[-1]["shares_pending"] == 0
    assert entries[-1]["shares_destroyed"] == down * len(images)
    for s in away:
        assert not any(header_fields(f.read_bytes())["image_id"] in images for f in share_files(s))


def test_missing_or_damaged_manifest_refuses_to_open_and_keeps_the_shares(tmp_path, vault):
    vault.close()
    manifest = tmp_path / "vault" / "manifest.sqlite"
    before = {s: share_files(s) for s in (tmp_path / f"store{i}" for i in (1, 2, 3))}
    manifest.rename(tmp_path / "manifest.bak")
    with pytest.raises(InvalidConfig, match="manifest.sqlite is missing; restore it"):
        Vault.open(tmp_path / "vault")
    manifest.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(InvalidConfig, match="not a readable vault manifest"):
        Vault.open(tmp_path / "vault")
    assert {s: share_files(s) for s in before} == before  # nothing swept as "orphan"
    (tmp_path / "manifest.bak").replace(manifest)
    with Vault.open(tmp_path / "vault") as reopened:
        assert reopened.verify().ok
