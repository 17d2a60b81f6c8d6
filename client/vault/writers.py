"""The vault-wide writer lock: every mutation of a vault (put, erase, repair, open-time recovery,
store remapping) holds an exclusive flock on `locks/writer.lock` for its duration; readers never
take it.

Why one lock: a put checks the person's tombstone and commits the person's rows, an erase removes
them; without serialising the two, a batch written before the erase and committed after it brings
the person back. One lock also makes "pending writes" simple: whoever holds the lock knows that no
other writer is alive, so every pending write it finds belongs to a writer that died.

Held per operation (one import batch, one erase), not per process: a `forget` waits for the batch in
flight, never for a whole import. Within a process the lock is reentrant per thread (a repair may
call helpers that take it), and threads of one process are serialised by a threading lock first.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from facefed.client.vault.errors import VaultBusy

LOCK_NAME = "writer.lock"
DEFAULT_WAIT_S = 300.0  # a batch takes seconds; a writer holding the lock longer is stuck or huge
_POLL_S = 0.02


class VaultLock:
    def __init__(self, locks_dir: Path, vault_path: Path, *, wait_s: float = DEFAULT_WAIT_S):
        self.dir = locks_dir
        self.vault_path = vault_path
        self.wait_s = wait_s
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        return self.dir / LOCK_NAME

    @property
    def held(self) -> bool:
        return self._fd is not None

    @contextmanager
    def hold(self, what: str, *, wait: bool = True) -> Iterator[bool]:
        """Hold the writer lock for `what`; yields True, or False when `wait` is False and it is busy.
        Raises VaultBusy naming the holder if it stays busy for `wait_s` seconds."""
        if not self._thread_lock.acquire(timeout=self.wait_s if wait else 0):
            if not wait:
                yield False
                return
            raise VaultBusy(f"vault {self.vault_path} is busy in this process (another thread is writing); try again")
        try:
            if self._depth == 0 and not self._acquire(what, wait):
                yield False
                return
            self._depth += 1
            try:
                yield True
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self._release()
        finally:
            self._thread_lock.release()

    def create(self) -> None:
        """The lock file, made once at `vault init` (it stays: an empty file, never rewritten)."""
        self.dir.mkdir(mode=0o700, exist_ok=True)
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))

    def _acquire(self, what: str, wait: bool) -> bool:
        self.dir.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + (self.wait_s if wait else 0.0)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    if not wait:
                        return False
                    raise VaultBusy(
                        f"vault {self.vault_path} is busy: another process has been writing to it for over "
                        f"{self.wait_s:.0f} s; try again when it has finished"
                    ) from None
                time.sleep(_POLL_S)
        self._fd = fd
        return True

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None

    def remove_stale(self) -> int:
        """Delete per-process lock files left by earlier versions (one per writer that ever ran)."""
        removed = 0
        try:
            names = [p for p in self.dir.iterdir() if p.suffix == ".lock" and p.name != LOCK_NAME]
        except OSError:
            return 0
        for p in names:
            try:
                p.unlink()
                removed += 1
            except OSError:
                pass
        return removed
