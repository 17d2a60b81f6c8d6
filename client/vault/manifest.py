"""The vault manifest (SQLite): who is who, which shares make which image, and unfinished work.

Tables
    people            operator's person id -> random pseudonym (the only place the id appears)
    images            image id -> pseudonym, size, bucket, source file name, keyed hash of the bytes
                      (HMAC with a key derived from the vault key: finds duplicates, links nothing)
    shares            (image id, x) -> share id; rows commit only after all n share files are durable
    pending_writes    share ids a writer is about to write, committed *before* writing, tagged with the
                      writer's token: an orphan sweep never touches them while that writer lives
    pending_deletions shares of erased people that a store could not delete yet
    meta              schema version, audit log head, whether the stores carry identities

Only `vault init` creates a manifest (`Manifest.create`); `Manifest(path)` opens an existing one
and refuses a missing, empty, truncated or damaged file with one line (an empty manifest would make
every share look like an orphan). Schema 1 (before keyed image hashes) is migrated in place.

Erased rows must not linger: `secure_delete` overwrites freed content in the database file, and
the rollback journal (not WAL, whose file would keep old pages until a checkpoint) is removed at
each commit. Every write is one IMMEDIATE transaction, synchronous=FULL.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from facefed.client.vault.errors import InvalidConfig
from facefed.common import sqlite
from facefed.common.durable import fsync_dir, immediate

SCHEMA_VERSION = "2"
BACKUP_SUFFIX = ".bak"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS people (
    person_id TEXT PRIMARY KEY,
    pseudonym TEXT NOT NULL UNIQUE,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    image_id TEXT PRIMARY KEY,
    pseudonym TEXT NOT NULL REFERENCES people(pseudonym),
    size INTEGER NOT NULL,
    padded INTEGER NOT NULL,
    source_name TEXT,
    created REAL NOT NULL,
    content_hash TEXT
);
CREATE INDEX IF NOT EXISTS images_by_person ON images(pseudonym);
CREATE INDEX IF NOT EXISTS images_by_content ON images(content_hash);
CREATE TABLE IF NOT EXISTS shares (
    image_id TEXT NOT NULL REFERENCES images(image_id),
    x INTEGER NOT NULL,
    share_id TEXT NOT NULL,
    PRIMARY KEY (image_id, x),
    UNIQUE (x, share_id)
);
CREATE TABLE IF NOT EXISTS pending_writes (
    x INTEGER NOT NULL,
    share_id TEXT NOT NULL,
    writer TEXT NOT NULL,
    PRIMARY KEY (x, share_id)
);
CREATE TABLE IF NOT EXISTS pending_deletions (
    x INTEGER NOT NULL,
    share_id TEXT NOT NULL,
    image_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    pseudonym TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (x, share_id)
);
"""


@dataclass(frozen=True)
class ImageInfo:
    image_id: str
    person_id: str
    pseudonym: str
    size: int
    padded: int
    shares: dict[int, str] = field(default_factory=dict)  # x -> share id


@dataclass(frozen=True)
class NewImage:
    image_id: str
    person_id: str
    pseudonym: str
    size: int
    padded: int
    source_name: str | None
    shares: dict[int, str]
    content_hash: str | None = None


@dataclass(frozen=True)
class PendingDeletion:
    x: int
    share_id: str
    image_id: str
    request_id: str
    pseudonym: str


class ConcurrentPersonCreation(Exception):
    """Another process created the same new person while this put was writing."""


def _unreadable(path: Path, why: str) -> InvalidConfig:
    return InvalidConfig(
        f"{path} {why}; nothing was changed. Restore it from {path.name}{BACKUP_SUFFIX} beside it (written "
        f"after each change) or from your backup of the vault directory; the shares in the stores are untouched"
    )


class Manifest:
    def __init__(self, path: Path, *, _create: bool = False):
        self.path = path
        self._lock = threading.RLock()
        try:
            if not _create and path.is_file() and path.stat().st_size == 0:
                raise _unreadable(path, "is empty (0 bytes: truncated?)")
            # mode rw: opening never creates a manifest; only `create` (vault init) does
            self._db = sqlite.connect(
                path,
                journal="DELETE",
                secure_delete=True,
                foreign_keys=True,
                threads=True,
                mode="rwc" if _create else "rw",
            )
        except sqlite3.DatabaseError as e:
            raise _unreadable(path, f"is not a readable vault manifest ({e})") from None
        try:
            if _create:
                self._db.executescript(_SCHEMA)
                with self.write() as db:
                    db.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            self._check()
        except BaseException:
            self._db.close()
            raise

    @classmethod
    def create(cls, path: Path) -> Manifest:
        if path.exists():
            raise InvalidConfig(f"{path} already exists; a new manifest is made only by `vault init`")
        return cls(path, _create=True)

    def _check(self) -> None:
        path = self.path
        try:
            tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if "meta" not in tables:
                what = "is empty (no tables: truncated or replaced?)" if not tables else "is not a vault manifest"
                raise _unreadable(path, what)
            schema = self.get_meta("schema")
            if schema == "1":
                self._migrate_1_to_2()
                schema = self.get_meta("schema")
            if schema != SCHEMA_VERSION:
                raise InvalidConfig(
                    f"{path} has manifest schema {schema}, this facefed reads {SCHEMA_VERSION}; use the facefed "
                    f"version that wrote it"
                )
            missing = {"people", "images", "shares", "pending_writes", "pending_deletions"} - tables
            if missing:
                raise _unreadable(path, f"lacks table(s) {', '.join(sorted(missing))}")
            problems = [r[0] for r in self._db.execute("PRAGMA quick_check(3)")]
            if problems != ["ok"]:
                raise _unreadable(path, f"is damaged ({' '.join(str(problems[0]).split())})")
        except sqlite3.DatabaseError as e:
            raise _unreadable(path, f"is damaged ({' '.join(str(e).split())})") from None

    def _migrate_1_to_2(self) -> None:
        """Schema 1 -> 2: keyed image hashes (NULL for images stored before; they are not deduplicated)."""
        with self.write() as db:
            db.execute("ALTER TABLE images ADD COLUMN content_hash TEXT")
            db.execute("CREATE INDEX IF NOT EXISTS images_by_content ON images(content_hash)")
            db.execute("UPDATE meta SET value='2' WHERE key='schema'")

    def backup(self) -> None:
        """A compact copy beside the manifest (VACUUM INTO: no freed pages, so nothing erased lingers
        in it), replaced atomically; the old copy is overwritten with zeros before it goes."""
        bak = self.path.with_name(self.path.name + BACKUP_SUFFIX)
        tmp = self.path.with_name(self.path.name + BACKUP_SUFFIX + ".tmp")
        tmp.unlink(missing_ok=True)
        with self._lock:
            self._db.execute("VACUUM INTO ?", (str(tmp),))
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            fd = os.open(bak, os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            pass
        else:
            try:
                os.pwrite(fd, bytes(os.fstat(fd).st_size), 0)
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, bak)
        fsync_dir(self.path.parent)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- transactions ---------------------------------------------------------------------------
    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        with self._lock, immediate(self._db) as db:
            yield db

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """One consistent snapshot for several queries."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield self._db
            finally:
                self._db.execute("COMMIT")

    def changes(self) -> int:
        """Rows this connection has changed so far (tells whether an operation wrote anything)."""
        with self._lock:
            return self._db.total_changes

    # -- meta -----------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self.write() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # -- people and images ----------------------------------------------------------------------
    def pseudonym(self, person_id: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT pseudonym FROM people WHERE person_id=?", (person_id,)).fetchone()
        return row[0] if row else None

    def people(self, person_id: str | None = None) -> list[tuple[str, str, int]]:
        where, args = ("WHERE p.person_id=?", (person_id,)) if person_id is not None else ("", ())
        with self._lock:
            return self._db.execute(
                "SELECT p.person_id, p.pseudonym, COUNT(i.image_id) FROM people p "
                f"LEFT JOIN images i ON i.pseudonym = p.pseudonym {where} "
                "GROUP BY p.person_id ORDER BY p.person_id",
                args,
            ).fetchall()

    def image_ids(self, pseudonym: str) -> list[str]:
        with self._lock:
            return [
                r[0]
                for r in self._db.execute(
                    "SELECT image_id FROM images WHERE pseudonym=? ORDER BY created, rowid", (pseudonym,)
                )
            ]

    def sources(self) -> set[tuple[str, str]]:
        with self._lock:
            return set(
                self._db.execute(
                    "SELECT p.person_id, i.source_name FROM images i JOIN people p ON p.pseudonym = i.pseudonym "
                    "WHERE i.source_name IS NOT NULL"
                ).fetchall()
            )

    def image(self, image_id: str) -> ImageInfo | None:
        """One image with its shares, in a single statement (the `get` hot path)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT i.image_id, p.person_id, i.pseudonym, i.size, i.padded, s.x, s.share_id FROM images i "
                "JOIN people p ON p.pseudonym = i.pseudonym LEFT JOIN shares s ON s.image_id = i.image_id "
                "WHERE i.image_id = ?",
                (image_id,),
            ).fetchall()
        if not rows:
            return None
        r = rows[0]
        return ImageInfo(r[0], r[1], r[2], r[3], r[4], {x: sid for *_, x, sid in rows if x is not None})

    def images(self, image_ids: Iterable[str] | None = None) -> list[ImageInfo]:
        """Image records with their share ids; all images (by person, then insertion) when None.

        Unknown ids are left out; the caller compares lengths.
        """
        with self.read() as db:
            if image_ids is None:
                rows = db.execute(
                    "SELECT i.image_id, p.person_id, i.pseudonym, i.size, i.padded FROM images i "
                    "JOIN people p ON p.pseudonym = i.pseudonym ORDER BY p.person_id, i.created, i.rowid"
                ).fetchall()
                share_rows = db.execute("SELECT image_id, x, share_id FROM shares").fetchall()
            else:
                wanted = list(dict.fromkeys(image_ids))
                rows, share_rows = [], []
                for start in range(0, len(wanted), 500):  # stay below SQLite's variable limit
                    chunk = wanted[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    rows += db.execute(
                        "SELECT i.image_id, p.person_id, i.pseudonym, i.size, i.padded FROM images i "
                        f"JOIN people p ON p.pseudonym = i.pseudonym WHERE i.image_id IN ({marks})",
                        chunk,
                    ).fetchall()
                    share_rows += db.execute(
                        f"SELECT image_id, x, share_id FROM shares WHERE image_id IN ({marks})", chunk
                    ).fetchall()
                order = {iid: n for n, iid in enumerate(wanted)}
                rows.sort(key=lambda r: order[r[0]])
        shares: dict[str, dict[int, str]] = {}
        for image_id, x, share_id in share_rows:
            shares.setdefault(image_id, {})[x] = share_id
        return [ImageInfo(r[0], r[1], r[2], r[3], r[4], shares.get(r[0], {})) for r in rows]

    # -- writing --------------------------------------------------------------------------------
    def add_pending_writes(self, writer: str, shares: Iterable[tuple[int, str]]) -> None:
        with self.write() as db:
            db.executemany(
                "INSERT INTO pending_writes (x, share_id, writer) VALUES (?, ?, ?)",
                [(x, sid, writer) for x, sid in shares],
            )

    def drop_pending_writes(self, shares: Iterable[tuple[int, str]]) -> None:
        with self.write() as db:
            db.executemany("DELETE FROM pending_writes WHERE x=? AND share_id=?", list(shares))

    def commit_images(self, images: list[NewImage]) -> None:
        """Make written images visible: people (if new), images, shares; clear their pending writes."""
        now = time.time()
        with self.write() as db:
            for img in images:
                db.execute("INSERT OR IGNORE INTO people VALUES (?, ?, ?)", (img.person_id, img.pseudonym, now))
                actual = db.execute("SELECT pseudonym FROM people WHERE person_id=?", (img.person_id,)).fetchone()
                if actual[0] != img.pseudonym:
                    raise ConcurrentPersonCreation(img.person_id)
                db.execute(
                    "INSERT INTO images VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (img.image_id, img.pseudonym, img.size, img.padded, img.source_name, now, img.content_hash),
                )
                db.executemany(
                    "INSERT INTO shares VALUES (?, ?, ?)", [(img.image_id, x, sid) for x, sid in img.shares.items()]
                )
                db.executemany("DELETE FROM pending_writes WHERE x=? AND share_id=?", list(img.shares.items()))

    def by_content(self, hashes: Iterable[str]) -> dict[str, tuple[str, str]]:
        """Keyed image hash -> (person id, image id) of images already stored with those bytes."""
        wanted = list(dict.fromkeys(hashes))
        out: dict[str, tuple[str, str]] = {}
        with self.read() as db:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                for h, pid, iid in db.execute(
                    "SELECT i.content_hash, p.person_id, i.image_id FROM images i JOIN people p "
                    f"ON p.pseudonym = i.pseudonym WHERE i.content_hash IN ({','.join('?' * len(chunk))})",
                    chunk,
                ):
                    out.setdefault(h, (pid, iid))
        return out

    def pending_writes(self) -> list[tuple[int, str]]:
        with self._lock:
            return self._db.execute("SELECT x, share_id FROM pending_writes").fetchall()

    def pending_writers(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT DISTINCT writer FROM pending_writes")]

    def pending_writes_of(self, writer: str) -> list[tuple[int, str]]:
        with self._lock:
            return self._db.execute("SELECT x, share_id FROM pending_writes WHERE writer=?", (writer,)).fetchall()

    # -- erasing --------------------------------------------------------------------------------
    def begin_erase(self, person_id: str, request_id: str) -> tuple[str, list[PendingDeletion]]:
        """In one transaction: turn every share of the person into a pending deletion and remove
        the person's rows. After this commits the person is gone from the manifest even if the
        process dies; the share files are then destroyed by whoever runs next."""
        now = time.time()
        with self.write() as db:
            row = db.execute("SELECT pseudonym FROM people WHERE person_id=?", (person_id,)).fetchone()
            if row is None:
                raise KeyError(person_id)
            pseudonym = row[0]
            shares = db.execute(
                "SELECT s.x, s.share_id, s.image_id FROM shares s JOIN images i ON i.image_id = s.image_id "
                "WHERE i.pseudonym=?",
                (pseudonym,),
            ).fetchall()
            pending = [PendingDeletion(x, sid, iid, request_id, pseudonym) for x, sid, iid in shares]
            db.executemany(
                "INSERT OR REPLACE INTO pending_deletions VALUES (?, ?, ?, ?, ?, ?)",
                [(p.x, p.share_id, p.image_id, request_id, pseudonym, now) for p in pending],
            )
            db.execute(
                "DELETE FROM shares WHERE image_id IN (SELECT image_id FROM images WHERE pseudonym=?)", (pseudonym,)
            )
            db.execute("DELETE FROM images WHERE pseudonym=?", (pseudonym,))
            db.execute("DELETE FROM people WHERE pseudonym=?", (pseudonym,))
        return pseudonym, pending

    def pending_deletions(self) -> list[PendingDeletion]:
        with self._lock:
            return [
                PendingDeletion(*r)
                for r in self._db.execute(
                    "SELECT x, share_id, image_id, request_id, pseudonym FROM pending_deletions ORDER BY created"
                )
            ]

    def finish_deletions(self, done: Iterable[tuple[int, str]]) -> None:
        with self.write() as db:
            db.executemany("DELETE FROM pending_deletions WHERE x=? AND share_id=?", list(done))

    # -- what the stores should hold ------------------------------------------------------------
    def referenced(self) -> dict[int, set[str]]:
        """Per x: share ids the manifest knows (committed, being written, or awaiting deletion)."""
        out: dict[int, set[str]] = {}
        with self.read() as db:
            for table in ("shares", "pending_writes", "pending_deletions"):
                for x, sid in db.execute(f"SELECT x, share_id FROM {table}"):
                    out.setdefault(x, set()).add(sid)
        return out
