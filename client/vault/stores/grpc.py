"""`grpcs://host:port`: a share store on another host, reached through its share holder (mutual TLS).

`GrpcStore` implements `Store` over the holder's gRPC service, so the vault treats a
remote holder exactly like a local directory. What the network adds is handled here:
- every call has a deadline; UNAVAILABLE and DEADLINE_EXCEEDED are retried a bounded number of times
  with exponential backoff (every operation is idempotent: put overwrites, delete of a missing share
  is a no-op), then raise StoreUnavailable naming the holder;
- a holder found down is not waited for again: until a probe succeeds (at most one every
  `probe_interval_s`), calls fail at once, so the vault's reads go on with the other stores at once;
- one channel per store, shared by all threads (gRPC channels are thread-safe), recreated after a
  fork, with short reconnect backoff so a holder that comes back is used within about a second;
- a gRPC call costs a few hundred microseconds of CPU on each side whatever it carries, so reads and
  writes travel in batches: concurrent `get`s are coalesced, `get_many`/`put_many` send many shares
  per call (the vault uses `put_many` for imports; `get_many` is there for batched reads).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
from google.protobuf.message import Message

from facefed.client.holder import proto
from facefed.client.holder.proto.shares import MAX_SHARE_BYTES
from facefed.client.holder.tls import load_client_tls
from facefed.client.vault.stores.base import (
    ShareNotFound,
    Store,
    StoreError,
    StoreStat,
    StoreUnavailable,
    check_share_id,
)

SCHEME = "grpcs"
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_MAX_MESSAGE = MAX_SHARE_BYTES + 64 * 1024
PUT_MANY_BYTES = 4 * 1024 * 1024  # share bytes per PutMany request
GET_BATCH = 32  # share ids per GetMany request
GET_INFLIGHT = 1  # concurrent read requests per store before further gets queue up and batch
GET_LINGER_S = 0.001  # wait before sending a batch, only while gets arrive concurrently (measured: -10-15% CPU)
LIST_PAGE = 5000  # ids per List call (~170 KB): bounded messages however many shares a holder has


@dataclass(frozen=True)
class RemotePolicy:
    """Deadlines (seconds per attempt) and retry bounds.

    Reads give up sooner than writes: the vault has other holders to read from, while a write that
    fails leaves the whole image unwritten. A holder known down is probed with one short attempt.
    """

    read_timeout_s: float = 2.0
    read_attempts: int = 2
    write_timeout_s: float = 10.0
    write_attempts: int = 3
    backoff_s: float = 0.05
    backoff_max_s: float = 1.0
    probe_interval_s: float = 0.5
    probe_timeout_s: float = 1.0


def parse_url(url: str) -> tuple[str, int]:
    """`grpcs://host:port` -> (host, port); anything else (path, user, query, no port) is refused."""
    parts = urlsplit(url)
    bad = f"invalid share holder URL {url!r}: expected grpcs://HOST:PORT"
    if parts.scheme != SCHEME or parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(bad)
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        raise ValueError(bad) from None
    if not host or port is None or port == 0:
        raise ValueError(bad)
    return host, port


class _PendingGet:
    __slots__ = ("share_id", "data", "error", "done", "lead", "event")

    def __init__(self, share_id: str):
        self.share_id = share_id
        self.data: bytes | None = None
        self.error: BaseException | None = None
        self.done = False
        self.lead = False  # this caller's thread must send the next batch
        self.event = threading.Event()


class GrpcStore(Store):
    """A `Store` on a remote share holder. Thread-safe."""

    is_remote = True
    prefetch_window = 32  # images per batched read ahead of the vault's reader (one GetMany per store)

    def __init__(self, url: str, *, tls_dir: str | Path | None = None, policy: RemotePolicy | None = None):
        self.host, self.port = parse_url(url)
        netloc = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"{SCHEME}://{netloc}:{self.port}"
        self.target = f"{netloc}:{self.port}"
        self.policy = policy or RemotePolicy()
        tls = load_client_tls(tls_dir, self.url)
        self._creds = grpc.ssl_channel_credentials(
            root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert
        )
        self._lock = threading.Lock()
        self._pid = -1
        self._channel: grpc.Channel | None = None
        self._calls: dict[str, grpc.UnaryUnaryMultiCallable] = {}
        self._down_since: float | None = None
        self._last_probe = 0.0
        self._max_share: int | None = None  # the holder's largest share (from Stat), sizes PutMany
        # read coalescing (see `get`)
        self._rlock = threading.Lock()
        self._rqueue: list[_PendingGet] = []
        self._rinflight = 0
        self._last_batch = 0

    def __repr__(self) -> str:
        return f"GrpcStore({self.url!r})"

    # -- channel ----------------------------------------------------------------------------------
    def _stubs(self) -> dict[str, grpc.UnaryUnaryMultiCallable]:
        if self._pid == os.getpid() and self._channel is not None:
            return self._calls
        with self._lock:
            if self._pid != os.getpid() or self._channel is None:  # first use, or we are a forked child
                self._channel = grpc.secure_channel(
                    self.target,
                    self._creds,
                    options=[
                        ("grpc.max_send_message_length", _MAX_MESSAGE),
                        ("grpc.max_receive_message_length", _MAX_MESSAGE),
                        # a holder that comes back is retried within about a second...
                        ("grpc.initial_reconnect_backoff_ms", 100),
                        ("grpc.max_reconnect_backoff_ms", 1000),
                        # ...while one connection attempt may take 10 s (gRPC uses this option as the
                        # connect timeout too: too low, and a busy holder's handshake never completes)
                        ("grpc.min_reconnect_backoff_ms", 10_000),
                        ("grpc.enable_retries", 0),  # retries are ours: bounded, and they mark the holder down
                        ("grpc.use_local_subchannel_pool", 1),
                    ],
                )
                self._calls = {
                    rpc: self._channel.unary_unary(
                        proto.method_path(rpc),
                        request_serializer=proto.MESSAGE_CLASSES[req].SerializeToString,
                        response_deserializer=proto.MESSAGE_CLASSES[rep].FromString,
                        _registered_method=True,
                    )
                    for rpc, (req, rep) in proto.METHODS.items()
                }
                self._pid = os.getpid()
        return self._calls

    def close(self) -> None:
        with self._lock:
            if self._channel is not None and self._pid == os.getpid():
                self._channel.close()
            self._channel, self._pid = None, -1

    # -- one rpc with deadline, bounded retries and the down-holder fast path ---------------------
    def _call(self, rpc: str, request: Message, what: str, *, read: bool) -> Any:
        p = self.policy
        timeout = p.read_timeout_s if read else p.write_timeout_s
        with self._lock:
            down_since = self._down_since
            down = down_since is not None
            if down_since is not None:
                now = time.monotonic()
                if now - self._last_probe < p.probe_interval_s:
                    raise StoreUnavailable(
                        f"share holder {self.url} is unreachable (since {now - down_since:.1f}s); {what} skipped"
                    )
                self._last_probe = now
        attempts = max(1, p.read_attempts if read else p.write_attempts)
        if down:
            attempts, timeout = 1, min(timeout, p.probe_timeout_s)
        delay = p.backoff_s
        err: grpc.RpcError | None = None
        for attempt in range(attempts):
            try:
                reply = self._stubs()[rpc](request, timeout=timeout, wait_for_ready=False)
            except grpc.RpcError as e:
                if e.code() not in _RETRYABLE:
                    self._up()
                    raise self._error(e, what) from None
                err = e
                if attempt + 1 < attempts:
                    time.sleep(delay)
                    delay = min(delay * 2, p.backoff_max_s)
                continue
            self._up()
            return reply
        with self._lock:
            if self._down_since is None:
                self._down_since = time.monotonic()
            self._last_probe = time.monotonic()
        assert err is not None
        hint = ""
        if err.code() == grpc.StatusCode.UNAVAILABLE:
            hint = (
                "; check that `facefed-client store serve` runs there and that its certificates and this "
                "--tls-dir come from the same `store certs` CA"
            )
        raise StoreUnavailable(
            f"share holder {self.url} unreachable after {attempts} attempt(s) ({what}): "
            f"{err.code().name}: {err.details()}{hint}"
        ) from None

    def _up(self) -> None:
        if self._down_since is not None:
            with self._lock:
                self._down_since = None

    def _error(self, e: grpc.RpcError, what: str) -> Exception:
        code, details = e.code(), e.details()
        if code == grpc.StatusCode.NOT_FOUND:
            return ShareNotFound(what)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return ValueError(f"share holder {self.url} refused {what}: {details}")
        return StoreError(f"share holder {self.url} failed {what}: {code.name}: {details}")

    # -- Store operations ----------------------------------------------------------------------------
    def put(self, share_id: str, data: bytes) -> None:
        check_share_id(share_id)
        self._call("Put", proto.PutRequest(share_id=share_id, data=bytes(data)), f"put {share_id}", read=False)

    def put_many(self, items: list[tuple[str, bytes]]) -> None:
        """Several shares (the vault's import path): PutMany requests of up to PUT_MANY_BYTES each,
        durable together on the holder (one index commit and one fsync per folder for the lot)."""
        for share_id, _ in items:
            check_share_id(share_id)
        if len(items) > 1 and self._max_share is None:  # the holder's message limit bounds a PutMany
            self._max_share = self._call("Stat", proto.StatRequest(), "stat", read=True).max_share_bytes
        limit = min(PUT_MANY_BYTES, self._max_share or PUT_MANY_BYTES)
        batch: list[tuple[str, bytes]] = []
        size = 0
        for share_id, data in items:
            if batch and size + len(data) > limit:
                self._put_batch(batch)
                batch, size = [], 0
            batch.append((share_id, data))
            size += len(data)
        if batch:
            self._put_batch(batch)

    def _put_batch(self, batch: list[tuple[str, bytes]]) -> None:
        if len(batch) == 1:
            self.put(*batch[0])
            return
        request = proto.PutManyRequest(shares=[proto.PutRequest(share_id=s, data=bytes(d)) for s, d in batch])
        self._call("PutMany", request, f"put of {len(batch)} shares", read=False)

    def get(self, share_id: str) -> bytes:
        """One share. Concurrent gets (the vault reads with a thread pool) are coalesced: while
        GET_INFLIGHT requests are on the wire, further ids queue and leave together in one GetMany.
        A lone caller sends at once (no added latency); when the last batch held several ids, the
        next one waits GET_LINGER_S for more. Each queued id saves the per-call cost of gRPC (a few
        hundred microseconds of CPU on each side). Waiters sleep on their own event: a finished
        batch wakes its callers and hands the slot to the oldest waiter."""
        check_share_id(share_id)
        item = _PendingGet(share_id)
        with self._rlock:
            self._rqueue.append(item)
            if self._rinflight < GET_INFLIGHT:
                self._rinflight += 1
                item.lead = True
        while True:
            if not item.lead:
                item.event.wait()
                if item.done:
                    break
            # this thread carries the next batch (led by it, so its own id is in it unless the queue
            # was long; then it leads again after)
            if self._last_batch > 1:  # callers come in crowds: let a few more join this batch
                time.sleep(GET_LINGER_S)
            with self._rlock:
                item.lead = False
                item.event.clear()
                batch, self._rqueue = self._rqueue[:GET_BATCH], self._rqueue[GET_BATCH:]
                self._last_batch = len(batch)
            try:
                found = self._get_many([p.share_id for p in batch])
                for p in batch:
                    p.data = found.get(p.share_id)
            except BaseException as e:  # noqa: BLE001 - handed to every caller of the batch
                for p in batch:
                    p.error = e
            with self._rlock:
                for p in batch:
                    p.done = True
                    if p is not item:
                        p.event.set()
                if self._rqueue:  # hand the slot to the oldest waiter
                    nxt = self._rqueue[0]
                    nxt.lead = True
                    nxt.event.set()
                else:
                    self._rinflight -= 1
            if item.done:
                break
        if item.error is not None:
            raise item.error
        if item.data is None:
            raise ShareNotFound(share_id)
        return item.data

    def get_many(self, share_ids: list[str]) -> dict[str, bytes]:
        """Shares by id in as few round trips as the holder's reply size allows; absent ids are left out."""
        for share_id in share_ids:
            check_share_id(share_id)
        found: dict[str, bytes] = {}
        for start in range(0, len(share_ids), GET_BATCH):
            found.update(self._get_many(share_ids[start : start + GET_BATCH]))
        return found

    def _get_many(self, ids: list[str]) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        rest = list(dict.fromkeys(ids))
        while rest:
            what = rest[0] if len(rest) == 1 else f"{len(rest)} shares"
            reply = self._call("GetMany", proto.GetManyRequest(share_ids=rest), what, read=True)
            if not reply.shares:
                raise StoreError(f"share holder {self.url} answered a read of {what} with nothing")
            for entry in reply.shares:
                if entry.found:
                    found[entry.share_id] = entry.data
            answered = len(reply.shares)
            if [e.share_id for e in reply.shares] != rest[:answered]:
                raise StoreError(f"share holder {self.url} answered a read with other share ids than asked")
            rest = rest[answered:]
        return found

    def delete(self, share_id: str) -> bool:
        check_share_id(share_id)
        reply = self._call("Delete", proto.DeleteRequest(share_id=share_id), f"delete {share_id}", read=False)
        return bool(reply.existed)

    def list(self) -> Iterator[str]:
        after = ""
        while True:
            reply = self._call("List", proto.ListRequest(after=after, limit=LIST_PAGE), "list", read=False)
            if not reply.share_ids:
                return
            yield from reply.share_ids
            after = reply.share_ids[-1]

    def stat(self) -> StoreStat:
        r = self._call("Stat", proto.StatRequest(), "stat", read=True)
        return StoreStat(url=self.url, shares=r.shares, bytes=r.bytes, writable=r.writable)

    def check(self) -> None:
        if not self.stat().writable:
            raise StoreError(f"share holder {self.url} is read-only: its --dir cannot be written; fix it on that host")
