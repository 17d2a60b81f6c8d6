"""A store that is a plain directory on this machine (its own disk or mount, ideally)."""

from __future__ import annotations

import errno
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

from facefed.client.vault.stores.base import (
    SHARE_ID_RE,
    ShareNotFound,
    Store,
    StoreError,
    StoreStat,
    StoreUnavailable,
    check_share_id,
)
from facefed.common.durable import atomic_write_bytes, fsync_dir, write_synced

_TMP_PREFIX = "."
_TMP_SUFFIX = ".tmp"
_IDENTITY_NAME = ".facefed-store"  # a dot file: never listed as a share
_STALE_TMP_S = 3600.0  # a temp file this old belongs to a writer that died (a put takes milliseconds)


class LocalDirStore(Store):
    """A store that is a plain directory (its own disk or mount, ideally): one file per share.

    Writes are atomic and durable: temp file, fsync, rename over the final name, fsync the
    directory. Deletes overwrite the file with zeros before unlinking it (best effort against
    recovery from freed blocks; a single share reveals nothing anyway).
    A missing directory is `StoreUnavailable` (an unmounted disk looks exactly like that), so the
    vault degrades the same way as for a remote holder that is down.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser().absolute()
        self.url = str(self.path)
        self._prefix = os.path.join(self.url, "")

    def __repr__(self) -> str:
        return f"LocalDirStore({self.url!r})"

    @property
    def local_path(self) -> Path:
        return self.path

    def identity(self) -> str:
        return os.path.realpath(self.path)

    # -- helpers ------------------------------------------------------------------------------
    def _file(self, share_id: str) -> Path:
        return self.path / check_share_id(share_id)

    def _tmp(self, share_id: str) -> Path:
        return self.path / f"{_TMP_PREFIX}{share_id}{_TMP_SUFFIX}"

    def _error(self, e: OSError, doing: str) -> StoreError:
        if not self.path.is_dir():
            return StoreUnavailable(
                f"store {self.url}: directory is missing (disk not mounted?); mount or recreate it, "
                f"then run `facefed-client vault repair`"
            )
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return StoreError(
                f"store {self.url} is read-only or not accessible ({doing}: {e.strerror}); "
                f"fix its permissions or mount it read-write"
            )
        if e.errno == errno.ENOSPC:
            return StoreError(f"store {self.url} is full ({doing}); free space or move it to a larger disk")
        return StoreError(f"store {self.url}: {doing} failed: {e.strerror or e}")

    def _write_tmp(self, share_id: str, data: bytes) -> Path:
        tmp = self._tmp(check_share_id(share_id))
        write_synced(tmp, data)
        return tmp

    # -- Store operations -----------------------------------------------------------------------
    def put(self, share_id: str, data: bytes) -> None:
        self.put_many([(share_id, data)])

    def put_many(self, items: list[tuple[str, bytes]]) -> None:
        """Several shares, each durable, with one directory fsync for the lot."""
        try:
            for share_id, data in items:
                tmp = self._write_tmp(share_id, data)
                os.replace(tmp, self._file(share_id))
            fsync_dir(self.path)
        except OSError as e:
            err = self._error(e, "write")
            for share_id, _ in items:
                self._unlink_quiet(self._tmp(share_id))
            raise err from e

    def get(self, share_id: str) -> bytes:
        # os-level calls on a str path: this is the hot path of training reads.
        path = self._prefix + check_share_id(share_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                size = os.fstat(fd).st_size
                data = os.read(fd, size)
                while len(data) < size:  # short reads are legal; rare for regular files
                    more = os.read(fd, size - len(data))
                    if not more:
                        break
                    data += more
                return data
            finally:
                os.close(fd)
        except FileNotFoundError as e:
            if not self.path.is_dir():
                raise self._error(e, "read") from e
            raise ShareNotFound(share_id) from None
        except OSError as e:
            raise self._error(e, "read") from e

    def delete(self, share_id: str) -> bool:
        path = self._file(share_id)
        self._unlink_quiet(self._tmp(share_id))
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError as e:
            if not self.path.is_dir():
                raise self._error(e, "delete") from e
            return False
        except OSError as e:
            raise self._error(e, "delete") from e
        try:
            size = os.fstat(fd).st_size
            os.pwrite(fd, bytes(size), 0)
            os.fsync(fd)
        except OSError:
            pass  # overwriting is best effort; the unlink below is what must happen
        finally:
            os.close(fd)
        try:
            os.unlink(path)
            fsync_dir(self.path)
        except FileNotFoundError:
            return False  # a concurrent delete won the race
        except OSError as e:
            raise self._error(e, "delete") from e
        return True

    def list(self) -> Iterator[str]:
        try:
            with os.scandir(self.path) as it:
                names = [e.name for e in it if SHARE_ID_RE.match(e.name)]
        except OSError as e:
            raise self._error(e, "list") from e
        return iter(names)

    def stat(self) -> StoreStat:
        shares = total = 0
        try:
            with os.scandir(self.path) as it:
                for e in it:
                    if SHARE_ID_RE.match(e.name):
                        shares += 1
                        total += e.stat().st_size
        except OSError as e:
            raise self._error(e, "stat") from e
        return StoreStat(self.url, shares, total, self._writable())

    def check(self) -> None:
        if not self.path.exists():
            raise StoreError(f"store {self.url} does not exist; create it (mkdir -p) or mount its disk")
        if not self.path.is_dir():
            raise StoreError(f"store {self.url} is not a directory")
        if not os.access(self.path, os.R_OK | os.X_OK):
            raise StoreError(f"store {self.url} is not readable; fix its permissions")
        if not self._writable():
            raise StoreError(f"store {self.url} is read-only; fix its permissions or mount it read-write")

    # -- helpers and optional operations ---------------------------------------------------------
    def read_identity(self) -> bytes | None:
        try:
            return (self.path / _IDENTITY_NAME).read_bytes()
        except FileNotFoundError as e:
            if not self.path.is_dir():
                raise self._error(e, "read") from e
            return None
        except OSError as e:
            raise self._error(e, "read") from e

    def write_identity(self, record: bytes) -> None:
        if not self.path.is_dir():  # never create an unmounted disk's mount point contents
            raise self._error(FileNotFoundError(errno.ENOENT, "missing"), "write")
        try:
            atomic_write_bytes(self.path / _IDENTITY_NAME, record)
        except OSError as e:
            raise self._error(e, "write") from e

    def _writable(self) -> bool:
        # os.access lies for root and ignores read-only mounts and immutable flags: really try.
        probe = self.path / f"{_TMP_PREFIX}probe-{secrets.token_hex(8)}{_TMP_SUFFIX}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError:
            return False
        os.close(fd)
        self._unlink_quiet(probe)
        return True

    def sweep_temp(self, older_than_s: float = _STALE_TMP_S) -> int:
        """Remove temp files left by writers that died long ago; returns how many."""
        now, removed = time.time(), 0
        try:
            with os.scandir(self.path) as it:
                stale = [
                    e.path
                    for e in it
                    if e.name.startswith(_TMP_PREFIX)
                    and e.name.endswith(_TMP_SUFFIX)
                    and now - e.stat().st_mtime > older_than_s
                ]
        except OSError:
            return 0
        for p in stale:
            removed += self._unlink_quiet(Path(p))
        return removed

    @staticmethod
    def _unlink_quiet(path: Path) -> bool:
        try:
            os.unlink(path)
            return True
        except OSError:
            return False
