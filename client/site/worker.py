"""The site's warm worker: the process that actually trains, kept running beside the SuperNode.

Flower starts a fresh ClientApp process for every message. Importing torch and Opacus costs several
CPU-seconds each time, which on a small machine is a large part of a federated round. So
`facefed-client start` also starts this worker once: it imports the training stack at start, then
serves one round (or one forget `query`) at a time over a Unix socket in the site's state directory,
in typed, size-bounded messages (common/protocol/worker.py; no pickle).
The ClientApp stays thin (Flower plus numpy) and forwards the server's order and arrays here.

Nothing is kept between rounds: every round re-reads the vault, the head and the accountant from disk
exactly as the in-process path does (`client/site/round.py` `run_round`). The socket is 0600 and the
connection is authenticated with a random key written 0600 at start (multiprocessing's HMAC
challenge), so only processes of the site's own user that can read the state directory can use it.
If the worker is not there, the ClientApp trains in its own process instead.

With privilege separation (`start --node-user`, client/site/privsep.py) the worker is the only
process that can open the vault: it runs as the vault's owner, its socket and key live in
NODE_DIR/link (0660 / 0640, group of the node user, whose ClientApps connect), and a ClientApp that
finds no worker refuses the round instead of training itself.
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
from typing import Any

import numpy as np

from facefed.client.site.privsep import Account, share_key
from facefed.client.state import worker_key_in, worker_socket_in
from facefed.common.certs import write_private
from facefed.common.protocol.tail import NAMES, SHAPES, pack, unpack
from facefed.common.protocol.train import SiteInfo, TrainMetrics, TrainReply
from facefed.common.protocol.worker import (
    MAX_HEADER,
    MAX_TAIL,
    QueryCall,
    QueryDone,
    Refused,
    TrainDone,
    WorkerAnswer,
    WorkerCall,
)

STARTUP_TIMEOUT_S = 120.0


def link_of(node_config: dict[str, Any]) -> Path:
    """Where a node's worker listens, from its node config (`link`, else the state directory)."""
    return Path(str(node_config.get("link") or node_config["state"]))


def serve(node_config: Path) -> None:
    """Run the worker: import the training stack, then answer rounds until killed."""
    import tomllib

    from facefed.client.site.round import SiteConfigError, site_of  # the expensive imports

    nc = tomllib.loads(Path(node_config).read_text())
    site = site_of(nc, {})
    if site.vault is None:
        raise SiteConfigError("the warm worker serves a node with a vault (`facefed-client start`)")
    link = link_of(nc)
    key = worker_key_in(link).read_bytes()
    sock = worker_socket_in(link)
    sock.unlink(missing_ok=True)
    # 0600; 0660 for a privilege-separated node, whose ClientApps connect as the node user's group
    old = os.umask(0o117 if nc.get("privsep") else 0o177)
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
                    header, tail = conn.recv_bytes(MAX_HEADER), conn.recv_bytes(MAX_TAIL)
                    answer, out = answer_call(site, header, tail)
                    conn.send_bytes(answer.model_dump_json(by_alias=True).encode())
                    conn.send_bytes(out)
                except (EOFError, OSError):  # gone, or a message over the size limit: drop the connection
                    continue


def answer_call(site: Any, header: bytes, tail: bytes) -> tuple[WorkerAnswer, bytes]:
    """One call from the ClientApp, validated here (common/protocol/worker.py); never raises."""
    from pydantic import ValidationError

    from facefed.client.forget.sync import answer_query
    from facefed.client.site.refusal import kind_of, reason_of
    from facefed.client.site.round import order_of, run_round
    from facefed.common.protocol.train import problems

    try:
        call = WorkerCall.model_validate_json(header).call
    except ValidationError as e:
        return WorkerAnswer(
            answer=Refused(refusal="config", reason=f"malformed worker call: {problems(e)}"[:1000])
        ), b""
    try:
        if isinstance(call, QueryCall):
            reply = answer_query(site=site.name, vault_dir=site.vault, state_dir=site.state, order=call.order)
            return WorkerAnswer(answer=QueryDone(reply=reply)), b""
        order = call.order
        received = unpack(np.frombuffer(tail, dtype="<f4"), list(order.layout_names), list(order.layout_shapes))
        res = run_round(site, order_of(order.wire()), received)
        return reply_of(res, "warm")
    except Exception as e:  # noqa: BLE001 - reported to the ClientApp, which answers a TrainRefusal
        kind, reason = kind_of(e), reason_of(e)[:1000]
        print(f"facefed-client: round refused ({kind}): {reason}", flush=True)
        return WorkerAnswer(answer=Refused(refusal=kind, reason=reason)), b""


def reply_of(res: Any, worker: str) -> tuple[WorkerAnswer, bytes]:
    """The round's TrainReply (validated: exactly the allowed fields) and its tail as float32 bytes."""
    flat, names, shapes = pack(res.arrays)  # the shared tail only: the head stays at the site
    reply = TrainReply(
        metrics=TrainMetrics.model_validate(res.metrics),
        site=SiteInfo.model_validate({**res.info, "worker": worker, NAMES: names, SHAPES: shapes}),
    )
    return WorkerAnswer(answer=TrainDone(reply=reply)), np.ascontiguousarray(flat, dtype="<f4").tobytes()


def start(
    node_config: Path,
    link: Path,
    *,
    preexec_fn=None,
    log_path: Path | None = None,
    wait: bool = True,
    separated: tuple[Account, Account] | None = None,
) -> subprocess.Popen:
    """Start the worker for this node (fresh key each time); with `wait`, until its socket is up.

    `separated` = (vault owner, node user): the worker runs as the vault's owner and its key is
    readable by the node user's group (client/site/privsep.py). Without waiting, rounds that arrive
    before it is ready are trained in the ClientApp's process (never on a privilege-separated node)."""
    link = Path(link)
    write_private(worker_key_in(link), secrets.token_bytes(32))
    worker_socket_in(link).unlink(missing_ok=True)
    who: dict[str, Any] = {}
    if separated is not None:
        owner, node = separated
        share_key(worker_key_in(link), owner, node)
        who = {"user": owner.uid, "group": owner.gid, "extra_groups": []}
    out = open(log_path, "a") if log_path else subprocess.DEVNULL  # noqa: SIM115 - owned by the child
    proc = subprocess.Popen(
        [sys.executable, "-m", "facefed.client.site.worker", str(node_config)],
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        preexec_fn=preexec_fn,
        **who,
    )
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while wait and time.monotonic() < deadline:
        if worker_socket_in(link).exists():
            return proc
        if proc.poll() is not None:
            raise RuntimeError(f"the training worker exited at start (code {proc.returncode}); see {log_path}")
        time.sleep(0.1)
    if not wait:
        return proc
    proc.terminate()
    raise RuntimeError(f"the training worker did not start within {STARTUP_TIMEOUT_S:.0f} s; see {log_path}")


def call(link: Path, request: WorkerCall, tail: bytes = b"") -> tuple[WorkerAnswer, bytes] | None:
    """Send one call to the worker and wait for its answer (validated); None if there is no worker to ask."""
    sock, key = worker_socket_in(link), worker_key_in(link)
    if not sock.exists() or not key.exists():
        return None
    try:
        conn = Client(str(sock), family="AF_UNIX", authkey=key.read_bytes())
    except (OSError, AuthenticationError, EOFError):
        return None  # stale socket (worker gone): train in-process
    with conn:
        conn.send_bytes(request.model_dump_json(by_alias=True).encode())
        conn.send_bytes(tail)
        answer = WorkerAnswer.model_validate_json(conn.recv_bytes(MAX_HEADER))
        return answer, conn.recv_bytes(MAX_TAIL)


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
