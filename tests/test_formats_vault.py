"""Known-answer tests of the vault's and the holder's on-disk and wire formats.

Each literal below is the format as shipped; a test that fails here means a format changed, which
must be a decision (a version bump and a migration), never a side effect of a refactor."""

from __future__ import annotations

import sqlite3

from facefed.client.holder import proto
from facefed.client.holder.disk import ShareDir
from facefed.client.holder.proto.shares import MAX_SHARE_BYTES
from facefed.client.vault.config import VaultConfig
from facefed.client.vault.manifest import Manifest
from facefed.client.vault.sharefile import (
    HEADER,
    LEN_PREFIX,
    MAX_IMAGE_BYTES,
    OVERHEAD,
    ShareHeader,
    ShareKeys,
    bucket,
    seal,
    unseal,
)

# seal(ShareKeys(bytes(range(32))), x=2 k=2 n=3, share id 11.., image id 22.., owner of pseudonym 33..,
# padded 8, share 0102030405, padding aabbcc):
#   "FFVS" | version 1 | x k n | share id | image id | owner | padded (u32 BE) | share | padding | HMAC tag
SHARE_FILE = bytes.fromhex(
    "46465653"
    "01"
    "020203"
    "11111111111111111111111111111111"
    "22222222222222222222222222222222"
    "0fac52b5ea4d4dd697971ffab01fbf33"
    "00000008"
    "0102030405"
    "aabbcc"
    "ff6fac0f9e5b6dc469f16f7a58a1e89d80cbe35551167f9ef46dfab97e46cd59"
)
KEYS = ShareKeys(bytes(range(32)))

# A store's identity record (client/vault/identity.py) for x=2 of 3, vault key bytes(range(32)).
STORE_VAULT_ID = "524cef9b70c445e4bdd057bacc74ae28"
STORE_IDENTITY = (
    b'{"facefed_store": 1, "n": 3, "tag": "6872341f78b8881b107b935de196da38d07405c82ca2367cc8c4409a32f20103", '
    b'"vault": "524cef9b70c445e4bdd057bacc74ae28", "x": 2}\n'
)


def test_share_file_bytes_are_fixed():
    header = ShareHeader(2, 2, 3, "11" * 16, "22" * 16, KEYS.owner("33" * 16), 8)
    assert seal(KEYS, header, b"\x01\x02\x03\x04\x05", b"\xaa\xbb\xcc") == SHARE_FILE
    parsed, payload = unseal(KEYS, SHARE_FILE)
    assert parsed == header and bytes(payload) == b"\x01\x02\x03\x04\x05\xaa\xbb\xcc"
    assert (HEADER.size, OVERHEAD, LEN_PREFIX.format) == (60, 92, ">I")


def test_share_file_field_changes_are_caught():
    for at in (0, 4, 5, 8, 9, 25, 41, 60, 64, len(SHARE_FILE) - 1):  # magic, version, x, ids, owner, len, data, tag
        bad = bytearray(SHARE_FILE)
        bad[at] ^= 1
        try:
            unseal(KEYS, bytes(bad))
        except ValueError:
            continue
        raise AssertionError(f"a flipped byte at {at} went unnoticed")


def test_padding_buckets_and_holder_limit():
    assert [bucket(n) for n in (1, 4096, 4097, 8192, 8193, 16385)] == [4096, 4096, 8192, 8192, 16384, 32768]
    assert MAX_IMAGE_BYTES == 32 * 1024 * 1024
    assert MAX_SHARE_BYTES == bucket(MAX_IMAGE_BYTES + LEN_PREFIX.size) + OVERHEAD == 67108956


MANIFEST_TABLES = {
    "meta": ["key", "value"],
    "people": ["person_id", "pseudonym", "created"],
    "images": ["image_id", "pseudonym", "size", "padded", "source_name", "created", "content_hash"],
    "shares": ["image_id", "x", "share_id"],
    "pending_writes": ["x", "share_id", "writer"],
    "pending_deletions": ["x", "share_id", "image_id", "request_id", "pseudonym", "created"],
}


def _tables(db: sqlite3.Connection) -> dict[str, list[str]]:
    names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
    return {t: [r[1] for r in db.execute(f"PRAGMA table_info({t})")] for t in names}


def test_manifest_schema(tmp_path):
    m = Manifest.create(tmp_path / "manifest.sqlite")
    m.close()
    db = sqlite3.connect(tmp_path / "manifest.sqlite")
    assert _tables(db) == MANIFEST_TABLES
    indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index' AND sql IS NOT NULL")}
    assert indexes == {"images_by_person", "images_by_content"}
    assert db.execute("SELECT key, value FROM meta").fetchall() == [("schema", "2")]
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert db.execute("PRAGMA user_version").fetchone()[0] == 0


# Schema 1 as shipped before keyed image hashes: opened and migrated in place.
MANIFEST_SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE people (person_id TEXT PRIMARY KEY, pseudonym TEXT NOT NULL UNIQUE, created REAL NOT NULL);
CREATE TABLE images (image_id TEXT PRIMARY KEY, pseudonym TEXT NOT NULL REFERENCES people(pseudonym),
    size INTEGER NOT NULL, padded INTEGER NOT NULL, source_name TEXT, created REAL NOT NULL);
CREATE INDEX images_by_person ON images(pseudonym);
CREATE TABLE shares (image_id TEXT NOT NULL REFERENCES images(image_id), x INTEGER NOT NULL,
    share_id TEXT NOT NULL, PRIMARY KEY (image_id, x), UNIQUE (x, share_id));
CREATE TABLE pending_writes (x INTEGER NOT NULL, share_id TEXT NOT NULL, writer TEXT NOT NULL,
    PRIMARY KEY (x, share_id));
CREATE TABLE pending_deletions (x INTEGER NOT NULL, share_id TEXT NOT NULL, image_id TEXT NOT NULL,
    request_id TEXT NOT NULL, pseudonym TEXT NOT NULL, created REAL NOT NULL, PRIMARY KEY (x, share_id));
INSERT INTO meta VALUES ('schema', '1');
INSERT INTO people VALUES ('Ann', 'p1', 0);
INSERT INTO images VALUES ('i1', 'p1', 10, 4096, 'a.jpg', 0);
"""


def test_manifest_schema_1_is_migrated(tmp_path):
    db = sqlite3.connect(tmp_path / "manifest.sqlite")
    db.executescript(MANIFEST_SCHEMA_1)
    db.close()
    Manifest(tmp_path / "manifest.sqlite").close()
    db = sqlite3.connect(tmp_path / "manifest.sqlite")
    assert _tables(db) == MANIFEST_TABLES
    assert db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == ("2",)
    assert db.execute("SELECT image_id, content_hash FROM images").fetchall() == [("i1", None)]


def test_store_identity_record_is_fixed():
    from facefed.client.vault.identity import make_record, parse_record, vault_id

    vid = vault_id(bytes(range(32)))
    assert vid == STORE_VAULT_ID
    assert make_record(KEYS, vid, 2, 3) == STORE_IDENTITY
    assert parse_record(KEYS, vid, STORE_IDENTITY).x == 2


def test_manifest_connection_settings(tmp_path):
    m = Manifest.create(tmp_path / "manifest.sqlite")
    try:
        with m.read() as db:
            settings = [
                db.execute(f"PRAGMA {p}").fetchone()[0] for p in ("secure_delete", "foreign_keys", "synchronous")
            ]
        assert settings == [1, 1, 2]  # on, on, FULL
    finally:
        m.close()


def test_holder_index_schema_and_layout(tmp_path):
    share_dir = ShareDir(tmp_path)
    share_dir.put("ab" + "0" * 30, b"share bytes")
    share_dir.close()
    assert (tmp_path / "shares" / "ab" / ("ab" + "0" * 30)).read_bytes() == b"share bytes"
    db = sqlite3.connect(tmp_path / "index.sqlite")
    assert _tables(db) == {"meta": ["key", "value"], "shares": ["id", "size", "pending"]}
    assert db.execute("SELECT key, value FROM meta").fetchall() == [("format", "facefed-holder-1")]
    assert db.execute("SELECT id, size, pending FROM shares").fetchall() == [("ab" + "0" * 30, 11, 0)]
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_holder_proto_names():
    assert proto.SERVICE_NAME == "facefed.holder.v1.ShareHolder"
    assert proto.METHODS == {
        "Put": ("PutRequest", "PutReply"),
        "PutMany": ("PutManyRequest", "PutReply"),
        "Get": ("GetRequest", "GetReply"),
        "GetMany": ("GetManyRequest", "GetManyReply"),
        "Delete": ("DeleteRequest", "DeleteReply"),
        "List": ("ListRequest", "ListReply"),
        "Stat": ("StatRequest", "StatReply"),
    }
    assert proto.method_path("GetMany") == "/facefed.holder.v1.ShareHolder/GetMany"
    fields = {m.name: [(f.name, f.number) for f in m.field] for m in proto.file_descriptor().message_type}
    assert fields["FoundShare"] == [("share_id", 1), ("found", 2), ("data", 3)]
    assert fields["StatReply"] == [("shares", 1), ("bytes", 2), ("writable", 3), ("max_share_bytes", 4)]
    assert fields["ListRequest"] == [("after", 1), ("limit", 2)]


def test_vault_toml_keys():
    assert list(VaultConfig.model_fields) == ["format_version", "threshold", "stores", "tls_dir"]
    text = VaultConfig(threshold=2, stores=["/a", "grpcs://h:1"], tls_dir="/t").to_toml()
    assert text == (
        "# facefed vault. Stores are listed in x-coordinate order (first = x 1); do not reorder them.\n"
        "format_version = 1\n"
        "threshold = 2\n"
        'stores = ["/a", "grpcs://h:1"]\n'
        'tls_dir = "/t"\n'
    )
