"""Run Flower's SuperLink for `facefed-server start`, and talk to it with the `flwr` CLI.

What Flower 1.42 actually does (read from the installed source, flwr/superlink, flwr/supernode,
flwr/cli; worth knowing before touching this module):

- ONE port. `flower-superlink --host H --port P` (default 127.0.0.1:8000) serves the Fleet API
  (SuperNodes), the Control API (`flwr run/ls/supernode ...`) and the Runtime API (its ServerApp
  process) over HTTP(S) with uvicorn. `--fleet-api-address`, `--control-api-address`,
  `--serverappio-api-address` are deprecated or rejected; Control API account auth is Enterprise-only.
  So facefed does not run `flower-superlink` itself but server/ops/linkd.py: Flower's same app with
  only the Fleet API on the public port and Control + Runtime on 127.0.0.1:CONTROL_PORT (see
  docs/control-plane.md). Health gRPC only with `--health-server-address`.
- TLS: `--ssl-ca-certfile CA --ssl-certfile CRT --ssl-keyfile KEY` (all three or none) covers all
  APIs; without them it exits unless `--insecure`. The server cert needs SANs for the address clients
  dial (127.0.0.1 here). The SuperLink's own SuperExec/ServerApp reach the Runtime API with the CA.
- SuperNode auth: `--enable-supernode-auth` (requires TLS). Nodes are then added only through the
  Control API: `flwr supernode register KEY.pub [CONN] --name NAME` (OpenSSH public key on a NIST EC
  curve; P-384 is what Flower documents), `flwr supernode list`, `flwr supernode unregister NODE_ID`.
  A SuperNode signs every Fleet request with `--auth-supernode-private-key` (OpenSSH private key).
  Unregistered key -> exit code 305 with "[code: 2004] Failed to activate SuperNode". Without auth,
  any SuperNode registers itself.
- SuperNode: `flower-supernode --superlink H:P --root-certificates CA [--auth-supernode-private-key K]
  --node-config 'k="v" ...' --port N`. `--port` is its own Runtime (ClientAppIo) HTTP port on
  127.0.0.1 (default 9094): every SuperNode on one machine needs a different one.
  `--clientappio-api-address` is rejected in 1.41. Without `--root-certificates` it trusts the system
  store (a private CA fails with CERTIFICATE_VERIFY_FAILED); `--insecure` against a TLS SuperLink
  fails with "Server disconnected without sending a response"; `--insecure` with an auth key exits 303.
  `--max-retries`/`--max-wait-time` bound reconnection (default: retry forever, which is what a site
  wants across server restarts). It polls for messages every 3 s when idle (hard-coded), heartbeats
  every 30 s, and a dead node is marked offline after ~2 missed heartbeats.
- Isolation: `subprocess` is the default on both sides: the SuperLink starts `flower-superexec`, which
  launches `flwr-serverapp` per run; the SuperNode starts `flower-superexec`, which launches a fresh
  `flwr-clientapp` process per message (so ClientApp state must live on disk). They are found by
  name on PATH, hence our venv's bin goes first. FLWR_SUPEREXEC_TASK_POLL_INTERVAL (default 1 s)
  sets how often SuperExec looks for work.
- Offline: FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 (and `--disable-runtime-dependency-installation`)
  stops `uv sync` of app dependencies; FLWR_TELEMETRY_ENABLED=0; FLWR_DISABLE_UPDATE_CHECK=1.
- `flwr run APP_DIR CONN --run-config 'k=v k2="s"' --format json` builds a FAB from APP_DIR
  (pyproject.toml with [tool.flwr.app] components/config; only *.py/*.toml/*.md/... are packed) and
  submits it; CONN is a `[superlink.CONN]` table in $FLWR_HOME/config.toml with `address` and
  `root-certificates` (or `insecure = true`). Run-config overrides must name keys declared in
  [tool.flwr.app.config]. The FAB is installed under FLWR_HOME/apps/ and imported with that dir first
  on sys.path. Our FAB holds only pyproject.toml, and a facefed site's `flwr-clientapp`
  (client/site/guard.py) refuses any FAB whose hash differs and never imports from one: a server cannot
  push code to a site.
- ServerApp (Message API): `flwr.serverapp.ServerApp`, `@app.main() def main(grid, context)`;
  `context.run_config` holds the fused run config; `grid.get_nodes()` returns online NodeInfo with
  `node_id`, `name` (the registered name) and `public_key` (PEM). `grid.send_and_receive(msgs,
  timeout=)` polls every 3 s, so we push and pull ourselves with a shorter poll. Replies carry
  `metadata.src_node_id`; a failed ClientApp comes back as a reply with `has_error()`.
- `--database FILE` persists LinkState (registered nodes survive a restart); `:flwr-in-memory:` is
  the default.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from facefed.common.childproc import flower_env, run_foreground
from facefed.common.errors import Unavailable
from facefed.server.ops.stale import stop_stale
from facefed.server.state import CONNECTION, ServerInfo, StatePaths

TLS_CA, TLS_CERT, TLS_KEY = "ca.crt", "server.crt", "server.key"
# The Control and Runtime APIs listen here only (server/ops/linkd.py); the public port has the Fleet API.
CONTROL_HOST = "127.0.0.1"


class SuperLinkError(Unavailable, RuntimeError):
    """The SuperLink could not be started or reached; the message says why and what to do."""


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path

    @classmethod
    def from_dir(cls, tls_dir: str | Path) -> TlsFiles:
        d = Path(tls_dir).expanduser().resolve()
        files = cls(d / TLS_CA, d / TLS_CERT, d / TLS_KEY)
        missing = [p.name for p in (files.ca, files.cert, files.key) if not p.is_file()]
        if missing:
            raise SuperLinkError(
                f"TLS directory {d} lacks {', '.join(missing)}; make them with `facefed-server certs --out {d}`"
            )
        return files


def superlink_command(
    paths: StatePaths, *, host: str, port: int, control_port: int, tls: TlsFiles | None, node_auth: bool
) -> list[str]:
    """facefed's SuperLink (server/ops/linkd.py): Flower's app with only the Fleet API on HOST:PORT and
    the Control and Runtime APIs on 127.0.0.1:CONTROL_PORT for this host's operator."""
    cmd = [
        sys.executable,
        "-m",
        "facefed.server.ops.linkd",
        "--state",
        str(paths.root),
        "--public-host",
        host,
        "--public-port",
        str(port),
        "--",
        "--host",
        CONTROL_HOST,
        "--port",
        str(control_port),
        "--database",
        str(paths.superlink_db),
        "--disable-runtime-dependency-installation",
    ]
    if tls is None:
        if node_auth:
            raise SuperLinkError("node authentication needs TLS: pass --tls-dir (made by `facefed-server certs`)")
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(tls.ca), "--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key)]
        if node_auth:
            cmd.append("--enable-supernode-auth")
    return cmd


def connect_host(bind_host: str) -> str:
    """The host a local client dials for a bind address (a wildcard bind is reached on loopback)."""
    return "127.0.0.1" if bind_host in ("0.0.0.0", "::", "") else bind_host


def write_connection(paths: StatePaths, address: str, ca: Path | None) -> None:
    """$FLWR_HOME/config.toml with our one connection, so `flwr run/ls/supernode` reach this server."""
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f'address = "{address}"']
    lines.append(f'root-certificates = "{ca}"' if ca else "insecure = true")
    paths.flwr_home.mkdir(parents=True, exist_ok=True)
    paths.flwr_config.write_text("\n".join(lines) + "\n")


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def wait_listening(host: str, port: int, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return True
        except OSError:
            time.sleep(0.2)
    return False


# What `train`/`status --watch`/`sites ls` poll the SuperLink with: routine, not worth a log line each.
POLLING = ("ControlServicer.ListRuns", "ControlServicer.ListNodes", "list-runs", "list-nodes", "fraction_evaluate")


def _diagnose(line: str) -> str | None:
    if "address already in use" in line.lower() or "Errno 98" in line:
        return "the port is already in use: stop the other server or pick another --port"
    if "does not point to a file" in line or "You need to provide valid file paths" in line:
        return "a TLS file is missing: regenerate them with `facefed-server certs --out DIR`"
    return None


def serve(
    paths: StatePaths, *, host: str, port: int, tls: TlsFiles | None, node_auth: bool, control_port: int = 0
) -> int:
    """Run the SuperLink in the foreground until Ctrl-C / SIGTERM; returns its exit code."""
    # One server per state directory: two SuperLinks on one database would corrupt each other's view.
    lock = open(paths.root / "server.lock", "a+")  # noqa: SIM115 - held (and closed) for the server's lifetime
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise SuperLinkError(
            f"another server is already running with state {paths.root} (see {paths.server_json}); stop it first"
        ) from None
    try:
        return _serve(paths, host=host, port=port, control_port=control_port, tls=tls, node_auth=node_auth)
    finally:
        lock.close()


def _serve(paths: StatePaths, *, host: str, port: int, control_port: int, tls: TlsFiles | None, node_auth: bool) -> int:
    if not port_free(host, port):
        raise SuperLinkError(f"port {port} on {host} is already in use: stop the other server or pick another --port")
    if paths.server_json.is_file():  # a previous server's SuperExec and ServerApps may outlive it
        with contextlib.suppress(ValueError, TypeError, OSError):
            stop_stale(paths.server_info().address, log=lambda line: print(f"facefed-server: {line}", flush=True))
    control_port = control_port or free_port(CONTROL_HOST)
    if control_port == port or not port_free(CONTROL_HOST, control_port):
        raise SuperLinkError(f"control port {control_port} on {CONTROL_HOST} is in use: pick another --control-port")
    address = f"{CONTROL_HOST}:{control_port}"
    write_connection(paths, address, tls.ca if tls else None)
    paths.write_server_info(
        ServerInfo(
            address=address,
            bind_host=host,
            port=port,
            public_address=f"{connect_host(host)}:{port}",
            tls=tls is not None,
            ca_cert=str(tls.ca) if tls else None,
            node_auth=node_auth,
            pid=os.getpid(),
        )
    )
    cmd = superlink_command(paths, host=host, port=port, control_port=control_port, tls=tls, node_auth=node_auth)
    code, diagnosis = run_foreground(
        cmd, flower_env(paths.flwr_home), on_line=_diagnose, log_path=paths.logs / "superlink.log", quiet=POLLING
    )
    if diagnosis:
        raise SuperLinkError(diagnosis)
    return code


# -- the `flwr` CLI against our connection --------------------------------------------------
def flwr_cli(paths: StatePaths, args: list[str], *, timeout: float = 120.0) -> dict[str, Any]:
    """Run `flwr ARGS facefed --format json` and return its JSON; errors name the command and Flower's reason."""
    env = flower_env(paths.flwr_home)
    if not paths.flwr_config.is_file():
        raise SuperLinkError(
            f"no SuperLink connection in {paths.flwr_config}; start the server with "
            f"`facefed-server start --state {paths.root}` first"
        )
    cmd = ["flwr", *args, "--format", "json"]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SuperLinkError(
            f"`flwr {' '.join(args[:2])}` did not answer within {timeout:.0f} s; "
            f"is the server at {_address(paths)} running?"
        ) from None
    out = proc.stdout.strip()
    payload: dict[str, Any] = {}
    start = out.find("{")
    if start >= 0:
        try:
            payload = json.loads(out[start:])
        except json.JSONDecodeError:
            payload = {}
    if proc.returncode != 0 or payload.get("success") is False:
        reason = payload.get("error-message") or (proc.stderr.strip() or out)[-800:]
        if "Connect" in reason or "connection" in reason.lower():
            reason += f" (is the server at {_address(paths)} running? start it with `facefed-server start`)"
        raise SuperLinkError(f"`flwr {' '.join(args[:2])}` failed: {reason}")
    return payload


def _address(paths: StatePaths) -> str:
    try:
        return paths.server_info().address
    except Exception:  # noqa: BLE001 - only used to decorate an error message
        return "(unknown address)"
