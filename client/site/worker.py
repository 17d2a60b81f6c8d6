"""The site's warm worker: the process that actually trains, kept running beside the SuperNode.

Flower starts a fresh ClientApp process for every message. Importing torch and Opacus costs several
CPU-seconds each time, which on a small machine is a large part of a federated round. So
`facefed-client start` also starts this worker once: it imports the training stack at start, then
serves one round (or one forget `query`) at a time over a Unix socket in the site's state directory.
The ClientApp stays thin (Flower plus numpy) and forwards the server's order and arrays here.

Nothing is kept between rounds: every round re-reads the vault, the head and the accountant from disk
exactly as the in-process path does (`client/site/round.py` `run_round`). The socket is 0600 and the
connection is authenticated with a random key written 0600 at start (multiprocessing's HMAC
challenge), so only processes of the site's own user that can read the state directory can use it.
If the worker is not there, the ClientApp trains in its own process instead.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Listener
from pathlib import Path

from facefed.client.state import SiteState
from facefed.common.certs import write_private

STARTUP_TIMEOUT_S = 120.0


def socket_path(state: Path) -> Path:
    return SiteState(Path(state)).worker_socket


def serve(node_config: Path) -> None:
    """Run the worker: import the training stack, then answer rounds until killed."""
    import tomllib

    from facefed.client.forget.sync import answer_query
    from facefed.client.site.refusal import refusal
    from facefed.client.site.round import SiteConfigError, order_of, run_round, site_of  # the expensive imports
    from facefed.common.protocol.forget import QueryOrder

    nc = tomllib.loads(Path(node_config).read_text())
    site = site_of(nc, {})
    vault = site.vault
    if vault is None:
        raise SiteConfigError("the warm worker serves a node with a vault (`facefed-client start`)")
    key = site.files.worker_key.read_bytes()
    sock = socket_path(site.state)
    sock.unlink(missing_ok=True)
    old = os.umask(0o177)  # the socket file is created 0600
    try:
        listener = Listener(str(sock), family="AF_UNIX", authkey=key)
    finally:
        os.umask(old)
    print(f"facefed-client: training worker for site {site.name} ready (pid {os.getpid()})", flush=True)
    with listener:
        while True:
            try:
                conn = listener.accept()
            except (AuthenticationError, OSError, EOFError):
                continue  # a peer without the key, or one that went away: ignore it
            with conn:
                try:
                    req = conn.recv()
                    if "query" in req:  # forget requests both ways (client/forget/sync.py)
                        reply = answer_query(
                            site=site.name,
                            vault_dir=vault,
                            state_dir=site.state,
                            order=QueryOrder.model_validate_json(req["query"]),
                        )
                        conn.send({"ok": True, "reply": reply.model_dump_json()})
                        continue
                    res = run_round(site, order_of(req["config"]), req["arrays"])
                    conn.send({"ok": True, "arrays": res.arrays, "metrics": res.metrics, "info": res.info})
                except (EOFError, OSError):
                    continue
                except Exception as e:  # noqa: BLE001 - reported to the ClientApp, which answers a refusal
                    why = refusal(e)
                    print(f"facefed-client: round refused ({why['kind']}): {why['reason']}", flush=True)
                    try:
                        conn.send({"ok": False, "error": why["reason"], "kind": why["kind"]})
                    except (EOFError, OSError):
                        pass


def start(
    node_config: Path, state: Path, *, preexec_fn=None, log_path: Path | None = None, wait: bool = True
) -> subprocess.Popen:
    """Start the worker for this node (fresh key each time); with `wait`, until its socket is up.

    Without waiting, rounds that arrive before it is ready are trained in the ClientApp's process."""
    state = Path(state)
    write_private(SiteState(state).worker_key, secrets.token_bytes(32))
    socket_path(state).unlink(missing_ok=True)
    out = open(log_path, "a") if log_path else subprocess.DEVNULL  # noqa: SIM115 - owned by the child
    proc = subprocess.Popen(
        [sys.executable, "-m", "facefed.client.site.worker", str(node_config)],
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        preexec_fn=preexec_fn,
    )
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while wait and time.monotonic() < deadline:
        if socket_path(state).exists():
            return proc
        if proc.poll() is not None:
            raise RuntimeError(f"the training worker exited at start (code {proc.returncode}); see {log_path}")
        time.sleep(0.1)
    if not wait:
        return proc
    proc.terminate()
    raise RuntimeError(f"the training worker did not start within {STARTUP_TIMEOUT_S:.0f} s; see {log_path}")


def call(state: Path, request: dict) -> dict | None:
    """Send one round to the worker and wait for its answer; None if there is no worker to ask."""
    files = SiteState(Path(state))
    sock, key_path = files.worker_socket, files.worker_key
    if not sock.exists() or not key_path.exists():
        return None
    try:
        conn = Client(str(sock), family="AF_UNIX", authkey=key_path.read_bytes())
    except (OSError, AuthenticationError, EOFError):
        return None  # stale socket (worker gone): train in-process
    with conn:
        conn.send(request)
        return conn.recv()


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
