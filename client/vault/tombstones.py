"""Tombstones: people forgotten at this vault, whom `put` refuses until the operator re-enrols them.

A tombstone is `HMAC(vault key, person id)`, never the id, kept in `VAULT/requests.sqlite` beside the
forget requests (client/forget/requests.py lays it in the same transaction that opens the request, so a
crash cannot leave a request without its tombstone). It lives in the vault package because the
vault's own `put` consults it: the guard must hold for every way in, not only the CLI.
"""

from __future__ import annotations

import hmac
import sqlite3
import unicodedata
from pathlib import Path

from facefed.client.vault.errors import InvalidConfig
from facefed.common import sqlite
from facefed.common.durable import immediate

REQUESTS_NAME = "requests.sqlite"
VAULT_KEY_NAME = "key"  # the vault's 32-byte secret (client/vault/vault.py)
_ID_HASH_LABEL = b"facefed/forget/person-id/1\x00"  # domain separation from the share tags
TOMBSTONES_SCHEMA = """
CREATE TABLE IF NOT EXISTS tombstones (
    id_hash   TEXT PRIMARY KEY,
    request_id TEXT NOT NULL,
    created   REAL NOT NULL
);
"""


def vault_key(vault_dir: Path) -> bytes:
    path = Path(vault_dir) / VAULT_KEY_NAME
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        raise InvalidConfig(
            f"{path} is missing: {vault_dir} is not a vault (or its key was lost; restore it from the vault backup)"
        ) from None
    if len(key) != 32:
        raise InvalidConfig(f"{path} is damaged ({len(key)} bytes, expected 32); restore it from the vault backup")
    return key


def id_hash(key: bytes, person_id: str) -> str:
    """Keyed hash of a person id: matches the same id again, reveals nothing without the vault key.
    The id is taken in Unicode NFC, so every spelling of "José" (composed or not) is one person."""
    return _raw_hash(key, unicodedata.normalize("NFC", person_id))


def _raw_hash(key: bytes, person_id: str) -> str:
    return hmac.new(key, _ID_HASH_LABEL + person_id.encode("utf-8"), "sha256").hexdigest()


def _connect(vault_dir: Path, *, readonly: bool) -> sqlite3.Connection | None:
    path = Path(vault_dir) / REQUESTS_NAME
    if not path.is_file():
        return None
    # requests.sqlite is client/forget/requests.py's file: the same rollback journal and secure_delete.
    db = sqlite.connect(path, journal="DELETE", secure_delete=True, mode="ro" if readonly else "rw")
    if not db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='tombstones'").fetchone():
        db.close()
        return None
    return db


def tombstoned(vault_dir: str | Path, person_ids: list[str]) -> list[str]:
    """The ids among `person_ids` that were forgotten at this vault; free when no one ever was."""
    if not person_ids:
        return []
    db = _connect(Path(vault_dir), readonly=True)
    if db is None:
        return []
    try:
        key = vault_key(Path(vault_dir))
        # the NFC hash, and the id as typed (tombstones laid before ids were normalised)
        hashes = {h: p for p in dict.fromkeys(person_ids) for h in (id_hash(key, p), _raw_hash(key, p))}
        found = {
            r[0]
            for r in db.execute(
                f"SELECT id_hash FROM tombstones WHERE id_hash IN ({','.join('?' * len(hashes))})", list(hashes)
            )
        }
    finally:
        db.close()
    return list(dict.fromkeys(p for h, p in hashes.items() if h in found))


def lift_tombstones(vault_dir: str | Path, person_ids: list[str]) -> int:
    """Remove the tombstones of people the operator enrolled again (with their new consent)."""
    db = _connect(Path(vault_dir), readonly=False)
    if db is None:
        return 0
    try:
        key = vault_key(Path(vault_dir))
        with immediate(db):
            return sum(
                db.execute(
                    "DELETE FROM tombstones WHERE id_hash IN (?, ?)", (id_hash(key, p), _raw_hash(key, p))
                ).rowcount
                for p in dict.fromkeys(person_ids)
            )
    finally:
        db.close()
