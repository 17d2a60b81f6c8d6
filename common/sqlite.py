"""Opening facefed's SQLite databases: one place for the connection settings and schema versions.

Every database is opened in autocommit mode (transactions are explicit, `durable.immediate`), with
`synchronous=FULL` (a commit that returned survives power loss) and a 30 s busy timeout. The schema
version lives in `PRAGMA user_version`; a file from a newer facefed is refused instead of misread.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Literal

from facefed.common.errors import FacefedError

Journal = Literal["WAL", "DELETE"]


class SchemaError(FacefedError):
    """A database whose schema this facefed cannot use (newer, or not what the file claims)."""


def connect(
    path: str | Path,
    *,
    journal: Journal = "WAL",
    secure_delete: bool = False,
    foreign_keys: bool = False,
    rows: bool = False,
    threads: bool = False,
    mode: Literal["rwc", "rw", "ro"] = "rwc",
) -> sqlite3.Connection:
    """Open `path` with facefed's settings.

    journal: WAL for logs read while written (ledger, holder index); DELETE where deleted rows must not
    linger in a -wal file (secure_delete overwrites freed pages; WAL would keep old copies).
    rows: sqlite3.Row results; threads: allow use from several threads (the caller serialises).
    mode: rwc creates the file; rw/ro refuse a missing one (sqlite3.OperationalError).
    """
    db = sqlite3.connect(
        f"file:{Path(path)}?mode={mode}", uri=True, timeout=30.0, isolation_level=None, check_same_thread=not threads
    )
    try:
        if rows:
            db.row_factory = sqlite3.Row
        if mode != "ro":
            db.execute(f"PRAGMA journal_mode={journal}")
            db.execute("PRAGMA synchronous=FULL")
        if secure_delete:
            db.execute("PRAGMA secure_delete=ON")
        if foreign_keys:
            db.execute("PRAGMA foreign_keys=ON")
    except BaseException:
        db.close()
        raise
    return db


def user_version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def check_version(db: sqlite3.Connection, version: int, *, what: str, path: str | Path) -> int:
    """The file's schema version; a fresh file (0) is stamped with `version`; a newer one is refused."""
    found = user_version(db)
    if found == 0:
        db.execute(f"PRAGMA user_version={int(version)}")
        return version
    if found > version:
        raise SchemaError(f"{path} has {what} schema {found}, newer than this facefed's ({version}); upgrade facefed")
    return found
