"""A site's face vault: images kept only as Shamir shares over n stores, any k of which rebuild them.

`Vault` is the public face: create/open and the operations. The work lives in one module per concept:
`recovery` (at open), `writing`, `reading`, `maintenance` (erase, verify, repair), over the shared
state in `core`. Layout, crash safety and read strategies: docs/vault.md.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from facefed.client.vault import audit, maintenance, reading, recovery, writing
from facefed.client.vault.config import CONFIG_NAME, FORMAT_VERSION, VaultConfig, load_config, write_config
from facefed.client.vault.core import KEY_BYTES, KEY_NAME, MANIFEST_NAME, VaultCore
from facefed.client.vault.errors import InvalidConfig, UnknownPerson, VaultError
from facefed.client.vault.manifest import Manifest
from facefed.client.vault.reports import EraseReport, PersonRecord, RepairReport, StoreHealth, VerifyReport
from facefed.client.vault.stores import Store, open_store
from facefed.common.shamir import MAX_SHARES

log = logging.getLogger("facefed.vault")


class Vault:
    """Open with `Vault.open(path)` or make with `Vault.create(...)`; use as a context manager."""

    def __init__(
        self,
        path: Path,
        config: VaultConfig,
        key: bytes,
        *,
        workers: int | None = None,
        manifest: Manifest | None = None,
    ):
        self._core = VaultCore(path, config, key, workers=workers, manifest=manifest)
        self.path = path
        self.config = config
        self.k = self._core.k
        self.n = self._core.n
        self.tls_dir = self._core.tls_dir
        self.stores: list[Store] = self._core.stores
        self.store_problems: list[str] = []  # misplaced stores found at open (fenced off, see identity.py)
        self._closed = False

    # -- creating and opening ---------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | Path,
        stores: list[str],
        threshold: int,
        *,
        tls_dir: Path | None = None,
        workers: int | None = None,
    ) -> Vault:
        """A new, empty vault at `path` over `stores` (x = 1..n in the order given)."""
        path = Path(path).expanduser().absolute()
        stores = list(stores)
        if not stores:
            raise InvalidConfig("no stores given; list n >= 1 store directories (or grpcs:// holders)")
        n = len(stores)
        if not isinstance(threshold, int) or not 1 <= threshold <= n:
            raise InvalidConfig(f"threshold k={threshold} with n={n} stores: need 1 <= k <= n")
        if n > MAX_SHARES:
            raise InvalidConfig(f"{n} stores: Shamir over GF(256) allows at most {MAX_SHARES} (n <= 255)")
        if (path / CONFIG_NAME).exists():
            raise InvalidConfig(f"{path} is already a vault; open it, or pick a new directory")
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise InvalidConfig(f"{path} exists and is not an empty directory; pick a new vault directory")
        tls = Path(tls_dir).expanduser().absolute() if tls_dir is not None else None
        opened = [open_store(url, tls_dir=tls) for url in stores]
        try:
            cls._check_new_stores(path, stores, opened)
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            key = os.urandom(KEY_BYTES)
            fd = os.open(path / KEY_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, key)
                os.fsync(fd)
            finally:
                os.close(fd)
            config = VaultConfig(
                format_version=FORMAT_VERSION,
                threshold=threshold,
                # a local store is recorded by its absolute path, a remote one as given
                stores=[s.url if s.local_path is not None else url for url, s in zip(stores, opened)],
                tls_dir=str(tls) if tls is not None else None,
            )
            write_config(path, config)
            manifest = Manifest.create(path / MANIFEST_NAME)
        finally:
            for s in opened:
                s.close()
        vault = cls(path, config, key, workers=workers, manifest=manifest)
        vault._core.lock.create()
        with vault._core.writing("init"):
            for x in range(1, vault.n + 1):  # each store learns whose and which it is
                vault._core.write_identity(x)
            vault._core.audit("init", k=threshold, n=len(stores))
        return vault

    @staticmethod
    def _check_new_stores(path: Path, urls: list[str], opened: list[Store]) -> None:
        seen: dict[str, str] = {}
        for url, store in zip(urls, opened):
            store.check()  # missing, unreadable or read-only: StoreError naming it
            ident = store.identity()
            if ident in seen:
                raise InvalidConfig(
                    f"stores {seen[ident]} and {url} are the same place; each of the n shares needs its own store"
                )
            seen[ident] = url
            local = store.local_path
            if local is not None and (local == path or path in local.parents):
                raise InvalidConfig(f"store {url} is inside the vault directory {path}; put stores elsewhere")
            if store.read_identity() is not None:
                raise InvalidConfig(
                    f"store {store.url} already belongs to a vault (it carries a store identity); give an empty "
                    f"directory, or a holder of its own, to each vault"
                )
            if next(iter(store.list()), None) is not None:
                raise InvalidConfig(
                    f"store {store.url} already holds share files (of another vault?); give an empty directory"
                )

    @classmethod
    def open(cls, path: str | Path, *, workers: int | None = None) -> Vault:
        """Open a vault; sweeps orphan shares and finishes pending deletions it can reach."""
        path = Path(path).expanduser().absolute()
        config = load_config(path)
        key_path = path / KEY_NAME
        try:
            key = key_path.read_bytes()
        except FileNotFoundError:
            raise InvalidConfig(
                f"{key_path} is missing: without it no share can be verified; "
                f"restore it from your backup of the vault directory"
            ) from None
        if len(key) != KEY_BYTES:
            raise InvalidConfig(f"{key_path} is damaged ({len(key)} bytes, expected {KEY_BYTES}); restore it")
        if not (path / MANIFEST_NAME).is_file():
            # Never start from an empty manifest: every share would then look like an orphan.
            raise InvalidConfig(
                f"{path / MANIFEST_NAME} is missing; restore it from your backup of the vault "
                f"directory (opening without it would treat every share as an orphan)"
            )
        if stat.S_IMODE(key_path.stat().st_mode) & 0o077:
            log.warning("vault key %s is readable by other users; run: chmod 600 %s", key_path, key_path)
        vault = cls(path, config, key, workers=workers)
        try:
            vault.store_problems = vault._core.check_identities()
            recovery.recover(vault._core)
        except BaseException:
            vault.close()
            raise
        return vault

    # -- people -----------------------------------------------------------------------------------
    def people(self) -> list[PersonRecord]:
        return [PersonRecord(*row) for row in self._core.manifest.people()]

    def person(self, person_id: str) -> PersonRecord:
        rows = self._core.manifest.people(person_id)
        if not rows:
            raise UnknownPerson(f"unknown person {person_id!r}; `facefed-client vault ls` lists this vault's people")
        return PersonRecord(*rows[0])

    def image_ids(self, person_id: str) -> list[str]:
        return self._core.manifest.image_ids(self.person(person_id).pseudonym)

    def sources(self) -> set[tuple[str, str]]:
        """(person id, source file name) of every image stored with a name: lets imports resume."""
        return self._core.manifest.sources()

    # -- writing ----------------------------------------------------------------------------------
    def put(self, person_id: str, data: bytes, *, source_name: str | None = None, allow_reenrol: bool = False) -> str:
        """Store one image of a person (original bytes, validated first); returns its image id."""
        return self.put_many([(person_id, data, source_name)], allow_reenrol=allow_reenrol)[0]

    def put_many(self, items: Sequence[tuple[str, bytes, str | None]], *, allow_reenrol: bool = False) -> list[str]:
        """Store several images at once (one fsync per store directory and one commit for the lot).

        All items are validated (fully decoded) before anything is written; on any failure nothing
        is kept. A person forgotten here (`facefed-client forget`) is refused unless `allow_reenrol`.
        Bytes already stored for the same person are not stored again: their id is the stored
        image's; bytes already stored for another person are refused (DuplicateImage names both).
        """
        self._check_open()
        return writing.put_many(self._core, items, allow_reenrol=allow_reenrol)

    def add_images(
        self, items: Sequence[tuple[str, bytes, str | None]], *, allow_reenrol: bool = False
    ) -> list[writing.PutOutcome]:
        """Like `put_many`, item by item: one `PutOutcome` per item (stored, duplicate, or refused
        with the reason); the good items of a batch are stored even when others are refused."""
        self._check_open()
        return writing.add_images(self._core, items, allow_reenrol=allow_reenrol)

    # -- reading ----------------------------------------------------------------------------------
    def get(self, image_id: str) -> bytes:
        """The original image bytes, rebuilt in memory from k valid shares."""
        self._check_open()
        return reading.get(self._core, image_id)

    def iter_images(self, image_ids: Iterable[str] | None = None) -> Iterator[tuple[str, str, bytes]]:
        """(person id, image id, bytes) for the given images (all when None), in order.

        Shares are fetched, verified and combined by a thread pool a bounded window ahead of the
        consumer (file reads, HMAC and the table lookups release the GIL for image-sized buffers).
        """
        self._check_open()
        yield from reading.iter_images(self._core, image_ids)

    # -- erasing, verifying, repairing ------------------------------------------------------------
    def erase(self, person_id: str, *, request_id: str | None = None) -> EraseReport:
        """Destroy every share of a person in every store and their manifest rows; audit it."""
        self._check_open()
        return maintenance.erase(self._core, person_id, request_id)

    def verify(self) -> VerifyReport:
        """Read and check every share; report missing, corrupt and orphan shares (changes nothing,
        except finishing pending deletions that can now be done)."""
        self._check_open()
        return maintenance.verify(self._core)

    def repair(self) -> RepairReport:
        """Regenerate missing and corrupt shares from k valid ones (the others are not touched),
        remove this vault's orphan shares and finish pending deletions."""
        self._check_open()
        return maintenance.repair(self._core)

    def remap(self, *, apply: bool = False) -> list[tuple[int, str]]:
        """Which store holds which x, from their identity records: [(x, url)]. With `apply`, rewrite
        vault.toml in that order (after stores were swapped or reordered); reopen the vault after."""
        self._check_open()
        return maintenance.remap(self._core, apply)

    def pending_deletions(self, request_id: str | None = None) -> int:
        """Shares of erased people still waiting for a store (of one erase request, or all)."""
        return sum(
            1 for p in self._core.manifest.pending_deletions() if request_id is None or p.request_id == request_id
        )

    # -- misc -------------------------------------------------------------------------------------
    def store_health(self) -> list[StoreHealth]:
        return maintenance.store_health(self._core)

    def audit_entries(self) -> list[dict[str, object]]:
        return audit.read_entries(self._core.audit_path)

    def _check_open(self) -> None:
        if self._closed:
            raise VaultError(f"vault {self.path} is closed")

    def close(self) -> None:
        self._close(wait=True)

    def _close(self, wait: bool) -> None:
        if self._closed:
            return
        self._closed = True
        self._core.close(wait)

    def __enter__(self) -> Vault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Not waiting for the pool: the last reference may be dropped by one of its own threads.
        try:
            self._close(wait=False)
        except Exception:  # noqa: BLE001 - interpreter shutdown; nothing useful to do
            pass
