"""Run this site's Flower SuperNode (`facefed-client start`).

The SuperNode is Flower's long-lived site process: it connects out to the server (TLS, signed with
the site's node key), and for each message launches a fresh ClientApp process (`client/site/app.py`).
The ClientApp learns where this site's vault and training state live from the node config, which we
write as a TOML file beside the state (paths are then never re-quoted on a command line).

Flower's connection errors are terse; `diagnose` turns the ones a site operator meets into a reason
and a remedy, and the node is stopped instead of retrying a refusal forever.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from facefed.client.site import guard, privsep, worker
from facefed.client.state import SiteState, worker_socket_in
from facefed.common.childproc import die_with_parent, flower_env, run_foreground
from facefed.common.errors import FacefedError
from facefed.common.nodekeys import check_site_name, fingerprint, load_private

ACTIVATION_REFUSED = "refused by the server"
# A node that crashed is still "online" at the SuperLink until it misses two 30 s heartbeats, and an
# online node cannot be activated again; so a refused activation is retried for this long.
ACTIVATION_WAIT_S = 75.0


class NodeError(FacefedError, RuntimeError):
    """The node could not start or was refused; the message says why and what to do."""


@dataclass(frozen=True)
class NodeSettings:
    site: str
    vault: Path
    state: Path
    server: str  # host:port
    root_cert: Path | None
    key: Path | None
    insecure: bool
    runtime_port: int
    pretrained: Path | None
    max_retries: int | None = None
    threads: int = 1
    worker: bool = True  # keep a warm training process (see client/site/worker.py)
    activation_wait_s: float = ACTIVATION_WAIT_S
    node_user: str | None = None  # privilege separation (client/site/privsep.py)
    node_dir: Path | None = None

    @property
    def files(self) -> SiteState:
        return SiteState(self.state, self.vault)

    def validate(self) -> NodeSettings:
        check_site_name(self.site)
        host, sep, port = self.server.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise NodeError(f"--server {self.server!r}: expected HOST:PORT, e.g. 127.0.0.1:8000")
        if not self.vault.is_dir():
            raise NodeError(f"vault {self.vault} does not exist; create it with `facefed-client vault init`")
        if not (self.vault / "vault.toml").is_file() or not (self.vault / "key").is_file():
            raise NodeError(
                f"{self.vault} is not a vault (no vault.toml or key); give the site's vault directory "
                f"(`facefed-client vault init` makes one)"
            )
        if self.insecure and (self.root_cert or self.key):
            raise NodeError(
                "--insecure turns TLS off, so it cannot be combined with --root-cert or --key "
                "(node authentication needs TLS)"
            )
        if not self.insecure and self.root_cert is None:
            raise NodeError(
                "TLS needs the federation's CA certificate: pass --root-cert ca.crt "
                "(from the operator's `facefed-server certs`); --insecure only for a local test"
            )
        if self.root_cert is not None and not self.root_cert.is_file():
            raise NodeError(f"--root-cert {self.root_cert} does not exist")
        if self.key is not None:
            load_private(self.key)  # raises NodeKeyError with the file name and the remedy
        if self.pretrained is not None and not self.pretrained.is_file():
            raise NodeError(
                f"pretrained weights {self.pretrained} do not exist (set FACEFED_PRETRAINED or --pretrained)"
            )
        if not 1 <= self.threads <= 256:
            raise NodeError(f"--threads {self.threads}: expected 1..256")
        if not 0 < self.runtime_port < 65536:
            raise NodeError(f"--runtime-port {self.runtime_port} is not a port")
        if self.node_user is not None:
            node = privsep.node_account(self.node_user)
            if not self.worker:
                raise NodeError("--node-user needs the training worker: drop --no-worker")
            if self.state.exists():
                privsep.check(self.vault, self.state, node)
        elif self.node_dir is not None:
            raise NodeError("--node-dir is where a privilege-separated node runs: give --node-user too")
        return self

    @property
    def separated_dir(self) -> Path:
        """NODE_DIR of a privilege-separated node (default /var/lib/facefed/node-SITE)."""
        return self.node_dir or Path("/var/lib/facefed") / f"node-{self.site}"


def node_config_of(s: NodeSettings) -> dict[str, object]:
    """The node config the ClientApp (and the worker) read: who this site is and where its data and state are."""
    cfg: dict[str, object] = {
        "site": s.site,
        "vault": str(s.vault.resolve()),
        "state": str(s.state.resolve()),
        "threads": s.threads,
    }
    if s.pretrained is not None:
        cfg["pretrained"] = str(s.pretrained.resolve())
    return cfg


def write_node_config(s: NodeSettings) -> Path:
    s.state.mkdir(parents=True, exist_ok=True)
    path = s.files.node_config
    path.write_text(tomli_w.dumps(node_config_of(s)))
    return path


@dataclass(frozen=True)
class Layout:
    """Where this node's Flower processes run, and as whom."""

    node_config: Path
    flwr_home: Path
    link: Path  # the worker's socket directory
    root_cert: Path | None
    key: Path | None
    separated: tuple[privsep.Account, privsep.Account] | None = None  # (vault owner, node user)


def layout(s: NodeSettings) -> Layout:
    """The plain layout (everything under the state directory, one user), or the privilege-separated
    one (client/site/privsep.py): NODE_DIR for the node user, the state for the vault's owner."""
    if s.node_user is None:
        return Layout(write_node_config(s), s.files.flower_dir, s.state, s.root_cert, s.key)
    node = privsep.node_account(s.node_user)
    if not s.state.exists():
        s.state.mkdir(parents=True, mode=0o700)
        vault_owner = privsep.owner_of(s.vault)
        os.chown(s.state, vault_owner.uid, vault_owner.gid)
    owner = privsep.check(s.vault, s.state, node)
    nd = privsep.NodeDir(s.separated_dir)
    cfg = node_config_of(s) | {"link": str(nd.link), "privsep": True}
    privsep.prepare(nd.root, node, owner, config_text=tomli_w.dumps(cfg), ca_cert=s.root_cert, node_key=s.key)
    return Layout(
        nd.node_config,
        nd.home,
        nd.link,
        nd.ca_cert if s.root_cert is not None else None,
        nd.node_key if s.key is not None else None,
        (owner, node),
    )


def supernode_command(s: NodeSettings, node_config: Path, root_cert: Path | None, key: Path | None) -> list[str]:
    cmd = [
        "flower-supernode",
        "--superlink",
        s.server,
        "--node-config",
        str(node_config),
        "--port",
        str(s.runtime_port),
    ]
    if s.insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(root_cert)]
    if key is not None:
        cmd += ["--auth-supernode-private-key", str(key)]
    if s.max_retries is not None:
        cmd += ["--max-retries", str(s.max_retries)]
    return cmd


def diagnose(s: NodeSettings, line: str) -> str | None:
    """A reason and remedy for a Flower error line, or None."""
    if "Failed to activate SuperNode" in line or "[code: 2004]" in line:
        fp = fingerprint(load_private(s.key).public_key()) if s.key else "(no key given)"
        return (
            f"{ACTIVATION_REFUSED}: this site's node key ({fp}) is not registered there, or was revoked. "
            f"Send node.pub to the operator, who runs `facefed-server sites register --name {s.site} node.pub`"
            + ("" if s.key else "; and start the node with --key node.key")
        )
    if "Invalid SuperNode authentication" in line or ("401" in line and "Unauthorized" in line):
        return "refused by the server: the node's signature was not accepted (wrong or revoked node key)"
    if "CERTIFICATE_VERIFY_FAILED" in line:
        return (
            f"refused: the server's TLS certificate is not trusted by this node. Pass the federation CA "
            f"with --root-cert (the ca.crt from `facefed-server certs`); got "
            f"{s.root_cert if s.root_cert else 'none, so only system CAs were tried'}"
        )
    if "Server disconnected without sending a response" in line and s.insecure:
        return (
            "refused: the server requires TLS and this node was started with --insecure. "
            "Drop --insecure and pass --root-cert ca.crt (and --key node.key)"
        )
    if "WRONG_VERSION_NUMBER" in line or "wrong version number" in line:
        return "the server does not speak TLS at this address (is it started with --tls-dir?) or the port is wrong"
    if "SuperNode authentication requires a secure TLS connection" in line:
        return "node authentication needs TLS: drop --insecure and pass --root-cert ca.crt"
    if "Unable to parse the private key file" in line:
        return f"the node key {s.key} is not an OpenSSH EC private key; make one with `facefed-client keygen`"
    if "address already in use" in line.lower():
        return f"the node's runtime port {s.runtime_port} is in use: pick another with --runtime-port"
    return None


def preflight(s: NodeSettings, timeout: float = 10.0) -> str | None:
    """Check the server's transport before Flower retries forever without saying why.

    Returns None when the server is unreachable (a site keeps waiting for a server that restarts);
    raises NodeError when the server is up but would refuse this node's transport: an insecure node
    against a TLS server, or a CA that does not vouch for the server's certificate.
    """
    host, _, port = s.server.rpartition(":")
    host = host.strip("[]")
    try:
        sock = socket.create_connection((host, int(port)), timeout=timeout)
    except OSError as e:
        return f"server {s.server} not reachable yet ({e.strerror or e}); the node keeps retrying"
    with sock:
        if s.insecure:
            sock.sendall(f"GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            try:
                head = sock.recv(16)
            except OSError:
                head = b""
            if not head.startswith(b"HTTP/"):
                raise NodeError(
                    f"refused: the server at {s.server} requires TLS and this node was started with "
                    f"--insecure. Drop --insecure and pass --root-cert ca.crt (and --key node.key)"
                )
            return None
        ctx = ssl.create_default_context(cafile=str(s.root_cert))
        try:
            with ctx.wrap_socket(sock, server_hostname=host):
                return None
        except ssl.SSLCertVerificationError as e:
            raise NodeError(
                f"refused: the server's TLS certificate is not trusted by --root-cert {s.root_cert} "
                f"({e.verify_message}). Use the federation's ca.crt from `facefed-server certs`, "
                f"and make sure the server certificate names {host}"
            ) from None
        except ssl.SSLError as e:
            raise NodeError(
                f"TLS with the server at {s.server} failed ({e.reason or e}); is it started with "
                f"--tls-dir, and is this the right port?"
            ) from None


def run_node(s: NodeSettings) -> int:
    """Run the SuperNode in the foreground until it exits; NodeError if it was refused."""
    s.validate()
    note = preflight(s)
    if note:
        print(f"facefed-client: {note}", file=sys.stderr, flush=True)
    where = layout(s)
    env = flower_env(
        where.flwr_home,
        {
            # Pick up a new message within ~0.2 s instead of 1 s: less idle time per federated round.
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": os.environ.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2"),
        },
    )
    # The SuperExec starts `flwr-clientapp` by name: ours refuses any FAB but facefed's own and never
    # imports code from one (client/site/guard.py).
    shim_dir = where.flwr_home / "bin"
    guard.write_shim(shim_dir)
    env["PATH"] = str(shim_dir) + os.pathsep + env["PATH"]
    as_user = None
    if where.separated is not None:
        owner, node = where.separated
        privsep.hand_over(privsep.NodeDir(s.separated_dir), node)
        env["HOME"] = str(where.flwr_home)
        as_user = (node.uid, node.gid)
        print(
            f"facefed-client: privilege separation: SuperNode and ClientApps as {node.name} in "
            f"{s.separated_dir}, training worker as {owner.name}",
            file=sys.stderr,
            flush=True,
        )
    s.files.logs_dir.mkdir(parents=True, exist_ok=True)
    if where.separated is not None:  # the logs are written by this process, owned by the vault's owner
        for log in ("supernode.log", "worker.log"):
            (s.files.logs_dir / log).touch()
        privsep.adopt([s.vault, s.state], where.separated[0])
    # A separated ClientApp cannot train in its own process: wait for the worker before joining.
    warm = (
        worker.start(
            where.node_config,
            where.link,
            preexec_fn=die_with_parent,
            log_path=s.files.logs_dir / "worker.log",
            wait=where.separated is not None,
            separated=where.separated,
        )
        if s.worker
        else None
    )
    deadline = time.monotonic() + s.activation_wait_s
    try:
        while True:
            code, why = run_foreground(
                supernode_command(s, where.node_config, where.root_cert, where.key),
                env,
                on_line=lambda line: diagnose(s, line),
                log_path=s.files.logs_dir / "supernode.log",
                as_user=as_user,
            )
            if not (why and why.startswith(ACTIVATION_REFUSED) and time.monotonic() < deadline):
                break
            print(
                "facefed-client: the server refused to activate this node; if it crashed less than a minute "
                "ago the server still counts it online, so trying again in 15 s",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(15)
    finally:
        if warm is not None:
            warm.terminate()
            try:
                warm.wait(timeout=10)
            except subprocess.TimeoutExpired:
                warm.kill()
                warm.wait()
            worker_socket_in(where.link).unlink(missing_ok=True)
    if why:
        raise NodeError(why)
    return code
