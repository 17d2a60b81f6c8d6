"""Reading images back: k verified shares per image, combined in memory.

Three strategies (docs/vault.md, "Reading"): in line (one CPU, local stores), a thread pool a bounded
window ahead of the consumer, and batched windows for stores with a `prefetch_window` (remote holders)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice

from facefed.client.vault.core import VaultCore, log
from facefed.client.vault.errors import CorruptShare, NotEnoughShares, UnknownImage
from facefed.client.vault.manifest import ImageInfo
from facefed.client.vault.sharefile import LEN_PREFIX, ShareFormatError, unseal_expected
from facefed.client.vault.stores import ShareNotFound, StoreError, StoreUnavailable
from facefed.common.shamir import Share, combine

Prefetched = dict[int, dict[str, bytes]]  # x -> share id -> bytes


def get(core: VaultCore, image_id: str) -> bytes:
    info = core.manifest.image(image_id)
    if info is None:
        raise UnknownImage(f"unknown image {image_id!r}; list a person's images with Vault.image_ids")
    return read(core, info)


def iter_images(core: VaultCore, image_ids: Iterable[str] | None) -> Iterator[tuple[str, str, bytes]]:
    if image_ids is None:
        infos = core.manifest.images()
    else:
        wanted = list(image_ids)
        by_id = {info.image_id: info for info in core.manifest.images(wanted)}
        unknown = [i for i in wanted if i not in by_id]
        if unknown:
            raise UnknownImage(f"{len(unknown)} unknown image id(s), e.g. {unknown[0]!r}")
        infos = [by_id[i] for i in wanted]
    window = max(s.prefetch_window for s in core.stores)
    if window > 0:
        yield from _iter_batched(core, infos, window)
        return
    if core.read_threads() <= 1:
        # One CPU and local stores: threads would only add GIL hand-offs; read in line.
        for info in infos:
            yield info.person_id, info.image_id, read(core, info)
        return
    pool = core.executor()
    it = iter(infos)
    ahead: deque[tuple[ImageInfo, Future[bytes]]] = deque(
        (info, pool.submit(read, core, info)) for info in islice(it, 4 * core.read_threads())
    )
    try:
        while ahead:
            info, future = ahead.popleft()
            data = future.result()
            nxt = next(it, None)
            if nxt is not None:
                ahead.append((nxt, pool.submit(read, core, nxt)))
            yield info.person_id, info.image_id, data
    finally:
        for _, future in ahead:
            future.cancel()


def _iter_batched(core: VaultCore, infos: Sequence[ImageInfo], window: int) -> Iterator[tuple[str, str, bytes]]:
    """Reads for stores that answer many shares per call (remote holders): a network call costs far
    more than its payload, so each window of images is fetched with one `get_many` per store from
    the k stores tried first, the next window is fetched while this one is combined, and anything
    missing, corrupt or unreachable falls back to `read`'s per-share path (same checks, same errors)."""
    pool = core.executor()
    # Fetches get their own threads: a fetch waits on its per-store calls, which must never queue
    # behind it in a pool it occupies (with one worker that would deadlock).
    fetchers = ThreadPoolExecutor(max_workers=core.k + 1, thread_name_prefix="vault-fetch")

    def fetch(chunk: Sequence[ImageInfo]) -> Prefetched:
        now = time.monotonic()
        xs = sorted(range(1, core.n + 1), key=lambda x: (core.down_until[x - 1] > now, x))[: core.k]

        def one(x: int) -> dict[str, bytes]:
            ids = [info.shares[x] for info in chunk if x in info.shares]
            store = core.stores[x - 1]
            try:
                return store.get_many(ids) if store.prefetch_window else {}
            except StoreUnavailable:
                core.mark_down(x)
            except StoreError as e:
                log.warning("batched read from %s failed, reading share by share: %s", store.url, e)
            return {}

        return dict(zip(xs, fetchers.map(one, xs)))

    def read_with(prefetched: Prefetched) -> Callable[[ImageInfo], bytes]:
        return lambda info: read(core, info, prefetched)

    chunks = [infos[i : i + window] for i in range(0, len(infos), window)]
    try:
        pending = fetchers.submit(fetch, chunks[0]) if chunks else None
        for i, chunk in enumerate(chunks):
            assert pending is not None
            prefetched = pending.result()
            pending = fetchers.submit(fetch, chunks[i + 1]) if i + 1 < len(chunks) else None
            for info, data in zip(chunk, pool.map(read_with(prefetched), chunk)):
                yield info.person_id, info.image_id, data
    finally:
        fetchers.shutdown(wait=False, cancel_futures=True)


def load_share(core: VaultCore, info: ImageInfo, x: int, prefetched: Prefetched | None = None) -> memoryview:
    """One verified share payload; raises ShareNotFound, StoreError or ShareFormatError."""
    share_id = info.shares.get(x)
    if share_id is None:
        raise ShareNotFound(f"no share x={x} recorded")
    blob = (prefetched or {}).get(x, {}).get(share_id)
    if blob is None:  # not prefetched (or that fetch failed): ask the store itself
        blob = core.stores[x - 1].get(share_id)
    return unseal_expected(
        core.keys, blob, share_id=share_id, image_id=info.image_id, x=x, k=core.k, n=core.n, padded=info.padded
    )


def read(core: VaultCore, info: ImageInfo, prefetched: Prefetched | None = None) -> bytes:
    """One image from the first k valid shares; stores just found unreachable are tried last."""
    now = time.monotonic()
    order: Iterable[int] = range(1, core.n + 1)
    if any(t > now for t in core.down_until):  # stores that were just unreachable go last
        order = sorted(order, key=lambda x: (core.down_until[x - 1] > now, x))
    valid: list[tuple[int, memoryview]] = []
    notes: list[str] = []
    for x in order:
        if len(valid) == core.k:
            break
        url = core.stores[x - 1].url
        try:
            valid.append((x, load_share(core, info, x, prefetched)))
            core.down_until[x - 1] = 0.0
        except ShareNotFound:
            notes.append(f"store {url}: share missing")
        except StoreUnavailable:
            core.mark_down(x, now)
            notes.append(f"store {url}: unreachable")
        except StoreError as e:
            notes.append(str(e))
        except ShareFormatError as e:
            log.warning("corrupt share x=%d of image %s in store %s skipped: %s", x, info.image_id, url, e)
            notes.append(f"store {url}: corrupt share ({e})")
    if len(valid) < core.k:
        raise NotEnoughShares(
            f"image {info.image_id} of person {info.person_id}: {len(valid)} of {core.k} required shares "
            f"valid ({'; '.join(notes)}); bring the stores back or restore them, then run `vault repair`"
        )
    return combine_shares(info, valid)


def combine_shares(info: ImageInfo, valid: Sequence[tuple[int, memoryview]]) -> bytes:
    """The image from k share payloads; the length prefix inside the secret cross-checks the manifest."""
    # One pass over prefix + image (the manifest knows the size); the prefix then cross-checks it.
    end = LEN_PREFIX.size + info.size
    if end > info.padded:
        raise CorruptShare(f"image {info.image_id}: manifest size {info.size} exceeds its bucket {info.padded}")
    # bytearray copies as before the split (Share.data is typed bytes; combine reads any buffer)
    secret = combine([Share(x, bytearray(p[:end])) for x, p in valid])  # type: ignore[arg-type]
    (length,) = LEN_PREFIX.unpack_from(secret)
    if length != info.size:
        raise CorruptShare(
            f"image {info.image_id} of person {info.person_id}: valid shares combine to "
            f"{length} bytes, manifest says {info.size}; run `facefed-client vault verify`"
        )
    return secret[LEN_PREFIX.size :]
