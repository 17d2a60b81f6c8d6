"""The share holder's disk: one file per share plus a small SQLite index, so a restart needs no scan.

Layout of a holder directory:
    shares/<ab>/<share_id>   share bytes (fanned out by the id's first two hex digits)
    tmp/                     in-flight writes; emptied at open
    index.sqlite             share id -> size, with a `pending` flag for crash recovery

Crash safety without a directory scan: a put (or a batch of them: one transaction each way) first
commits its index rows as pending, then writes temp file + fsync + rename + directory fsync, then
clears the flag; a delete sets the flag, zeroes and unlinks the file, then drops the row. So after a crash only pending rows can disagree with the files, and open
settles exactly those (one stat each): file present -> keep, absent -> drop the row.
The holder never learns whose face a share belongs to: it stores opaque ids and bytes.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from facefed.client.holder.proto.shares import MAX_SHARE_BYTES, ShareNotFound, StoreError, check_share_id
from facefed.common import sqlite
from facefed.common.durable import fsync_dir, immediate, write_synced

# The largest share the vault can make (its largest image, padded to its bucket): bounds a request's memory.
DEFAULT_MAX_SHARE_BYTES = MAX_SHARE_BYTES

_SCHEMA = """
CREATE TABLE IF NOT EXISTS shares (
    id TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    pending INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_FORMAT = "facefed-holder-1"  # meta row 'format' (not PRAGMA user_version, which stays 0)
INDEX_NAME = "index.sqlite"


@dataclass(frozen=True)
class HolderStat:
    shares: int
    bytes: int
    writable: bool


class ShareDir:
    """Thread-safe: reads go straight to files; index writes are serialised by one lock."""

    def __init__(self, root: str | os.PathLike[str], *, max_share_bytes: int = DEFAULT_MAX_SHARE_BYTES):
        self.root = Path(root).resolve()
        self.max_share_bytes = max_share_bytes
        if not self.root.is_dir():
            raise StoreError(
                f"holder directory {self.root} does not exist; create it (mkdir -p) on a disk of this host"
            )
        self.shares_dir = self.root / "shares"
        self.tmp_dir = self.root / "tmp"
        try:
            self.shares_dir.mkdir(mode=0o700, exist_ok=True)
            self.tmp_dir.mkdir(mode=0o700, exist_ok=True)
        except OSError as e:
            raise StoreError(f"holder directory {self.root} is not writable: {e.strerror}") from e
        self._lock = threading.Lock()
        index = self.root / INDEX_NAME
        try:
            # WAL, synchronous=FULL: an acknowledged put must survive power loss, index row included.
            self._db = sqlite.connect(index, journal="WAL", threads=True)
        except sqlite3.DatabaseError as e:
            raise self._damaged(index, e) from None
        try:
            problems = [r[0] for r in self._db.execute("PRAGMA quick_check(3)")]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError(problems[0])
            self._db.executescript(_SCHEMA)
            fmt = self._db.execute("SELECT value FROM meta WHERE key='format'").fetchone()
            if fmt is None:
                self._db.execute("INSERT INTO meta VALUES ('format', ?)", (_FORMAT,))
            elif fmt[0] != _FORMAT:
                raise StoreError(f"holder directory {self.root} has index format {fmt[0]!r}, expected {_FORMAT!r}")
            self.recovered = self._recover()
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise self._damaged(index, e) from None
        except BaseException:
            self._db.close()
            raise

    @staticmethod
    def _damaged(index: Path, e: Exception) -> StoreError:
        return StoreError(
            f"holder index {index} is damaged ({' '.join(str(e).split())}); the share files under {index.parent / 'shares'} are "
            f"untouched: restore the index from a backup, then start the holder again"
        )

    # -- crash recovery: only temp files and pending rows, never a scan of shares/ ------------------
    def _recover(self) -> int:
        for leftover in self.tmp_dir.iterdir():
            leftover.unlink(missing_ok=True)
        fixed = 0
        with self._lock:
            for (share_id,) in self._db.execute("SELECT id FROM shares WHERE pending=1").fetchall():
                path = self._path(share_id)
                if path.exists():
                    self._db.execute("UPDATE shares SET pending=0, size=? WHERE id=?", (path.stat().st_size, share_id))
                else:
                    self._db.execute("DELETE FROM shares WHERE id=?", (share_id,))
                fixed += 1
        return fixed

    def _path(self, share_id: str) -> Path:
        share_id = check_share_id(share_id)
        return self.shares_dir / share_id[:2] / share_id

    # -- the store operations ---------------------------------------------------------------------
    def put(self, share_id: str, data: bytes) -> None:
        self.put_many([(share_id, data)])

    def put_many(self, items: list[tuple[str, bytes]]) -> None:
        """Write shares durably; one index transaction before and one after, whatever their number."""
        planned = []
        for share_id, data in items:
            path = self._path(share_id)  # validates the id
            if len(data) > self.max_share_bytes:
                raise ValueError(
                    f"share {share_id} has {len(data)} bytes; this holder accepts at most {self.max_share_bytes}"
                )
            planned.append((share_id, path, data))
        if len({sid for sid, _, _ in planned}) != len(planned):
            raise ValueError("the same share id twice in one write")
        if not planned:
            return
        self._index_many(
            "INSERT INTO shares (id, size, pending) VALUES (?, ?, 1) ON CONFLICT(id) DO UPDATE SET pending=1",
            [(sid, len(data)) for sid, _, data in planned],
        )
        try:
            for share_id, path, data in planned:
                tmp = self.tmp_dir / f"{share_id}.{threading.get_ident()}"
                try:
                    write_synced(tmp, data)
                    path.parent.mkdir(mode=0o700, exist_ok=True)
                    os.replace(tmp, path)
                except OSError:
                    tmp.unlink(missing_ok=True)
                    raise
            for parent in {path.parent for _, path, _ in planned}:
                fsync_dir(parent)
        except OSError:
            self._settle([sid for sid, _, _ in planned])  # leave the index as the files are
            raise
        self._index_many("UPDATE shares SET pending=0, size=? WHERE id=?", [(len(d), sid) for sid, _, d in planned])

    def _index_many(self, sql: str, rows: list[tuple[object, ...]]) -> None:
        with self._lock, immediate(self._db):
            self._db.executemany(sql, rows)

    def _settle(self, share_ids: list[str]) -> None:
        with self._lock:
            for share_id in share_ids:
                path = self._path(share_id)
                if path.exists():
                    self._db.execute("UPDATE shares SET pending=0, size=? WHERE id=?", (path.stat().st_size, share_id))
                else:
                    self._db.execute("DELETE FROM shares WHERE id=?", (share_id,))

    def get(self, share_id: str) -> bytes:
        try:
            with open(self._path(share_id), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise ShareNotFound(share_id) from None

    def delete(self, share_id: str) -> bool:
        path = self._path(share_id)
        with self._lock:
            self._db.execute("UPDATE shares SET pending=1 WHERE id=?", (share_id,))
        existed = True
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            existed = False
        else:
            try:  # zero the bytes first (best effort against recovery from freed blocks), as local stores do
                os.pwrite(fd, bytes(os.fstat(fd).st_size), 0)
                os.fsync(fd)
            except OSError:
                pass
            finally:
                os.close(fd)
            try:
                path.unlink()
                fsync_dir(path.parent)
            except FileNotFoundError:
                existed = False
        with self._lock:
            self._db.execute("DELETE FROM shares WHERE id=?", (share_id,))
        return existed

    def list(self, after: str = "", limit: int = 1000) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id FROM shares WHERE id > ? AND pending=0 ORDER BY id LIMIT ?", (after, limit)
            ).fetchall()
        return [r[0] for r in rows]

    def iter_ids(self) -> Iterator[str]:
        after = ""
        while page := self.list(after):
            yield from page
            after = page[-1]

    def stat(self) -> HolderStat:
        with self._lock:
            count, total = self._db.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM shares WHERE pending=0"
            ).fetchone()
        return HolderStat(shares=count, bytes=total, writable=self._writable())

    def _writable(self) -> bool:
        # os.access says yes to root on a read-only mount: really try a write.
        probe = self.tmp_dir / f"probe.{threading.get_ident()}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError:
            return False
        os.close(fd)
        probe.unlink(missing_ok=True)
        return True

    def close(self) -> None:
        with self._lock:
            self._db.close()
