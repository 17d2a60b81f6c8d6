"""The `Store` interface: where one x-coordinate's share files live.

A store is a flat namespace of opaque share ids (no person id ever appears here) mapped to bytes.
The vault talks to stores only through this class: every capability it uses is declared here, with
a safe default, so the vault never probes a store's type. Implementations: `stores/local.py`
(a directory) and `stores/grpc.py` (a remote share holder); `stores.open_store(url)` picks one.
"""

from __future__ import annotations

import builtins
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from facefed.client.holder.proto.shares import (
    SHARE_ID_RE,
    ShareNotFound,
    StoreError,
    StoreUnavailable,
    check_share_id,
)

__all__ = [
    "IDENTITY_ID",
    "SHARE_ID_RE",
    "ShareNotFound",
    "Store",
    "StoreError",
    "StoreMisplaced",
    "StoreStat",
    "StoreUnavailable",
    "check_share_id",
]


# The reserved id under which a store without a place of its own for it keeps its identity record
# (vault id, x-coordinate; client/vault/identity.py). Share ids are 32 hex digits: never this.
IDENTITY_ID = "0" * 64


class StoreMisplaced(StoreUnavailable):
    """The store answers but holds another x-coordinate's or another vault's shares (stores swapped,
    vault.toml reordered, a foreign disk mounted): the vault uses nothing in it and deletes nothing."""

    exit_code = 2


@dataclass(frozen=True)
class StoreStat:
    url: str
    shares: int
    bytes: int
    writable: bool


class Store(ABC):
    """One share store. Subclasses implement the six abstract operations; the rest has defaults."""

    url: str

    #: True for stores reached over a network: the vault then uses more reader threads (network
    #: waits overlap even on one core) than for local ones (CPU-bound reads, one thread per CPU).
    is_remote: bool = False

    #: > 0: a `get_many` call costs far less than that many `get`s, so the vault fetches this many
    #: images' shares per call ahead of the reader. 0: read share by share.
    prefetch_window: int = 0

    # -- required ---------------------------------------------------------------------------------
    @abstractmethod
    def put(self, share_id: str, data: bytes) -> None:
        """Write atomically and durably (fsync) before returning; overwrite is allowed."""

    @abstractmethod
    def get(self, share_id: str) -> bytes:
        """Raise ShareNotFound if absent, StoreUnavailable if the store cannot be reached."""

    @abstractmethod
    def delete(self, share_id: str) -> bool:
        """Remove the share; True if it existed. Idempotent."""

    @abstractmethod
    def list(self) -> Iterator[str]:
        """All share ids in the store."""

    @abstractmethod
    def stat(self) -> StoreStat:
        """Share count and bytes; raises StoreError if the store cannot be reached (its health)."""

    @abstractmethod
    def check(self) -> None:
        """Raise StoreError naming the store if it is missing, unreadable or read-only."""

    # -- optional, with defaults ------------------------------------------------------------------
    @property
    def local_path(self) -> Path | None:
        """The directory of a store on this machine; None for a remote one."""
        return None

    def identity(self) -> str:
        """What makes two store URLs the same place (a resolved path, a normalised URL)."""
        return self.url

    def put_many(self, items: builtins.list[tuple[str, bytes]]) -> None:
        """Several shares, each durable when this returns."""
        for share_id, data in items:
            self.put(share_id, data)

    def get_many(self, share_ids: builtins.list[str]) -> dict[str, bytes]:
        """Shares by id; absent ids are left out."""
        found: dict[str, bytes] = {}
        for share_id in share_ids:
            try:
                found[share_id] = self.get(share_id)
            except ShareNotFound:
                pass
        return found

    def read_identity(self) -> bytes | None:
        """The store's identity record, None if it has none (raises StoreError if unreachable)."""
        try:
            return self.get(IDENTITY_ID)
        except ShareNotFound:
            return None

    def write_identity(self, record: bytes) -> None:
        self.put(IDENTITY_ID, record)

    def sweep_temp(self) -> int:
        """Remove leftovers of writers that died long ago; returns how many (none by default)."""
        return 0

    def close(self) -> None:  # noqa: B027 - optional: a no-op for stores that hold no connection
        """Release connections; the store is not used afterwards."""
