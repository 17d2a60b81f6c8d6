"""The share holder: one share store served over gRPC, reachable only through mutual TLS.

    facefed-client store serve --dir DIR --listen HOST:PORT --tls-dir TLS

Pieces: `disk.ShareDir` (files + index), the gRPC service below (generic handlers with the
messages of `proto/holder.proto`, bound to a unix socket in a private 0700 folder), and
`front.TLSFront` (the only network listener: verifies client certificates, logs who, relays).
Share ids are checked here as well as by the client, so a hand-made request with a path in its id
gets INVALID_ARGUMENT and touches no file.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import sqlite3
import ssl
import tempfile
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from facefed.client.holder import proto
from facefed.client.holder.disk import DEFAULT_MAX_SHARE_BYTES, ShareDir
from facefed.client.holder.front import TLSFront
from facefed.client.holder.proto.shares import ShareNotFound, check_share_id
from facefed.client.holder.tls import load_server_tls

log = logging.getLogger("facefed.holder")

LIST_PAGE_MAX = 10_000
GET_MANY_MAX_IDS = 1024
GET_MANY_REPLY_BYTES = 4 * 1024 * 1024
_MESSAGE_OVERHEAD = 64 * 1024  # protobuf framing and the share id around a maximal share


def _abort_invalid(context: grpc.ServicerContext, exc: ValueError) -> None:
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))


class HolderService:
    """The rpcs of holder.proto; each maps store errors to a gRPC status the client turns back into them."""

    def __init__(self, store: ShareDir, name: str):
        self.store, self.name = store, name
        # share bytes per GetMany reply (one share always goes, whatever its size): bounded replies
        # keep a read's deadline meaningful and the holder's memory small
        self.reply_budget = min(store.max_share_bytes, GET_MANY_REPLY_BYTES)

    def Put(self, req: Any, context: grpc.ServicerContext) -> Any:
        return self._write([(req.share_id, req.data)], context)

    def PutMany(self, req: Any, context: grpc.ServicerContext) -> Any:
        return self._write([(p.share_id, p.data) for p in req.shares], context)

    def _write(self, items: list[tuple[str, bytes]], context: grpc.ServicerContext) -> Any:
        try:
            self.store.put_many(items)
        except ValueError as e:
            _abort_invalid(context, e)
        except OSError as e:
            log.error("put failed: %s", e.strerror)
            code = (
                grpc.StatusCode.RESOURCE_EXHAUSTED if e.errno == errno.ENOSPC else grpc.StatusCode.FAILED_PRECONDITION
            )
            context.abort(code, f"holder {self.name} cannot write ({e.strerror}); fix its --dir on that host")
        except sqlite3.Error as e:
            log.error("put failed: index: %s", e)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"holder {self.name} cannot write its index ({e})")
        return proto.PutReply()

    def Get(self, req: Any, context: grpc.ServicerContext) -> Any:
        try:
            return proto.GetReply(data=self.store.get(req.share_id))
        except ValueError as e:
            _abort_invalid(context, e)
        except ShareNotFound:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no share {req.share_id} on holder {self.name}")
        except OSError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"holder {self.name} cannot read: {e.strerror}")

    def GetMany(self, req: Any, context: grpc.ServicerContext) -> Any:
        if len(req.share_ids) > GET_MANY_MAX_IDS:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"get many: {len(req.share_ids)} ids, at most {GET_MANY_MAX_IDS} per request",
            )
        reply = proto.GetManyReply()
        budget = self.reply_budget
        for share_id in req.share_ids:
            try:
                data = self.store.get(share_id)
                found = True
            except ValueError as e:
                _abort_invalid(context, e)
            except ShareNotFound:
                data, found = b"", False
            except OSError as e:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"holder {self.name} cannot read: {e.strerror}")
            if reply.shares and len(data) > budget:
                break  # the client asks again for the rest
            budget -= len(data)
            reply.shares.add(share_id=share_id, found=found, data=data)
        return reply

    def Delete(self, req: Any, context: grpc.ServicerContext) -> Any:
        try:
            return proto.DeleteReply(existed=self.store.delete(req.share_id))
        except ValueError as e:
            _abort_invalid(context, e)
        except (OSError, sqlite3.Error) as e:
            log.error("delete failed: %s", e)
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"holder {self.name} cannot delete ({e}); fix its --dir on that host",
            )

    def List(self, req: Any, context: grpc.ServicerContext) -> Any:
        if req.after:
            try:
                check_share_id(req.after)
            except ValueError as e:
                _abort_invalid(context, e)
        limit = min(req.limit or 1000, LIST_PAGE_MAX)
        return proto.ListReply(share_ids=self.store.list(req.after, limit))

    def Stat(self, req: Any, context: grpc.ServicerContext) -> Any:
        s = self.store.stat()
        return proto.StatReply(
            shares=s.shares, bytes=s.bytes, writable=s.writable, max_share_bytes=self.store.max_share_bytes
        )


def generic_handler(service: HolderService) -> grpc.GenericRpcHandler:
    handlers = {}
    for rpc, (req, rep) in proto.METHODS.items():
        handlers[rpc] = grpc.unary_unary_rpc_method_handler(
            getattr(service, rpc),
            request_deserializer=proto.MESSAGE_CLASSES[req].FromString,
            response_serializer=proto.MESSAGE_CLASSES[rep].SerializeToString,
        )
    return grpc.method_handlers_generic_handler(proto.SERVICE_NAME, handlers)


def parse_listen(listen: str) -> tuple[str, int]:
    """HOST:PORT or [V6]:PORT; port 0 picks a free one (printed at start)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host:
        raise ValueError(f"--listen {listen!r}: expected HOST:PORT, e.g. 0.0.0.0:7001")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        port_n = int(port)
    except ValueError:
        raise ValueError(f"--listen {listen!r}: port {port!r} is not a number") from None
    if not 0 <= port_n <= 65535:
        raise ValueError(f"--listen {listen!r}: port must be 0..65535")
    return host, port_n


@dataclass
class Holder:
    """A running holder; `stop()` ends it. Used by the CLI and by in-process tests."""

    store: ShareDir
    server: grpc.Server
    front: TLSFront
    sock_dir: Path
    port: int

    def stop(self, grace: float = 1.0) -> None:
        self.front.stop()
        self.server.stop(grace).wait(grace + 1)
        self.store.close()
        shutil.rmtree(self.sock_dir, ignore_errors=True)


def start_holder(
    directory: str | os.PathLike[str],
    listen: str,
    tls_dir: str | os.PathLike[str],
    *,
    cert_host: str | None = None,
    max_share_bytes: int = DEFAULT_MAX_SHARE_BYTES,
    workers: int = 8,
) -> Holder:
    host, port = parse_listen(listen)
    tls = load_server_tls(Path(tls_dir), cert_host or host)
    store = ShareDir(directory, max_share_bytes=max_share_bytes)
    sock_dir = Path(tempfile.mkdtemp(prefix="facefed-holder-"))  # 0700: only this user reaches the socket
    sock = sock_dir / "grpc.sock"
    max_msg = max_share_bytes + _MESSAGE_OVERHEAD
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="holder"),
        options=[("grpc.max_receive_message_length", max_msg), ("grpc.max_send_message_length", max_msg)],
    )
    service = HolderService(store, f"{host}:{port}")
    server.add_generic_rpc_handlers((generic_handler(service),))
    try:
        front = TLSFront(host, port, tls, sock)  # loads the certificate and key: a bad file fails here
        if server.add_insecure_port(f"unix:{sock}") == 0:
            raise OSError(errno.EADDRNOTAVAIL, f"cannot bind the local socket {sock}")
        server.start()
        bound = front.start()
    except (OSError, RuntimeError, ssl.SSLError) as e:
        server.stop(0)
        store.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
        raise OSError(f"holder cannot listen on {listen}: {getattr(e, 'strerror', None) or e}") from e
    service.name = f"{host}:{bound}"
    stat = store.stat()
    log.info(
        "serving %s on %s:%d (%d shares, %d bytes; certificate from %s; %d pending index rows settled)",
        store.root,
        host,
        bound,
        stat.shares,
        stat.bytes,
        tls.folder,
        store.recovered,
    )
    return Holder(store, server, front, sock_dir, bound)


def serve_forever(holder: Holder) -> None:
    """Block until SIGTERM or SIGINT, then stop cleanly."""
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    log.info("stopping")
    holder.stop()
