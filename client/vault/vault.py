"""A site's face vault: images kept only as Shamir shares over n stores, any k of which rebuild them.

Layout of the vault directory (the stores live elsewhere, ideally on separate disks or hosts):
    vault.toml        threshold k and store URLs in x-coordinate order
    key               32 random bytes, mode 0600: HMAC key for share tags (never leaves the site)
    manifest.sqlite   see `manifest.py`
    audit.log         hash-chained record of erasures (pseudonyms only)
    locks/            one flock'ed file per live writer process

Crash safety: a put commits "pending write" rows before writing any share, writes all n shares
durably, then commits the image rows and clears the pending rows in one transaction. A put that
fails deletes what it wrote; one that is killed leaves pending rows whose writer lock is free, and
the next `open` deletes those shares. Any other unreferenced share that carries this vault's tag is
an orphan and is swept at open too. Erase first moves the person's shares to "pending deletions"
and drops their rows (one transaction), then destroys the files; whatever a store could not destroy
stays pending and is retried by `open`, `verify` and `repair`.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import secrets
import stat
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path

from facefed.client.vault import audit
from facefed.client.vault.config import CONFIG_NAME, VaultConfig, load_config, write_config
from facefed.client.vault.errors import (
    CorruptShare,
    InvalidConfig,
    InvalidImage,
    NotEnoughShares,
    UnknownImage,
    UnknownPerson,
    VaultError,
)
from facefed.client.vault.manifest import ConcurrentPersonCreation, ImageInfo, Manifest, NewImage
from facefed.client.vault.reports import (
    EraseReport,
    ImageProblem,
    OrphanShare,
    PersonRecord,
    RepairReport,
    ShareProblem,
    StoreHealth,
    VerifyReport,
)
from facefed.client.vault.sharefile import (
    LEN_PREFIX,
    ShareFormatError,
    ShareHeader,
    ShareKeys,
    bucket,
    seal,
    unseal,
    unseal_expected,
)
from facefed.client.vault.stores.base import (
    LocalDirStore,
    ShareNotFound,
    Store,
    StoreError,
    StoreUnavailable,
    open_store,
)
from facefed.client.vault.tombstones import lift_tombstones, tombstoned
from facefed.client.vault.validate import check_image, check_person_id, check_request_id
from facefed.common.shamir import MAX_SHARES, Share, combine, random_bytes, regenerate, split

log = logging.getLogger("facefed.vault")

KEY_NAME = "key"
MANIFEST_NAME = "manifest.sqlite"
AUDIT_NAME = "audit.log"
LOCKS_NAME = "locks"
KEY_BYTES = 32
DEFAULT_WORKERS = 4
_DOWN_RETRY_S = 30.0  # after a store is found unreachable, try the others first for this long
_TOKEN_RE = re.compile(r"^[0-9a-f]{16}$")
_MAX_SOURCE_NAME = 255


class Vault:
    """Open with `Vault.open(path)` or make with `Vault.create(...)`; use as a context manager."""

    def __init__(self, path: Path, config: VaultConfig, key: bytes, *, workers: int | None = None):
        self.path = path
        self.config = config
        self.k = config.threshold
        self.n = len(config.stores)
        self.tls_dir = Path(config.tls_dir) if config.tls_dir else None
        self.stores: list[Store] = [open_store(url, tls_dir=self.tls_dir) for url in config.stores]
        self._keys = ShareKeys(key)
        self._manifest = Manifest(path / MANIFEST_NAME)
        self._audit_path = path / AUDIT_NAME
        self._workers = None if workers is None else max(1, workers)  # None: decided by CPUs and store kinds
        self._pool: ThreadPoolExecutor | None = None
        self._writer: str | None = None
        self._writer_fd: int | None = None
        self._down_until = [0.0] * self.n
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
                threshold=threshold,
                stores=[s.url if isinstance(s, LocalDirStore) else url for url, s in zip(stores, opened)],
                tls_dir=str(tls) if tls is not None else None,
            )
            write_config(path, config)
        finally:
            for s in opened:
                getattr(s, "close", lambda: None)()
        vault = cls(path, config, key, workers=workers)
        vault._audit("init", k=threshold, n=len(stores))
        return vault

    @staticmethod
    def _check_new_stores(path: Path, urls: list[str], opened: list[Store]) -> None:
        seen: dict[str, str] = {}
        for url, store in zip(urls, opened):
            store.check()  # missing, unreadable or read-only: StoreError naming it
            ident = os.path.realpath(store.url) if isinstance(store, LocalDirStore) else store.url
            if ident in seen:
                raise InvalidConfig(
                    f"stores {seen[ident]} and {url} are the same place; each of the n shares needs its own store"
                )
            seen[ident] = url
            if isinstance(store, LocalDirStore) and (store.path == path or path in store.path.parents):
                raise InvalidConfig(f"store {url} is inside the vault directory {path}; put stores elsewhere")
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
            vault._recover()
        except BaseException:
            vault.close()
            raise
        return vault

    def _recover(self) -> None:
        self._sweep_dead_writers()
        self._retry_pending_deletions()
        orphans, _ = self._find_orphans()
        self._remove_orphans(orphans)
        for store in self.stores:
            sweep = getattr(store, "sweep_temp", None)
            if sweep is not None:
                sweep()

    # -- people -----------------------------------------------------------------------------------
    def people(self) -> list[PersonRecord]:
        return [PersonRecord(*row) for row in self._manifest.people()]

    def person(self, person_id: str) -> PersonRecord:
        rows = self._manifest.people(person_id)
        if not rows:
            raise UnknownPerson(f"unknown person {person_id!r}; `facefed-client vault ls` lists this vault's people")
        return PersonRecord(*rows[0])

    def image_ids(self, person_id: str) -> list[str]:
        return self._manifest.image_ids(self.person(person_id).pseudonym)

    def sources(self) -> set[tuple[str, str]]:
        """(person id, source file name) of every image stored with a name: lets imports resume."""
        return self._manifest.sources()

    # -- writing ----------------------------------------------------------------------------------
    def put(self, person_id: str, data: bytes, *, source_name: str | None = None, allow_reenrol: bool = False) -> str:
        """Store one image of a person (original bytes, validated first); returns its image id."""
        return self.put_many([(person_id, data, source_name)], allow_reenrol=allow_reenrol)[0]

    def put_many(self, items: Sequence[tuple[str, bytes, str | None]], *, allow_reenrol: bool = False) -> list[str]:
        """Store several images at once (one fsync per store directory and one commit for the lot).

        All items are validated before anything is written; on any failure nothing is kept.
        A person forgotten here (`facefed-client forget`) is refused unless `allow_reenrol`.
        """
        self._check_open()
        checked = []
        for person_id, data, source_name in items:
            check_person_id(person_id)
            if source_name is not None and not isinstance(source_name, str):
                raise ValueError(f"source name must be a string, got {type(source_name).__name__}")
            if source_name is not None and not (source_name.isprintable() and 0 < len(source_name) <= _MAX_SOURCE_NAME):
                raise ValueError(f"source name {source_name[:80]!r} must be 1..{_MAX_SOURCE_NAME} printable characters")
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise InvalidImage(f"image of person {person_id}: expected bytes, got {type(data).__name__}")
            data = bytes(data)
            check_image(data, source_name or f"image of person {person_id}")
            checked.append((person_id, data, source_name))
        if not checked:
            return []
        forgotten = tombstoned(self.path, [pid for pid, _, _ in checked])
        if forgotten and not allow_reenrol:
            raise VaultError(
                f"person {forgotten[0]!r} asked to be forgotten at this site; nothing was stored. "
                f"Enrol them again only with their new consent, using --allow-reenrol"
            )
        self._ensure_writer()
        pseudonyms: dict[str, str] = {}
        for person_id, _, _ in checked:
            if person_id not in pseudonyms:
                pseudonyms[person_id] = self._manifest.pseudonym(person_id) or secrets.token_hex(16)
        plans = [
            NewImage(
                image_id=secrets.token_hex(16),
                person_id=pid,
                pseudonym=pseudonyms[pid],
                size=len(data),
                padded=bucket(LEN_PREFIX.size + len(data)),
                source_name=src,
                shares={x: secrets.token_hex(16) for x in range(1, self.n + 1)},
            )
            for pid, data, src in checked
        ]
        all_shares = [(x, sid) for plan in plans for x, sid in plan.shares.items()]
        assert self._writer is not None
        self._manifest.add_pending_writes(self._writer, all_shares)
        try:
            self._write_all(self._seal_batch(plans, [data for _, data, _ in checked]))
            self._manifest.commit_images(plans)
        except BaseException as e:
            gone, _ = self._delete_shares(all_shares)
            self._manifest.drop_pending_writes(gone)
            if isinstance(e, ConcurrentPersonCreation):
                raise VaultError(
                    f"person {e.args[0]!r} was added by another process at the same moment; "
                    f"nothing was stored, run the command again"
                ) from None
            raise
        if forgotten:  # enrolled again by the operator's explicit choice: later imports need no flag
            lift_tombstones(self.path, forgotten)
        return [plan.image_id for plan in plans]

    def _seal_batch(self, plans: list[NewImage], images: list[bytes]) -> list[list[tuple[str, bytes]]]:
        """Share files for a batch, per store. Each image is split on its own: one big split would
        save call overhead but its buffers (> 128 KiB) come from fresh mmaps and page faults cost more."""
        per_store: list[list[tuple[str, bytes]]] = [[] for _ in range(self.n)]
        for plan, data in zip(plans, images):
            framed = LEN_PREFIX.pack(len(data)) + data
            pad = plan.padded - len(framed)
            pads = random_bytes(self.n * pad)
            owner = self._keys.owner(plan.pseudonym)
            for i, share in enumerate(split(framed, self.n, self.k)):
                header = ShareHeader(share.x, self.k, self.n, plan.shares[share.x], plan.image_id, owner, plan.padded)
                blob = seal(self._keys, header, share.data, pads[i * pad : (i + 1) * pad])
                per_store[i].append((plan.shares[share.x], blob))
        return per_store

    def _write_all(self, per_store: list[list[tuple[str, bytes]]]) -> None:
        def write(i: int) -> None:
            store, items = self.stores[i], per_store[i]
            put_many = getattr(store, "put_many", None)
            if put_many is not None:
                put_many(items)
            else:
                for share_id, blob in items:
                    store.put(share_id, blob)

        futures = [self._executor().submit(write, i) for i in range(self.n)]
        errors = []
        for f in futures:  # wait for every store before any cleanup starts
            try:
                f.result()
            except Exception as e:  # noqa: BLE001 - re-raised below
                errors.append(e)
        if errors:
            raise errors[0]

    # -- reading ----------------------------------------------------------------------------------
    def get(self, image_id: str) -> bytes:
        """The original image bytes, rebuilt in memory from k valid shares."""
        self._check_open()
        info = self._manifest.image(image_id)
        if info is None:
            raise UnknownImage(f"unknown image {image_id!r}; list a person's images with Vault.image_ids")
        return self._read(info)

    def iter_images(self, image_ids: Iterable[str] | None = None) -> Iterator[tuple[str, str, bytes]]:
        """(person id, image id, bytes) for the given images (all when None), in order.

        Shares are fetched, verified and combined by a thread pool a bounded window ahead of the
        consumer (file reads, HMAC and the table lookups release the GIL for image-sized buffers).
        """
        self._check_open()
        if image_ids is None:
            infos = self._manifest.images()
        else:
            wanted = list(image_ids)
            by_id = {info.image_id: info for info in self._manifest.images(wanted)}
            unknown = [i for i in wanted if i not in by_id]
            if unknown:
                raise UnknownImage(f"{len(unknown)} unknown image id(s), e.g. {unknown[0]!r}")
            infos = [by_id[i] for i in wanted]
        if any(hasattr(s, "get_many") for s in self.stores):
            yield from self._iter_batched(infos)
            return
        if self._read_threads() <= 1:
            # One CPU and local stores: threads would only add GIL hand-offs; read in line.
            for info in infos:
                yield info.person_id, info.image_id, self._read(info)
            return
        pool = self._executor()
        it = iter(infos)
        window: deque = deque((info, pool.submit(self._read, info)) for info in islice(it, 4 * self._read_threads()))
        try:
            while window:
                info, future = window.popleft()
                data = future.result()
                nxt = next(it, None)
                if nxt is not None:
                    window.append((nxt, pool.submit(self._read, nxt)))
                yield info.person_id, info.image_id, data
        finally:
            for _, future in window:
                future.cancel()

    def _iter_batched(self, infos: Sequence[ImageInfo], window: int = 32) -> Iterator[tuple[str, str, bytes]]:
        """Reads for stores that answer many shares per call (remote holders): a network call costs far
        more than its payload, so each window of images is fetched with one `get_many` per store from
        the k stores tried first, the next window is fetched while this one is combined, and anything
        missing, corrupt or unreachable falls back to `_read`'s per-share path (same checks, same errors)."""
        pool = self._executor()
        # Fetches get their own threads: a fetch waits on its per-store calls, which must never queue
        # behind it in a pool it occupies (with one worker that would deadlock).
        fetchers = ThreadPoolExecutor(max_workers=self.k + 1, thread_name_prefix="vault-fetch")

        def fetch(chunk: Sequence[ImageInfo]) -> dict[int, dict[str, bytes]]:
            now = time.monotonic()
            xs = sorted(range(1, self.n + 1), key=lambda x: (self._down_until[x - 1] > now, x))[: self.k]

            def one(x: int) -> dict[str, bytes]:
                ids = [info.shares[x] for info in chunk if x in info.shares]
                store = self.stores[x - 1]
                try:
                    return store.get_many(ids) if hasattr(store, "get_many") else {}
                except StoreUnavailable:
                    self._down_until[x - 1] = time.monotonic() + _DOWN_RETRY_S
                except StoreError as e:
                    log.warning("batched read from %s failed, reading share by share: %s", store.url, e)
                return {}

            return dict(zip(xs, fetchers.map(one, xs)))

        chunks = [infos[i : i + window] for i in range(0, len(infos), window)]
        try:
            pending = fetchers.submit(fetch, chunks[0]) if chunks else None
            for i, chunk in enumerate(chunks):
                prefetched = pending.result()
                pending = fetchers.submit(fetch, chunks[i + 1]) if i + 1 < len(chunks) else None
                for info, data in zip(chunk, pool.map(lambda info: self._read(info, prefetched), chunk)):
                    yield info.person_id, info.image_id, data
        finally:
            fetchers.shutdown(wait=False, cancel_futures=True)

    def _load_share(self, info: ImageInfo, x: int, prefetched: dict[int, dict[str, bytes]] | None = None) -> memoryview:
        """One verified share payload; raises ShareNotFound, StoreError or ShareFormatError."""
        share_id = info.shares.get(x)
        if share_id is None:
            raise ShareNotFound(f"no share x={x} recorded")
        blob = (prefetched or {}).get(x, {}).get(share_id)
        if blob is None:  # not prefetched (or that fetch failed): ask the store itself
            blob = self.stores[x - 1].get(share_id)
        return unseal_expected(
            self._keys, blob, share_id=share_id, image_id=info.image_id, x=x, k=self.k, n=self.n, padded=info.padded
        )

    def _read(self, info: ImageInfo, prefetched: dict[int, dict[str, bytes]] | None = None) -> bytes:
        now = time.monotonic()
        order: Iterable[int] = range(1, self.n + 1)
        if any(t > now for t in self._down_until):  # stores that were just unreachable go last
            order = sorted(order, key=lambda x: (self._down_until[x - 1] > now, x))
        valid: list[tuple[int, memoryview]] = []
        notes: list[str] = []
        for x in order:
            if len(valid) == self.k:
                break
            url = self.stores[x - 1].url
            try:
                valid.append((x, self._load_share(info, x, prefetched)))
                self._down_until[x - 1] = 0.0
            except ShareNotFound:
                notes.append(f"store {url}: share missing")
            except StoreUnavailable:
                self._down_until[x - 1] = now + _DOWN_RETRY_S
                notes.append(f"store {url}: unreachable")
            except StoreError as e:
                notes.append(str(e))
            except ShareFormatError as e:
                log.warning("corrupt share x=%d of image %s in store %s skipped: %s", x, info.image_id, url, e)
                notes.append(f"store {url}: corrupt share ({e})")
        if len(valid) < self.k:
            raise NotEnoughShares(
                f"image {info.image_id} of person {info.person_id}: {len(valid)} of {self.k} required shares "
                f"valid ({'; '.join(notes)}); bring the stores back or restore them, then run `vault repair`"
            )
        return self._combine(info, valid)

    def _combine(self, info: ImageInfo, valid: Sequence[tuple[int, memoryview]]) -> bytes:
        # One pass over prefix + image (the manifest knows the size); the prefix then cross-checks it.
        end = LEN_PREFIX.size + info.size
        if end > info.padded:
            raise CorruptShare(f"image {info.image_id}: manifest size {info.size} exceeds its bucket {info.padded}")
        secret = combine([Share(x, bytearray(p[:end])) for x, p in valid])
        (length,) = LEN_PREFIX.unpack_from(secret)
        if length != info.size:
            raise CorruptShare(
                f"image {info.image_id} of person {info.person_id}: valid shares combine to "
                f"{length} bytes, manifest says {info.size}; run `facefed-client vault verify`"
            )
        return secret[LEN_PREFIX.size :]

    # -- erasing ----------------------------------------------------------------------------------
    def erase(self, person_id: str, *, request_id: str | None = None) -> EraseReport:
        """Destroy every share of a person in every store and their manifest rows; audit it."""
        self._check_open()
        check_person_id(person_id)
        request_id = check_request_id(request_id) if request_id is not None else uuid.uuid4().hex
        try:
            pseudonym, pending = self._manifest.begin_erase(person_id, request_id)
        except KeyError:
            raise UnknownPerson(
                f"unknown person {person_id!r}; `facefed-client vault ls` lists this vault's people"
            ) from None
        gone, failed = self._delete_shares([(p.x, p.share_id) for p in pending])
        self._manifest.finish_deletions(gone)
        gone_set = set(gone)
        destroyed: dict[str, int] = {}
        for p in pending:
            destroyed[p.image_id] = destroyed.get(p.image_id, 0) + ((p.x, p.share_id) in gone_set)
        # With n-k+1 of its shares gone, fewer than k remain anywhere: the image cannot be rebuilt.
        unrecoverable = all(count >= self.n - self.k + 1 for count in destroyed.values())
        report = EraseReport(
            request_id=request_id,
            pseudonym=pseudonym,
            images=len(destroyed),
            shares_destroyed=len(gone),
            shares_pending=len(pending) - len(gone),
            unreachable_stores=sorted(failed),
            unrecoverable=unrecoverable,
        )
        self._audit(
            "erase",
            request_id=request_id,
            pseudonym=pseudonym,
            images=report.images,
            shares_destroyed=report.shares_destroyed,
            shares_pending=report.shares_pending,
            unrecoverable=unrecoverable,
        )
        return report

    def _delete_shares(self, shares: Iterable[tuple[int, str]]) -> tuple[list[tuple[int, str]], set[str]]:
        """Delete shares store by store in parallel; (confirmed gone, urls of stores that failed)."""
        by_x: dict[int, list[str]] = {}
        for x, sid in shares:
            by_x.setdefault(x, []).append(sid)

        def work(x: int) -> tuple[list[tuple[int, str]], str | None]:
            store, done = self.stores[x - 1], []
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
        for done, url in self._executor().map(work, sorted(by_x)):
            gone += done
            if url is not None:
                failed.add(url)
        return gone, failed

    def _retry_pending_deletions(self) -> tuple[int, int]:
        pending = self._manifest.pending_deletions()
        if not pending:
            return 0, 0
        gone, _ = self._delete_shares([(p.x, p.share_id) for p in pending])
        self._manifest.finish_deletions(gone)
        gone_set = set(gone)
        groups: dict[tuple[str, str], list[int]] = {}
        for p in pending:
            g = groups.setdefault((p.request_id, p.pseudonym), [0, 0])
            g[0 if (p.x, p.share_id) in gone_set else 1] += 1
        for (request_id, pseudonym), (done, left) in groups.items():
            if done:
                self._audit(
                    "erase_resumed",
                    request_id=request_id,
                    pseudonym=pseudonym,
                    shares_destroyed=done,
                    shares_pending=left,
                )
        return len(gone), len(pending) - len(gone)

    # -- orphans and dead writers -----------------------------------------------------------------
    def _locks_dir(self) -> Path:
        return self.path / LOCKS_NAME

    def _ensure_writer(self) -> None:
        if self._writer is not None:
            return
        self._locks_dir().mkdir(mode=0o700, exist_ok=True)
        token = secrets.token_hex(8)
        fd = os.open(self._locks_dir() / f"{token}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held until close or process death
        self._writer, self._writer_fd = token, fd

    def _writer_dead(self, token: str) -> bool:
        """True if the process that owned `token` is gone (its flock was released by the kernel)."""
        if token == self._writer or not _TOKEN_RE.match(token):
            return False
        try:
            fd = os.open(self._locks_dir() / f"{token}.lock", os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)

    def _sweep_dead_writers(self) -> None:
        for token in self._manifest.pending_writers():
            if not self._writer_dead(token):
                continue
            rows = self._manifest.pending_writes_of(token)
            gone, _ = self._delete_shares(rows)
            self._manifest.drop_pending_writes(gone)
            if len(gone) == len(rows):
                try:
                    os.unlink(self._locks_dir() / f"{token}.lock")
                except OSError:
                    pass
            log.info("removed %d share(s) of an interrupted write", len(gone))

    def _find_orphans(self) -> tuple[list[OrphanShare], list[StoreHealth]]:
        """Shares in stores that the manifest does not know. Stores are listed *before* the
        manifest is read: a concurrent put commits its pending rows before writing, so any file
        seen here that belongs to a live write is already in the manifest read afterwards."""
        listings: dict[int, list[str]] = {}
        health: list[StoreHealth] = []
        for x, store in enumerate(self.stores, start=1):
            try:
                listings[x] = list(store.list())
                health.append(StoreHealth(x, store.url, True, len(listings[x])))
            except StoreError as e:
                health.append(StoreHealth(x, store.url, False, 0, str(e)))
        refs = self._manifest.referenced()
        orphans = []
        for x, ids in listings.items():
            for sid in sorted(set(ids) - refs.get(x, set())):
                try:
                    blob = self.stores[x - 1].get(sid)
                except (ShareNotFound, StoreError):
                    continue  # gone meanwhile, or unreadable: not ours to judge now
                try:
                    unseal(self._keys, blob)
                    ours = True
                except ShareFormatError:
                    ours = False
                orphans.append(OrphanShare(x, self.stores[x - 1].url, sid, ours))
        return orphans, health

    def _remove_orphans(self, orphans: list[OrphanShare]) -> int:
        """Delete the orphans that carry this vault's tag; a foreign file is reported, never deleted."""
        ours = [(o.x, o.share_id) for o in orphans if o.ours]
        if not ours:
            return 0
        gone, _ = self._delete_shares(ours)
        log.info("swept %d orphan share(s)", len(gone))
        return len(gone)

    # -- verify and repair ------------------------------------------------------------------------
    def _check(self, info: ImageInfo) -> tuple[list[int], list[ShareProblem], ImageProblem | None, ImageProblem | None]:
        """(valid xs, share problems, unrecoverable, inconsistent) for one image."""
        valid: list[tuple[int, memoryview]] = []
        problems: list[ShareProblem] = []
        for x in range(1, self.n + 1):
            store, sid = self.stores[x - 1], info.shares.get(x, "")

            def problem(kind: str, detail: str = "") -> ShareProblem:
                return ShareProblem(info.image_id, info.person_id, x, store.url, sid, kind, detail)

            try:
                valid.append((x, self._load_share(info, x)))
            except ShareNotFound:
                problems.append(problem("missing"))
            except StoreUnavailable as e:
                problems.append(problem("unreachable", str(e)))
            except StoreError as e:
                problems.append(problem("unreadable", str(e)))
            except ShareFormatError as e:
                problems.append(problem("corrupt", str(e)))
        xs = [x for x, _ in valid]
        if len(valid) < self.k:
            return (
                xs,
                problems,
                ImageProblem(
                    info.image_id, info.person_id, f"{len(valid)} of {self.k} required shares valid: cannot be rebuilt"
                ),
                None,
            )
        try:
            first = self._combine(info, valid[: self.k])
            if len(valid) > self.k and self._combine(info, valid[-self.k :]) != first:
                raise CorruptShare("different share subsets rebuild different images")
        except CorruptShare as e:
            return xs, problems, None, ImageProblem(info.image_id, info.person_id, str(e))
        return xs, problems, None, None

    def _scan(self) -> tuple[VerifyReport, dict[str, tuple[ImageInfo, list[int], list[ShareProblem]]]]:
        report = VerifyReport()
        report.orphans, report.stores = self._find_orphans()
        infos = self._manifest.images()
        report.images = len(infos)
        todo: dict[str, tuple[ImageInfo, list[int], list[ShareProblem]]] = {}
        for info, (xs, problems, lost, mixed) in zip(infos, self._executor().map(self._check, infos)):
            report.shares_ok += len(xs)
            for p in problems:
                {"missing": report.missing, "corrupt": report.corrupt}.get(p.problem, report.unreachable).append(p)
            if lost:
                report.unrecoverable.append(lost)
            if mixed:
                report.inconsistent.append(mixed)
            if problems and not lost and not mixed:
                todo[info.image_id] = (info, xs, problems)
        return report, todo

    def verify(self) -> VerifyReport:
        """Read and check every share; report missing, corrupt and orphan shares (changes nothing,
        except finishing pending deletions that can now be done)."""
        self._check_open()
        _, left = self._retry_pending_deletions()
        report, _ = self._scan()
        report.pending_deletions = left
        try:
            status = audit.verify_audit_chain(self._audit_path, self._manifest.get_meta("audit_head"))
            report.audit_entries = status.entries
        except VaultError as e:
            report.audit_error = str(e)
        return report

    def repair(self) -> RepairReport:
        """Regenerate missing and corrupt shares from k valid ones (the others are not touched),
        remove this vault's orphan shares and finish pending deletions."""
        self._check_open()
        rep = RepairReport()
        rep.pending_deletions_finished, rep.pending_deletions_left = self._retry_pending_deletions()
        scan, todo = self._scan()
        rep.unrecoverable, rep.inconsistent = scan.unrecoverable, scan.inconsistent
        rep.orphans_removed = self._remove_orphans(scan.orphans)
        rep.foreign_orphans = [o for o in scan.orphans if not o.ours]
        for info, xs, problems in todo.values():
            sources = [Share(x, bytes(self._load_share(info, x))) for x in xs[: self.k]]
            owner = self._keys.owner(info.pseudonym)
            for p in problems:
                if p.problem not in ("missing", "corrupt"):
                    rep.not_repaired.append(p)
                    continue
                new = regenerate(sources, p.x)
                # Defensive: the regenerated share must rebuild the same image with k-1 of the others.
                check = [new] + sources[: self.k - 1]
                if combine(check) != combine(sources):
                    raise CorruptShare(f"image {info.image_id}: regenerated share x={p.x} does not match; not written")
                header = ShareHeader(p.x, self.k, self.n, p.share_id, info.image_id, owner, info.padded)
                try:
                    self.stores[p.x - 1].put(p.share_id, seal(self._keys, header, new.data, b""))
                    rep.regenerated.append(p)
                except StoreError as e:
                    rep.not_repaired.append(
                        ShareProblem(p.image_id, p.person_id, p.x, p.store, p.share_id, p.problem, f"write failed: {e}")
                    )
        if rep.regenerated or rep.orphans_removed:
            self._audit("repair", shares_regenerated=len(rep.regenerated), orphans_removed=rep.orphans_removed)
        return rep

    # -- misc -------------------------------------------------------------------------------------
    def store_health(self) -> list[StoreHealth]:
        out = []
        for x, store in enumerate(self.stores, start=1):
            try:
                st = store.stat()
                out.append(StoreHealth(x, store.url, True, st.shares))
            except StoreError as e:
                out.append(StoreHealth(x, store.url, False, 0, str(e)))
        return out

    def audit_entries(self) -> list[dict]:
        return audit.read_entries(self._audit_path)

    def _audit(self, event: str, **fields) -> None:
        head = audit.append(self._audit_path, event, **fields)
        self._manifest.set_meta("audit_head", head)

    def _read_threads(self) -> int:
        """Reader threads worth having: remote stores gain from overlapping network waits even on
        one core; local reads are CPU work (page cache, HMAC, table lookups), so one per CPU."""
        if self._workers is not None:
            return self._workers
        if not all(isinstance(s, LocalDirStore) for s in self.stores):
            return 2 * DEFAULT_WORKERS
        return max(1, min(DEFAULT_WORKERS, len(os.sched_getaffinity(0))))

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=max(self._read_threads(), self.n), thread_name_prefix="vault")
        return self._pool

    def _check_open(self) -> None:
        if self._closed:
            raise VaultError(f"vault {self.path} is closed")

    def close(self) -> None:
        self._close(wait=True)

    def _close(self, wait: bool) -> None:
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=True)
        if self._writer_fd is not None:
            assert self._writer is not None
            if not self._manifest.pending_writes_of(self._writer):
                try:
                    os.unlink(self._locks_dir() / f"{self._writer}.lock")
                except OSError:
                    pass
            os.close(self._writer_fd)  # releases the flock
            self._writer_fd = None
        self._manifest.close()
        for store in self.stores:
            getattr(store, "close", lambda: None)()

    def __enter__(self) -> Vault:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        # Not waiting for the pool: the last reference may be dropped by one of its own threads.
        try:
            self._close(wait=False)
        except Exception:  # noqa: BLE001 - interpreter shutdown; nothing useful to do
            pass
