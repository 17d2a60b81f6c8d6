"""The parts of an open vault that every operation shares: stores, keys, manifest, audit log,
the thread pool, which stores were just found unreachable, and parallel deletion of shares."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from facefed.client.vault import audit
from facefed.client.vault.config import VaultConfig
from facefed.client.vault.manifest import Manifest
from facefed.client.vault.sharefile import ShareKeys
from facefed.client.vault.stores import Store, StoreError, open_store
from facefed.client.vault.writers import WriterLocks

log = logging.getLogger("facefed.vault")

KEY_NAME = "key"
MANIFEST_NAME = "manifest.sqlite"
AUDIT_NAME = "audit.log"
LOCKS_NAME = "locks"
KEY_BYTES = 32
DEFAULT_WORKERS = 4
DOWN_RETRY_S = 30.0  # after a store is found unreachable, try the others first for this long


class VaultCore:
    def __init__(self, path: Path, config: VaultConfig, key: bytes, *, workers: int | None = None):
        self.path = path
        self.config = config
        self.k = config.threshold
        self.n = len(config.stores)
        self.tls_dir = Path(config.tls_dir) if config.tls_dir else None
        self.stores: list[Store] = [open_store(url, tls_dir=self.tls_dir) for url in config.stores]
        self.keys = ShareKeys(key)
        self.manifest = Manifest(path / MANIFEST_NAME)
        self.audit_path = path / AUDIT_NAME
        self.writers = WriterLocks(path / LOCKS_NAME)
        self.workers = None if workers is None else max(1, workers)  # None: decided by CPUs and store kinds
        self.down_until = [0.0] * self.n  # per store: skip it (try it last) until then
        self._pool: ThreadPoolExecutor | None = None

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

    def delete_shares(self, shares: Iterable[tuple[int, str]]) -> tuple[list[tuple[int, str]], set[str]]:
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
                    log.warning("store %s: deletion left pending: %s", store.url, e)
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
        self.writers.release(self.manifest)
        self.manifest.close()
        for store in self.stores:
            store.close()
