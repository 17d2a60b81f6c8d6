"""Writer locks: each process that writes holds an flock'ed `locks/<token>.lock` while it lives.

A put's pending rows carry its writer's token; a token whose lock is free belongs to a dead process,
so `recovery` may delete what that writer left half-written."""

from __future__ import annotations

import fcntl
import os
import re
import secrets
from pathlib import Path
from typing import Protocol

_TOKEN_RE = re.compile(r"^[0-9a-f]{16}$")


class _PendingWrites(Protocol):
    def pending_writes_of(self, writer: str) -> list[tuple[int, str]]: ...


class WriterLocks:
    def __init__(self, locks_dir: Path):
        self.dir = locks_dir
        self.token: str | None = None
        self._fd: int | None = None

    def _file(self, token: str) -> Path:
        return self.dir / f"{token}.lock"

    def ensure(self) -> str:
        """This process's writer token, taking its lock on first use."""
        if self.token is not None:
            return self.token
        self.dir.mkdir(mode=0o700, exist_ok=True)
        token = secrets.token_hex(8)
        fd = os.open(self._file(token), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held until close or process death
        self.token, self._fd = token, fd
        return token

    def dead(self, token: str) -> bool:
        """True if the process that owned `token` is gone (its flock was released by the kernel)."""
        if token == self.token or not _TOKEN_RE.match(token):
            return False
        try:
            fd = os.open(self._file(token), os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)

    def remove(self, token: str) -> None:
        try:
            os.unlink(self._file(token))
        except OSError:
            pass

    def release(self, manifest: _PendingWrites) -> None:
        """Drop this process's lock (its file too, unless pending writes still name it)."""
        if self._fd is None:
            return
        assert self.token is not None
        if not manifest.pending_writes_of(self.token):
            self.remove(self.token)
        os.close(self._fd)  # releases the flock
        self._fd = None
