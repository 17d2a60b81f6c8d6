"""The parts of an open vault that every operation shares: stores, keys, manifest, audit log,
the thread pool, which stores were just found unreachable, and parallel deletion of shares."""

from __future__ import annotations

import builtins
import logging
import os
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from itertools import islice
from pathlib import Path

from facefed.client.vault import audit
from facefed.client.vault.config import VaultConfig
from facefed.client.vault.identity import make_record, parse_record, vault_id
from facefed.client.vault.manifest import Manifest
from facefed.client.vault.sharefile import ShareFormatError, ShareKeys, unseal
from facefed.client.vault.stores import Store, StoreError, StoreStat, open_store
from facefed.client.vault.stores.base import IDENTITY_ID, StoreMisplaced
from facefed.client.vault.writers import VaultLock

log = logging.getLogger("facefed.vault")

KEY_NAME = "key"
MANIFEST_NAME = "manifest.sqlite"
AUDIT_NAME = "audit.log"
LOCKS_NAME = "locks"
KEY_BYTES = 32
DEFAULT_WORKERS = 4
DOWN_RETRY_S = 30.0  # after a store is found unreachable, try the others first for this long


class MisplacedStore(Store):
    """Stands in for a store whose identity record does not match its place: every operation raises
    StoreMisplaced (a StoreUnavailable), so reads use the other stores, writes refuse, deletions stay
    pending, and nothing in it is ever touched."""

    def __init__(self, real: Store, reason: str):
        self.real, self.url, self.reason, self.is_remote = real, real.url, reason, real.is_remote

    def _refuse(self) -> StoreMisplaced:
        return StoreMisplaced(self.reason)

    def put(self, share_id: str, data: bytes) -> None:
        raise self._refuse()

    def put_many(self, items: builtins.list[tuple[str, bytes]]) -> None:
        raise self._refuse()

    def get(self, share_id: str) -> bytes:
        raise self._refuse()

    def get_many(self, share_ids: builtins.list[str]) -> dict[str, bytes]:
        raise self._refuse()

    def delete(self, share_id: str) -> bool:
        raise self._refuse()

    def list(self) -> Iterator[str]:
        raise self._refuse()

    def stat(self) -> StoreStat:
        raise self._refuse()

    def check(self) -> None:
        raise self._refuse()

    def read_identity(self) -> bytes | None:
        return self.real.read_identity()

    @property
    def local_path(self) -> Path | None:
        return self.real.local_path

    def identity(self) -> str:
        return self.real.identity()

    def close(self) -> None:
        self.real.close()


class VaultCore:
    def __init__(
        self,
        path: Path,
        config: VaultConfig,
        key: bytes,
        *,
        workers: int | None = None,
        manifest: Manifest | None = None,
    ):
        self.path = path
        self.config = config
        self.k = config.threshold
        self.n = len(config.stores)
        self.tls_dir = Path(config.tls_dir) if config.tls_dir else None
        self.raw_stores: list[Store] = [open_store(url, tls_dir=self.tls_dir) for url in config.stores]
        self.stores: list[Store] = list(self.raw_stores)
        self.keys = ShareKeys(key)
        self.vault_id = vault_id(key)
        try:
            self.manifest = manifest if manifest is not None else Manifest(path / MANIFEST_NAME)
        except BaseException:
            for st in self.raw_stores:
                st.close()
            raise
        self.audit_path = path / AUDIT_NAME
        self.lock = VaultLock(path / LOCKS_NAME, path)
        self.workers = None if workers is None else max(1, workers)  # None: decided by CPUs and store kinds
        self.down_until = [0.0] * self.n  # per store: skip it (try it last) until then
        self._pool: ThreadPoolExecutor | None = None

    # -- the writer lock ------------------------------------------------------------------------
    @contextmanager
    def writing(self, what: str, *, wait: bool = True) -> Iterator[bool]:
        """Hold the vault's writer lock (writers.py); after a mutation that changed the manifest,
        refresh its backup copy (manifest.sqlite.bak) while still holding the lock."""
        with self.lock.hold(what, wait=wait) as held:
            before = self.manifest.changes()
            yield held
            if held and self.lock._depth == 1 and self.manifest.changes() != before:
                try:
                    self.manifest.backup()
                except (OSError, Exception) as e:  # noqa: BLE001 - a backup must never fail the operation
                    log.warning("could not refresh the manifest backup: %s", e)

    # -- store identities -----------------------------------------------------------------------
    def identified(self) -> set[int]:
        raw = self.manifest.get_meta("identities") or ""
        return {int(x) for x in raw.split(",") if x.isdigit()}

    def write_identity(self, x: int) -> None:
        self.raw_stores[x - 1].write_identity(make_record(self.keys, self.vault_id, x, self.n))
        xs = self.identified() | {x}
        self.manifest.set_meta("identities", ",".join(str(i) for i in sorted(xs)))
        self.stores[x - 1] = self.raw_stores[x - 1]

    def store_identity_problem(self, x: int) -> tuple[str | None, bool]:
        """(why the store at x is not this vault's x, None if it is; whether it is adoptable: empty
        and without any identity, e.g. a replaced disk). Unreachable stores are (None, False)."""
        store = self.raw_stores[x - 1]
        try:
            record = store.read_identity()
            if record is None:
                listed = [sid for sid in islice(store.list(), 16) if sid != IDENTITY_ID]
        except StoreError:
            return None, False
        where = f"store {store.url} (x={x} in vault.toml)"
        untouched = "nothing in it is used or deleted"
        if record is not None:
            ident = parse_record(self.keys, self.vault_id, record)
            if not ident.ours:
                return f"{where} belongs to another vault; {untouched}; check vault.toml and the mounts", False
            if ident.x != x:
                return (
                    f"{where} holds the shares of x={ident.x} (stores swapped or vault.toml reordered); "
                    f"{untouched}; run `facefed-client vault remap` to put the stores back in order"
                ), False
            return None, False
        if not listed:
            if x in self.identified():
                return (
                    f"{where} is empty and has no identity record (a new disk, or the old one not mounted?); "
                    f"{untouched}; mount the right disk, or run `facefed-client vault repair` to refill it"
                ), True
            return None, True  # schema 1 vault: identify it now
        if x in self.identified():
            return (
                f"{where} holds share files but no identity record (not this vault's store?); {untouched}; "
                f"check vault.toml and the mounts"
            ), False
        # A vault made before identities: its shares' headers say which x the store holds.
        for sid in listed:
            try:
                header, _ = unseal(self.keys, store.get(sid))
            except (ShareFormatError, StoreError, KeyError):
                continue
            if header.x != x:
                return (
                    f"{where} holds the shares of x={header.x} (stores swapped or vault.toml reordered); "
                    f"{untouched}; run `facefed-client vault remap` to put the stores back in order"
                ), False
            return None, True
        return f"{where} holds no share of this vault (another vault's store?); {untouched}", False

    def check_identities(self) -> list[str]:
        """Check every store against its identity record; misplaced ones are fenced off (MisplacedStore).
        Stores of a vault made before identities get theirs now, once their headers confirm the x."""
        problems = []
        for x in range(1, self.n + 1):
            problem, adoptable = self.store_identity_problem(x)
            if problem is not None:
                self.stores[x - 1] = MisplacedStore(self.raw_stores[x - 1], problem)
                problems.append(problem)
                log.warning("%s", problem)
            else:
                self.stores[x - 1] = self.raw_stores[x - 1]
                if adoptable and x not in self.identified():
                    try:
                        with self.writing("identify stores", wait=False) as held:
                            if held:
                                self.write_identity(x)
                    except StoreError as e:
                        log.warning("could not write the identity of store x=%d: %s", x, e)
        return problems

    def audit(self, event: str, **fields: object) -> None:
        head = audit.append(self.audit_path, event, **fields)
        self.manifest.set_meta("audit_head", head)

    def read_threads(self) -> int:
        """Reader threads worth having: remote stores gain from overlapping network waits even on
        one core; local reads are CPU work (page cache, HMAC, table lookups), so one per CPU."""
        if self.workers is not None:
            return self.workers
        if any(s.is_remote for s in self.stores):
            return 2 * DEFAULT_WORKERS
        return max(1, min(DEFAULT_WORKERS, len(os.sched_getaffinity(0))))

    def executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=max(self.read_threads(), self.n), thread_name_prefix="vault")
        return self._pool

    def mark_down(self, x: int, now: float | None = None) -> None:
        self.down_until[x - 1] = (time.monotonic() if now is None else now) + DOWN_RETRY_S

    def delete_shares(
        self, shares: Iterable[tuple[int, str]], *, why: str = "deletion left pending"
    ) -> tuple[list[tuple[int, str]], set[str]]:
        """Delete shares store by store in parallel; (confirmed gone, urls of stores that failed)."""
        by_x: dict[int, list[str]] = {}
        for x, sid in shares:
            by_x.setdefault(x, []).append(sid)

        def work(x: int) -> tuple[list[tuple[int, str]], str | None]:
            store, done = self.stores[x - 1], list[tuple[int, str]]()
            for sid in by_x[x]:
                try:
                    store.delete(sid)
                except StoreError as e:
                    log.warning("store %s: %s: %s", store.url, why, e)
                    return done, store.url
                done.append((x, sid))
            return done, None

        gone: list[tuple[int, str]] = []
        failed: set[str] = set()
        for done, url in self.executor().map(work, sorted(by_x)):
            gone += done
            if url is not None:
                failed.add(url)
        return gone, failed

    def close(self, wait: bool) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=True)
        self.manifest.close()
        for store in self.raw_stores:
            store.close()
