"""Append-only, hash-chained audit log of what the vault destroyed (and when it was set up).

One JSON object per line. Each carries `prev`, the SHA-256 of the previous line's bytes (64 zeros
for the first), so editing, removing or reordering any line breaks the chain at the next one. The
vault also keeps the hash of the last line in its manifest, which catches a truncated tail.
Entries name people only by pseudonym, never by the operator's person id.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from facefed.client.vault.errors import AuditChainBroken

GENESIS = "0" * 64


@dataclass(frozen=True)
class AuditStatus:
    entries: int
    head: str  # sha256 of the last line, GENESIS when empty


def _line_hash(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def append(path: Path, event: str, **fields: object) -> str:
    """Append one entry and return the new head hash. Durable (fsync) before returning."""
    if "prev" in fields or "event" in fields:
        raise ValueError("audit fields `prev` and `event` are set by the log itself")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # two processes appending must not fork the chain
        prev = _last_line_hash(fd)
        entry = {"event": event, "time": round(time.time(), 3), **fields, "prev": prev}
        line = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()
        os.write(fd, line + b"\n")
        os.fsync(fd)
        return _line_hash(line)
    finally:
        os.close(fd)


def _last_line_hash(fd: int) -> str:
    size = os.fstat(fd).st_size
    if size == 0:
        return GENESIS
    # Read backwards in blocks until the start of the last line is found.
    block, end, tail = 4096, size, b""
    while end > 0:
        start = max(0, end - block)
        tail = os.pread(fd, end - start, start) + tail
        end = start
        body = tail.rstrip(b"\n")
        if b"\n" in body:
            return _line_hash(body.rsplit(b"\n", 1)[1])
    return _line_hash(tail.rstrip(b"\n"))


def verify_audit_chain(path: str | Path, known_head: str | None = None) -> AuditStatus:
    """Check every link; raise AuditChainBroken naming the first bad line. Returns count and head.

    `known_head` is a line hash recorded elsewhere (the manifest) after an append: the chain must
    still contain it, so cutting lines off the end is detected. (Lines after it are fine: a crash
    between appending and recording leaves exactly that.)
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AuditChainBroken(f"audit log {path} is missing") from None
    prev, count, seen = GENESIS, 0, known_head in (None, GENESIS)
    for number, line in enumerate(data.splitlines(), start=1):
        try:
            entry = json.loads(line)
        except ValueError:
            raise AuditChainBroken(f"audit log {path} line {number} is not JSON (edited?)") from None
        if not isinstance(entry, dict) or entry.get("prev") != prev:
            raise AuditChainBroken(
                f"audit log {path} line {number}: chain broken (the line before it was edited or removed)"
            )
        prev, count = _line_hash(line), count + 1
        seen = seen or prev == known_head
    if data and not data.endswith(b"\n"):
        raise AuditChainBroken(f"audit log {path}: last line is incomplete")
    if not seen:
        raise AuditChainBroken(
            f"audit log {path} ends at a different entry than the manifest records (lines removed at the end?)"
        )
    return AuditStatus(count, prev)


def read_entries(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
