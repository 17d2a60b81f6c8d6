"""facefed's SuperLink process: Flower's SuperLink app, with the control plane off the public port.

`flower-superlink` 1.42 serves the Fleet API (`/v1/fleet/*`, SuperNodes), the Control API
(`/v1/control/*`, `flwr run/ls/supernode ...`) and the Runtime API (`/v1/runtime/*`, the ServerApp)
from ONE FastAPI app on ONE uvicorn listener (`--host/--port`); `--control-api-address` and
`--fleet-api-address` are deprecated no-ops, Control API account authentication is an OIDC plugin
that only Flower Enterprise (`flwr.ee`) provides, and the FAB verification SuperNodes offer
(`--trusted-entities`) needs a signed FAB plus a `valid_license` verification only an Enterprise
SuperLink sets. So with stock `flower-superlink`, anyone holding `ca.crt` can drive the Control API
(and the Runtime API) of the port the sites dial. See docs/control-plane.md.

This process builds the very same app with Flower's own code (`_parse_superlink_lifespan_config`,
`create_app`, `SuperLinkLifespan`: Flower's middlewares, node authentication, lifespan and SuperExec
unchanged) and serves it on two listeners:

- PRIVATE, `--host 127.0.0.1 --port CONTROL` (Flower's own `--host/--port`): every API. Flower's
  SuperExec dials the Runtime API here, and the operator's `flwr` CLI (`facefed-server sites/train`)
  reaches the Control API here. Loopback only, TLS, and a connection from another local Unix user is
  refused (peer uid from /proc/net/tcp; root and the server's user only).
- PUBLIC, `--public-host H --public-port P`: the Fleet API and `/health`, nothing else. Any other
  path is answered 403 before Flower sees it and logged with the peer address.

Every 30 s (and at start) it runs Flower's own `cleanup_run` for finished runs and purges the
database file (`purge_database`: VACUUM + TRUNCATE checkpoint), so deleted site updates and models do
not stay readable in free pages or in superlink.db-wal.

It also reconciles the SuperLink's node keys with facefed's ledger (`Reconciler`): at start and every
`--reconcile-s` seconds, a node whose key is not an active registered site is unregistered and
reported (a log line and one JSON line in STATE/logs/control-plane.jsonl).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import ipaddress
import json
import os
import signal
import struct
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from facefed.common.durable import atomic_write_bytes
from facefed.server.ops.stale import stop_stale
from facefed.server.state import StatePaths

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PUBLIC_PATHS = ("/v1/fleet/",)
PUBLIC_EXACT = ("/health",)
REPORT_NAME = "control-plane.jsonl"
# `facefed-server sites register` registers the key with the SuperLink, then records it in the ledger.
REGISTER_GRACE_S = 20.0


def _age_s(iso: str) -> float:
    import datetime as dt

    try:
        t = dt.datetime.fromisoformat(iso)
    except (TypeError, ValueError):
        return float("inf")
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return time.time() - t.timestamp()


def log(msg: str) -> None:
    print(f"facefed-linkd: {msg}", file=sys.stderr, flush=True)


def report(state: Path, event: str, **fields: Any) -> None:
    """One JSON line per control-plane event in STATE/logs/control-plane.jsonl (and a log line)."""
    rec = {"at": time.time(), "event": event, **fields}
    log(f"{event}: " + ", ".join(f"{k}={v}" for k, v in fields.items()))
    path = state / "logs" / REPORT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")


async def _deny(send: Send, status: int, why: str) -> None:
    body = json.dumps({"detail": why}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def public_allowed(path: str) -> bool:
    return path in PUBLIC_EXACT or any(path.startswith(p) for p in PUBLIC_PATHS)


class FleetOnly:
    """The public listener's app: the Fleet API and /health pass, anything else is refused."""

    def __init__(self, app: ASGIApp, state: Path) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not public_allowed(str(scope.get("path", ""))):
            peer = scope.get("client") or ("?", 0)
            report(
                self.state,
                "public-port-refused",
                path=str(scope.get("path", ""))[:200],
                method=str(scope.get("method", "")),
                peer=f"{peer[0]}:{peer[1]}",
            )
            await _deny(send, 403, "only the Fleet API is served on this port")
            return
        if scope["type"] not in ("http", "lifespan"):
            return  # no websockets
        await self.app(scope, receive, send)


def _proc_net_entries(path: str) -> list[tuple[str, str, int]]:
    try:
        with open(path, encoding="ascii") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) > 7:
            out.append((parts[1], parts[2], int(parts[7])))
    return out


def _hex_addr(host: str, port: int) -> str:
    """An IPv4 endpoint as /proc/net/tcp writes it (address as a little-endian u32, then the port)."""
    ip = ipaddress.IPv4Address(host)
    return f"{struct.unpack('<I', ip.packed)[0]:08X}:{port:04X}"


def peer_uid(client: tuple[str, int], server: tuple[str, int]) -> int | None:
    """The uid owning the local socket that connected from `client` to `server` (Linux), or None."""
    try:
        want_local, want_remote = _hex_addr(*client), _hex_addr(*server)
    except ValueError:
        return None
    for local, remote, uid in _proc_net_entries("/proc/net/tcp"):
        if local == want_local and remote == want_remote:
            return uid
    return None


class LocalOperatorOnly:
    """The private listener's app: loopback peers owned by this user (or root) only."""

    def __init__(self, app: ASGIApp, state: Path) -> None:
        self.app, self.state = app, state
        self.allowed = {0, os.getuid()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            client, server = scope.get("client"), scope.get("server")
            uid = peer_uid(tuple(client), tuple(server)) if client and server else None
            if uid is None or uid not in self.allowed:
                report(
                    self.state,
                    "control-port-refused",
                    path=str(scope.get("path", ""))[:200],
                    peer=f"{client[0]}:{client[1]}" if client else "?",
                    uid=uid,
                )
                await _deny(send, 403, "the control port serves this server's operator only")
                return
        elif scope["type"] != "lifespan":
            return
        await self.app(scope, receive, send)


class Reconciler:
    """Every node key the SuperLink knows must be an active site in facefed's ledger."""

    def __init__(self, linkstate_factory: Any, state: Path) -> None:
        self.factory, self.state = linkstate_factory, state

    def allowed(self) -> dict[str, str]:
        """fingerprint -> site for active sites, read-only: this process never writes the ledger (and
        never sets its journal mode), so it cannot disturb the CLI's own connections."""
        import sqlite3

        path = self.state / "ledger.sqlite"
        if not path.is_file():
            return {}
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)
        try:
            rows = con.execute("SELECT fingerprint, name FROM sites WHERE revoked_at IS NULL").fetchall()
        except sqlite3.OperationalError:
            return {}  # no sites table yet: nobody is registered
        finally:
            con.close()
        return {str(fp): str(name) for fp, name in rows}

    def once(self) -> list[int]:
        from facefed.common.nodekeys import fingerprint_pem

        allowed = self.allowed()
        link = self.factory.state()
        removed = []
        for node in link.get_node_info():
            if node.status == "unregistered":
                continue
            try:
                fp = fingerprint_pem(node.public_key)
            except Exception:  # noqa: BLE001 - a key we cannot read is not one of ours
                fp = "(unreadable key)"
            if fp in allowed or _age_s(node.registered_at) < REGISTER_GRACE_S:
                continue  # ours, or just registered by `sites register`, which writes the ledger next
            try:
                link.delete_node(owner_aid=node.owner_aid, node_id=node.node_id)
            except ValueError:
                continue  # gone meanwhile
            removed.append(node.node_id)
            report(
                self.state,
                "unknown-node-unregistered",
                node_id=str(node.node_id),
                fingerprint=fp,
                name=node.name,
                status=node.status,
            )
        return removed

    def purge(self) -> None:
        """Flower's cleanup of finished runs, then the file purge; the record says when and which runs
        (an unlearning names them in its receipts: server/forget/replay.py)."""
        paths = StatePaths(self.state)
        asked = paths.purge_request.exists()
        started = time.time()
        runs = cleanup_finished_runs(self.factory)
        purge_database(paths.superlink_db)
        record = {"started_at": started, "finished_at": time.time(), "runs_cleaned": runs}
        atomic_write_bytes(paths.purge_record, json.dumps(record).encode())
        if asked:
            paths.purge_request.unlink(missing_ok=True)

    def loop(self, every: float, stop: threading.Event, purge_every: float = 30.0) -> None:
        last_purge = time.monotonic()
        while not stop.wait(every):
            steps: list[Callable[[], object]] = [self.once]
            if time.monotonic() - last_purge >= purge_every or StatePaths(self.state).purge_request.exists():
                steps.append(self.purge)
                last_purge = time.monotonic()
            for step in steps:
                try:
                    step()
                except Exception as e:  # noqa: BLE001 - keep reconciling; say what failed
                    log(f"{step.__name__} failed: {type(e).__name__}: {e}")


def purge_database(db: Path) -> None:
    """Leave no bytes of deleted rows in the SuperLink's SQLite file or its WAL.

    Flower deletes a finished run's messages and objects (`LinkState.cleanup_run`, called lazily
    when a node or `flwr ls` next touches the run) but its connections use WAL without
    secure_delete, so the deleted site updates stay readable in free pages and in superlink.db-wal.
    VACUUM rewrites every page of the database, and a TRUNCATE checkpoint copies them over the
    main file, cuts it to its new size and empties the WAL."""
    import sqlite3

    if not db.is_file():
        return
    con = sqlite3.connect(db, timeout=30, isolation_level=None)
    try:
        con.execute("PRAGMA secure_delete = ON")
        con.execute("VACUUM")
        busy, _, _ = con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            raise RuntimeError("the WAL checkpoint was blocked by a reader; retried at the next pass")
    finally:
        con.close()


def cleanup_finished_runs(linkstate_factory: Any) -> list[int]:
    """Flower's own cleanup (messages, objects, sessions) for every finished run, now; their ids."""
    from flwr.common.constant import Status

    link = linkstate_factory.state()
    done = [int(run.run_id) for run in link.get_run_info(statuses=[Status.FINISHED])]
    for run_id in done:
        link.cleanup_run(run_id)
    return done


def _build(flower_args: list[str]) -> tuple[Any, Any]:
    """Flower's own config parsing and app (what `flower-superlink` runs), from our arguments."""
    from flwr.superlink.main import create_app

    # `flwr.superlink.cli` re-exports the function `flower_superlink` under the module's name.
    fs = importlib.import_module("flwr.superlink.cli.flower_superlink")

    argv0 = sys.argv
    sys.argv = ["flower-superlink", *flower_args]
    try:
        config = fs._parse_superlink_lifespan_config()
    finally:
        sys.argv = argv0
    app = create_app(config, fs.SuperLinkLifespan)
    return config, app


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="facefed SuperLink: Fleet API public, control plane private")
    ap.add_argument("--state", type=Path, required=True)
    ap.add_argument("--public-host", required=True)
    ap.add_argument("--public-port", type=int, required=True)
    ap.add_argument("--reconcile-s", type=float, default=5.0)
    ap.add_argument("flower", nargs=argparse.REMAINDER, help="-- then flower-superlink arguments")
    args = ap.parse_args(argv)
    flower_args = args.flower[1:] if args.flower[:1] == ["--"] else args.flower

    import uvicorn
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler

    config, app = _build(flower_args)
    state = args.state.resolve()
    reconciler = Reconciler(app.state.linkstate_factory, state)
    reconciler.once()  # before any node can connect
    try:
        reconciler.purge()
    except Exception as e:  # noqa: BLE001 - a busy database is purged at the next pass
        log(f"purge failed: {type(e).__name__}: {e}")
    stop = threading.Event()
    threading.Thread(target=reconciler.loop, args=(args.reconcile_s, stop), daemon=True).start()

    tls = {"ssl_keyfile": config.ssl_keyfile, "ssl_certfile": config.ssl_certfile}
    log_config = get_uvicorn_log_config(console_handler.level)

    class Server(uvicorn.Server):
        @contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield  # both listeners stop together on our own handler below

    private = Server(
        uvicorn.Config(
            LocalOperatorOnly(app, state),
            host=config.host,
            port=config.port,
            lifespan="on",
            log_config=log_config,
            **tls,
        )
    )
    public = Server(
        uvicorn.Config(
            FleetOnly(app, state),
            host=args.public_host,
            port=args.public_port,
            lifespan="off",
            log_config=log_config,
            **tls,
        )
    )

    def on_signal(*_: Any) -> None:
        private.should_exit = public.should_exit = True
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    log(
        f"Fleet API on {args.public_host}:{args.public_port} (public); Control and Runtime APIs on "
        f"{config.host}:{config.port} (this host's operator only)"
    )

    async def serve() -> None:
        await private.serve()  # starts Flower's lifespan (SuperExec) before the public port opens

    async def both() -> None:
        task = asyncio.create_task(serve())
        while not private.started and not task.done():
            await asyncio.sleep(0.05)
        if not task.done():
            await public.serve()
            private.should_exit = True
        await task

    asyncio.run(both())
    stop.set()
    # Flower's shutdown terminates its SuperExec but not the ServerApps that one started: they end when
    # their parent monitor sees it gone, which a SuperExec nobody reaps never is (server/ops/stale.py).
    stop_stale(f"{config.host}:{config.port}", grace_s=10.0, log=log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
