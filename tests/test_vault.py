"""The vault on real LFW faces and real directories: round trips, thresholds, erase, audit, orphans."""

from __future__ import annotations

import itertools
import json
import secrets
import shutil
from pathlib import Path

import pytest
from vault_support import header_fields, load_faces, make_stores, offline, share_files

from facefed.client.vault import (
    AuditChainBroken,
    UnknownImage,
    UnknownPerson,
    Vault,
    VerifyReport,
    open_store,
    verify_audit_chain,
)
from facefed.client.vault.sharefile import MIN_BUCKET, OVERHEAD, ShareKeys
from facefed.client.vault.stores.local import LocalDirStore


@pytest.fixture(scope="module")
def faces(lfw):
    return load_faces(lfw, 12)


def fill(vault: Vault, faces) -> dict[str, bytes]:
    """Put every face; image id -> original bytes."""
    items = [(person, data, name) for person, imgs in faces.items() for name, data in imgs]
    ids = vault.put_many(items)
    return {iid: data for iid, (_, data, _) in zip(ids, items)}


@pytest.mark.parametrize("k,n", [(2, 3), (3, 5)])
def test_round_trip_of_real_lfw_images_is_byte_identical(tmp_path, faces, k, n):
    stores = make_stores(tmp_path, n)
    with Vault.create(tmp_path / "vault", stores, k) as vault:
        stored = fill(vault, faces)
        for iid, data in stored.items():
            assert vault.get(iid) == data
        streamed = list(vault.iter_images())
        assert {iid: data for _, iid, data in streamed} == stored
        assert [p.person_id for p in vault.people()] == sorted(faces)
        assert {p.person_id: p.n_images for p in vault.people()} == {p: len(i) for p, i in faces.items()}
        assert (vault.k, vault.n) == (k, n)
    with Vault.open(tmp_path / "vault") as vault:  # and after reopening
        one = next(iter(stored))
        assert vault.get(one) == stored[one]
    # Each store holds one share per image, padded to a power-of-two bucket, and no plain image bytes.
    chunks = [data[len(data) // 2 : len(data) // 2 + 48] for data in stored.values()]
    for store in stores:
        files = share_files(store)
        assert len(files) == len(stored)
        for f in files:
            blob = f.read_bytes()
            payload = len(blob) - OVERHEAD
            assert payload >= MIN_BUCKET and payload & (payload - 1) == 0
            assert not any(c in blob for c in chunks)
    everything = b"".join(p.read_bytes() for p in (tmp_path / "vault").rglob("*") if p.is_file())
    assert not any(c in everything for c in chunks)  # nor anywhere in the vault directory


def test_share_sizes_do_not_reveal_image_sizes(tmp_path, faces):
    with Vault.create(tmp_path / "vault", make_stores(tmp_path, 3), 2) as vault:
        stored = fill(vault, faces)
    sizes = {len(d) for d in stored.values()}
    share_sizes = {f.stat().st_size for f in share_files(tmp_path / "store1")}
    assert len(sizes) == len(stored) and len(share_sizes) <= 3  # every file size differs; shares: a few buckets


def test_any_k_stores_suffice(tmp_path, faces):
    stores = make_stores(tmp_path, 5)
    with Vault.create(tmp_path / "vault", stores, 3) as vault:
        stored = fill(vault, {p: faces[p] for p in list(faces)[:4]})
    for keep in itertools.combinations(range(5), 3):
        away = [stores[i] for i in range(5) if i not in keep]
        with offline(away[0]), offline(away[1]), Vault.open(tmp_path / "vault") as vault:
            assert dict((iid, data) for _, iid, data in vault.iter_images(list(stored))) == stored


def test_iter_images_subset_order_and_unknown_ids(tmp_path, faces):
    with Vault.create(tmp_path / "vault", make_stores(tmp_path, 3), 2) as vault:
        stored = fill(vault, faces)
        ids = list(stored)[::-1][:7]
        assert [iid for _, iid, _ in vault.iter_images(ids)] == ids
        person = next(iter(faces))
        assert vault.image_ids(person) and all(p == person for p, _, _ in vault.iter_images(vault.image_ids(person)))
        with pytest.raises(UnknownImage):
            list(vault.iter_images([ids[0], "0" * 32]))
        with pytest.raises(UnknownImage):
            vault.get("f" * 32)


def test_erase_leaves_nothing_of_the_person_and_the_audit_chain_verifies(tmp_path, faces):
    stores = make_stores(tmp_path, 3)
    vault_dir = tmp_path / "vault"
    people = sorted(faces, key=lambda p: -len(faces[p]))
    # A person whose name is not part of anyone else's, so a byte scan for it is meaningful.
    victim = next(p for p in people if not any(p in q for q in faces if q != p))
    with Vault.create(vault_dir, stores, 2) as vault:
        fill(vault, faces)
        pseudonym = vault.person(victim).pseudonym
        victim_images = set(vault.image_ids(victim))
        victim_shares = {
            f.name for s in stores for f in share_files(s) if header_fields(f.read_bytes())["image_id"] in victim_images
        }
        assert len(victim_shares) == 3 * len(victim_images) > 0
        report = vault.erase(victim, request_id="ticket-42")
        assert report.complete and report.unrecoverable
        assert (report.images, report.shares_destroyed, report.pseudonym) == (
            len(victim_images),
            len(victim_shares),
            pseudonym,
        )
        with pytest.raises(UnknownPerson, match=victim):
            vault.person(victim)
        assert victim not in [p.person_id for p in vault.people()]
        assert vault.verify().ok
    # Scan every store: no share of theirs by id, by image id in the header, or by owner tag.
    owner = ShareKeys((vault_dir / "key").read_bytes()).owner(pseudonym)
    for s in stores:
        for f in Path(s).iterdir():
            assert f.name not in victim_shares
            fields = header_fields(f.read_bytes())
            assert fields["image_id"] not in victim_images and fields["owner"] != owner
    # The manifest file no longer contains their id, pseudonym or file names (secure_delete), nor a journal.
    raw = (vault_dir / "manifest.sqlite").read_bytes()
    assert victim.encode() not in raw and pseudonym.encode() not in raw
    assert not list(vault_dir.glob("manifest.sqlite-*"))
    # The audit log records the request under the pseudonym only, and its chain verifies.
    log = (vault_dir / "audit.log").read_text()
    assert victim not in log
    entries = [json.loads(line) for line in log.splitlines()]
    assert entries[-1]["event"] == "erase" and entries[-1]["request_id"] == "ticket-42"
    assert entries[-1]["pseudonym"] == pseudonym and entries[-1]["shares_destroyed"] == len(victim_shares)
    assert verify_audit_chain(vault_dir / "audit.log").entries == len(entries)


def test_audit_chain_detects_edits_and_truncation(tmp_path, faces):
    vault_dir = tmp_path / "vault"
    with Vault.create(vault_dir, make_stores(tmp_path, 3), 2) as vault:
        fill(vault, {p: faces[p] for p in list(faces)[:3]})
        for p in list(faces)[:3]:
            vault.erase(p)
    log = vault_dir / "audit.log"
    original = log.read_bytes()
    lines = original.splitlines(keepends=True)
    assert len(lines) == 4
    edited = lines[1].replace(b'"images":', b'"images":1')  # change one entry's content
    log.write_bytes(b"".join([lines[0], edited, *lines[2:]]))
    with pytest.raises(AuditChainBroken, match="line 3"):
        verify_audit_chain(log)
    log.write_bytes(b"".join([lines[0], lines[2], lines[1], lines[3]]))  # reorder
    with pytest.raises(AuditChainBroken):
        verify_audit_chain(log)
    log.write_bytes(b"".join(lines[:-1]))  # drop the last entry: only the manifest's head notices
    verify_audit_chain(log)
    with Vault.open(vault_dir) as vault:
        report = vault.verify()
        assert not report.ok and "removed at the end" in report.audit_error
    log.write_bytes(original)
    with Vault.open(vault_dir) as vault:
        assert vault.verify().ok


def test_orphans_are_reported_never_swept_at_open_repair_removes_only_provable_copies(tmp_path, faces):
    stores = make_stores(tmp_path, 3)
    with Vault.create(tmp_path / "vault", stores, 2) as vault:
        stored = fill(vault, {p: faces[p] for p in list(faces)[:3]})
        ours = Path(stores[0]) / secrets.token_hex(16)  # a copy of a referenced share under another name
        shutil.copy(share_files(stores[0])[0], ours)
        foreign = Path(stores[1]) / secrets.token_hex(16)  # not ours: e.g. another vault's file
        foreign.write_bytes(b"FFVS" + secrets.token_bytes(200))
        report = vault.verify()
        assert {(o.share_id, o.ours) for o in report.orphans} == {(ours.name, True), (foreign.name, False)}
        assert not report.ok
    with Vault.open(tmp_path / "vault") as vault:  # absence from the manifest alone never deletes
        assert ours.exists() and foreign.exists()
        rep = vault.repair()  # the copy's header names a referenced share: provably redundant
        assert rep.orphans_removed == 1 and [o.share_id for o in rep.foreign_orphans] == [foreign.name]
        assert not ours.exists() and foreign.exists()
        assert [o.share_id for o in vault.verify().orphans] == [foreign.name]
        assert all(vault.get(i) == d for i, d in stored.items())


def test_verify_report_is_clean_for_a_fresh_vault(tmp_path, faces):
    with Vault.create(tmp_path / "vault", make_stores(tmp_path, 3), 2) as vault:
        fill(vault, {p: faces[p] for p in list(faces)[:2]})
        report = vault.verify()
    assert isinstance(report, VerifyReport) and report.ok
    assert report.shares_ok == 3 * report.images and report.audit_entries == 1


def test_open_store_urls(tmp_path):
    assert isinstance(open_store(str(tmp_path)), LocalDirStore)
    assert open_store(f"file://{tmp_path}").url == str(tmp_path)
    with pytest.raises(ValueError, match="unsupported scheme"):
        open_store("http://example.org/store")
    store = LocalDirStore(tmp_path)
    with pytest.raises(ValueError, match="invalid share id"):
        store.put("../../etc/passwd", b"x")
    store.put("ab" * 16, b"share")
    assert list(store.list()) == ["ab" * 16] and store.get("ab" * 16) == b"share"
    assert store.delete("ab" * 16) and not store.delete("ab" * 16)
    assert not list(tmp_path.iterdir())  # no temp or probe files left behind
