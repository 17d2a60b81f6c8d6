"""The holder's network front: mutual-TLS termination that can name who it refused.

gRPC's own TLS refuses a client with a foreign certificate inside its C core, where Python never sees
the connection, so the holder could not log who knocked. This front does the handshake itself with
`ssl` (client certificate required and verified against the site's store CA, TLS >= 1.2, ALPN h2),
logs every accepted peer (address and certificate subject) and every refused one (address and the
reason), then relays the HTTP/2 bytes to the holder's gRPC server on a unix socket in a 0700 folder
that only this process can reach. No key material or share byte is ever logged.

One thread per connection (a vault keeps one long-lived connection per holder): blocking handshake
with a timeout, then a select loop that owns the TLS socket alone, so OpenSSL never sees the same
connection from two threads, and records are read and written by C code, not a Python TLS layer.
"""

from __future__ import annotations

import logging
import selectors
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

from facefed.client.holder.tls import CA_CERT, SERVER_CERT, SERVER_KEY, ServerTLS

log = logging.getLogger("facefed.holder")

HANDSHAKE_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 256


def server_context(tls: ServerTLS) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.folder / SERVER_CERT, tls.folder / SERVER_KEY)
    ctx.load_verify_locations(cafile=str(tls.folder / CA_CERT))
    ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: no certificate from the site's CA, no service
    ctx.set_alpn_protocols(["h2"])  # gRPC clients insist on it
    return ctx


def _subject(cert: dict[str, Any] | None) -> str:
    if not cert:
        return "?"
    return ",".join(f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn)


def _peer(addr: object) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = addr[0]
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr)


def _reason(exc: BaseException) -> tuple[int, str]:
    """(log level, line) for a connection that did not complete the mutual-TLS handshake; `{}` is
    where the peer goes. Refusals (no or foreign certificate, not TLS) are warnings."""
    text = str(exc)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return logging.WARNING, f"refused client {{}}: certificate not from this site's store CA ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError) and "PEER_DID_NOT_RETURN_A_CERTIFICATE" in text:
        return logging.WARNING, "refused client {}: no client certificate"
    if isinstance(exc, ssl.SSLError) and ("WRONG_VERSION_NUMBER" in text or "HTTP_REQUEST" in text):
        return logging.WARNING, "refused client {}: not a TLS client (plaintext gRPC or HTTP?)"
    if isinstance(exc, TimeoutError):
        return logging.WARNING, f"refused client {{}}: no TLS handshake within {HANDSHAKE_TIMEOUT_S:.0f}s"
    if isinstance(exc, (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError)) or "EOF" in text or "ALERT" in text:
        # the client gave up mid-handshake: typically it does not trust this holder's certificate
        return logging.WARNING, (
            "TLS handshake with {} ended by the client (does its --tls-dir hold this "
            f"site's ca.pem?): {getattr(exc, 'reason', None) or type(exc).__name__}"
        )
    return logging.WARNING, f"refused client {{}}: TLS error {getattr(exc, 'reason', None) or text}"


_CHUNK = 256 * 1024
_WRITE_TIMEOUT_S = 30.0  # a peer that stops reading for this long is dropped


def _wait(sock: socket.socket, event: int) -> None:
    with selectors.DefaultSelector() as sel:
        sel.register(sock, event)
        if not sel.select(_WRITE_TIMEOUT_S):
            raise TimeoutError("peer stopped reading")


def _send_tls(tls: ssl.SSLSocket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[tls.send(view) :]
        except (ssl.SSLWantWriteError, BlockingIOError):
            _wait(tls, selectors.EVENT_WRITE)
        except ssl.SSLWantReadError:
            _wait(tls, selectors.EVENT_READ)


def _relay(tls: ssl.SSLSocket, up: socket.socket) -> None:
    """Bytes both ways until either side closes. Only this thread touches `tls`.

    Each side is drained before forwarding (all complete TLS records; everything the local socket
    holds), so a gRPC reply that the server wrote as headers, data and trailers leaves as one write:
    fewer TLS records and fewer wake-ups for the client."""
    tls.setblocking(False)
    up.setblocking(False)
    with selectors.DefaultSelector() as sel:
        sel.register(tls, selectors.EVENT_READ, "tls")
        sel.register(up, selectors.EVENT_READ, "up")
        while True:
            ready = ["tls"] if tls.pending() else [key.data for key, _ in sel.select()]
            for side in ready:
                src = tls if side == "tls" else up
                parts: list[bytes] = []
                while True:
                    try:
                        data = src.recv(_CHUNK)
                    except (ssl.SSLWantReadError, BlockingIOError):
                        break
                    if not data:
                        if parts:
                            _forward(side, tls, up, b"".join(parts))
                        return
                    parts.append(data)
                if parts:
                    _forward(side, tls, up, parts[0] if len(parts) == 1 else b"".join(parts))


def _forward(side: str, tls: ssl.SSLSocket, up: socket.socket, data: bytes) -> None:
    if side == "tls":
        _send_plain(up, data)
    else:
        _send_tls(tls, data)


def _send_plain(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            _wait(sock, selectors.EVENT_WRITE)


class TLSFront:
    """Listens on host:port; an accept thread, and one thread per connection. `start()` returns the port."""

    def __init__(self, host: str, port: int, tls: ServerTLS, upstream: Path):
        self.host, self.port = host, port
        self.ctx = server_context(tls)
        self.upstream = str(upstream)
        self.accepted = self.refused = 0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()  # every live socket, closed by stop()
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        self._listener = sock
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name="holder-accept", daemon=True)
        self._thread.start()
        return self.port

    def _track(self, *socks: socket.socket, add: bool) -> None:
        with self._lock:
            for s in socks:
                (self._open.add if add else self._open.discard)(s)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, addr = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            with self._lock:
                busy = len(self._open) >= 2 * MAX_CONNECTIONS
            if busy:
                log.warning("refused client %s: too many connections (%d)", _peer(addr), MAX_CONNECTIONS)
                conn.close()
                continue
            self._track(conn, add=True)
            threading.Thread(target=self._serve, args=(conn, addr), name="holder-conn", daemon=True).start()

    def _serve(self, conn: socket.socket, addr: object) -> None:
        peer = _peer(addr)
        live: list[socket.socket] = [conn]
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(HANDSHAKE_TIMEOUT_S)
            try:
                if not conn.recv(1, socket.MSG_PEEK):
                    log.debug("connection from %s closed without a byte (a port probe?)", peer)
                    return
                tls = self.ctx.wrap_socket(conn, server_side=True)  # handshake now, bounded by the timeout
            except (ssl.SSLError, OSError) as e:
                with self._lock:
                    self.refused += 1
                if not self._stopping.is_set():
                    level, line = _reason(e)
                    log.log(level, line.format(peer))
                return
            self._track(conn, add=False)
            self._track(tls, add=True)
            live = [tls]
            with self._lock:
                self.accepted += 1
            log.info("accepted client %s (%s)", peer, _subject(tls.getpeercert()))
            up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            live.append(up)
            self._track(up, add=True)
            try:
                up.connect(self.upstream)
            except OSError as e:
                log.error("holder gRPC server unreachable on its local socket: %s", e.strerror)
                return
            try:
                _relay(tls, up)
            except (OSError, ValueError):  # reset, timeout, or closed by stop()
                pass
            log.debug("closed client %s", peer)
        finally:
            for s in live:
                try:
                    s.close()
                except OSError:
                    pass
            self._track(conn, *live, add=False)

    def stop(self) -> None:
        """Stop listening and cut every connection: clients see the holder gone, as after a crash."""
        self._stopping.set()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
        with self._lock:
            socks = list(self._open)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
