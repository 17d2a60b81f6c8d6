"""The federated part of `make demo`: three sites, one server, real processes, TLS, node authentication.

    python demo/federation.py [--workdir demo-state/federation] [--config configs/federation.toml] [--people N]

What it does, step by step (each step is the CLI a real operator or site would run):
1. three site vaults from disjoint LFW peopleDevTrain people (all 1,184 with >= 2 images, ~395 per site:
   sites of 40 people cannot move the model, bench/small_sites.py), Shamir 2-of-3 over three store dirs;
2. `facefed-server certs`, `facefed-client keygen` per site, `facefed-server start` (TLS + node auth),
   `facefed-server sites register` per site;
3. `facefed-client start` per site (a Flower SuperNode each, on 127.0.0.1);
4. `facefed-server train` with configs/federation.toml: per-person DP-SGD at the sites, backbone-only
   FedAvg at the server, LFW accuracy (View 2, pairs of people no site holds) and each site's epsilon
   printed per round;
5. `facefed-server status`, then every process is stopped by its PID.

The module doubles as the harness the federation tests and bench/federation.py drive (`Federation`,
`build_vault`, `pick_people`); importing it starts nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from facefed.common.lfw import LFW, SITE_MIN_IMAGES, partition_people  # noqa: E402

BIN = Path(sys.executable).parent
SERVER, CLIENT = str(BIN / "facefed-server"), str(BIN / "facefed-client")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def pick_people(lfw: LFW, sites: int, per_site: int | None, *, min_images: int = 4) -> list[list[str]]:
    """Disjoint people per site from peopleDevTrain (>= min_images each): the deployment's own split;
    `per_site` None gives every such person to some site."""
    counts = lfw.counts()
    names = [n for n in lfw.people("peopleDevTrain.txt") if counts.get(n, 0) >= min_images]
    parts = partition_people(names, sites)
    if per_site is None:
        return parts
    if any(len(p) < per_site for p in parts):
        raise ValueError(f"peopleDevTrain has too few people with >= {min_images} images for {sites} x {per_site}")
    return [p[:per_site] for p in parts]


def build_vault(
    lfw: LFW, names: list[str], root: Path, *, max_images: int, threshold: int = 2, n_stores: int = 3
) -> Path:
    """A site vault holding `names`' LFW images as Shamir shares over `n_stores` store directories, each
    detected and aligned into its canonical crop as `vault import --lfw` stores it; images with no
    detected face are left out (as the import does)."""
    from facefed.client.vault.vault import Vault
    from facefed.common.faces.lfw import canonical_public

    stores = []
    for i in range(1, n_stores + 1):
        d = root / "stores" / f"store{i}"
        d.mkdir(parents=True, exist_ok=True)
        stores.append(str(d))
    keys = [k for n in names for k in lfw.keys(n)[:max_images]]
    images = lfw.load_images(keys)
    crops = [(k, crop) for k, crop in canonical_public((k, images[k]) for k in keys) if crop is not None]
    with Vault.create(root / "vault", stores, threshold) as vault:
        vault.put_many([(k.name, crop, Path(k.relpath).name) for k, crop in crops])
    return root / "vault"


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Signal the process group we started (the CLI, its Flower child and theirs), then wait."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        return self.popen.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Federation:
    """One server and its sites as real processes on 127.0.0.1, in `root`."""

    root: Path
    sites: list[str]
    port: int = 0
    threads: int = 1
    env: dict = field(default_factory=dict)
    procs: dict[str, Proc] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.tls = self.root / "tls"
        self.state = self.root / "server-state"
        self.logs = self.root / "logs"
        self.logs.mkdir(exist_ok=True)
        self.runtime_ports = {s: free_port() for s in self.sites}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def site_dir(self, site: str) -> Path:
        return self.root / "sites" / site

    def vault(self, site: str) -> Path:
        return self.site_dir(site) / "vault"

    def key(self, site: str) -> Path:
        return self.site_dir(site) / "keys" / "node.key"

    def _env(self) -> dict:
        env = dict(os.environ)
        env.update(
            {
                "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                "PYTHONUNBUFFERED": "1",
                **self.env,
            }
        )
        return env

    def run(self, *args: str, timeout: float = 600.0, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), env=self._env(), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:3])} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def spawn(self, name: str, *args: str) -> Proc:
        log = self.logs / f"{name}.log"
        with open(log, "a") as f:
            popen = subprocess.Popen(
                list(args),
                env=self._env(),
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.procs[name] = proc
        return proc

    # -- setup ----------------------------------------------------------------------------------
    def certs(self) -> None:
        if not (self.tls / "ca.crt").exists():
            self.run(SERVER, "certs", "--out", str(self.tls))

    def keygen(self, site: str) -> Path:
        if not self.key(site).exists():
            self.run(CLIENT, "keygen", "--out", str(self.key(site).parent))
        return self.key(site).with_name("node.pub")

    def start_server(self, *extra: str, wait: float = 90.0) -> Proc:
        proc = self.spawn(
            "server",
            SERVER,
            "start",
            "--state",
            str(self.state),
            "--tls-dir",
            str(self.tls),
            "--port",
            str(self.port),
            *extra,
        )
        if not wait_port(self.port, wait):
            raise RuntimeError(f"server did not listen on {self.port}:\n{proc.output()[-3000:]}")
        return proc

    def register(self, site: str) -> None:
        self.run(SERVER, "sites", "register", str(self.keygen(site)), "--name", site, "--state", str(self.state))

    def start_node(self, site: str, *extra: str, name: str | None = None) -> Proc:
        return self.spawn(
            name or f"node-{site}",
            CLIENT,
            "start",
            "--site",
            site,
            "--vault",
            str(self.vault(site)),
            "--server",
            self.address,
            "--root-cert",
            str(self.tls / "ca.crt"),
            "--key",
            str(self.key(site)),
            "--runtime-port",
            str(self.runtime_ports[site]),
            "--threads",
            str(self.threads),
            "--receipt-key",  # the site pins the server's receipt key (issue 11)
            str(self.tls / "receipts.pub"),
            *extra,
        )

    def setup(self, nodes: bool = True) -> None:
        self.certs()
        self.start_server()
        for s in self.sites:
            self.register(s)
        if nodes:
            for s in self.sites:
                self.start_node(s)

    def train(self, config: Path, *extra: str, timeout: float = 900.0) -> subprocess.CompletedProcess:
        return self.run(
            SERVER, "train", "--state", str(self.state), "--config", str(config), *extra, timeout=timeout, check=False
        )

    def status(self) -> str:
        return self.run(SERVER, "status", "--state", str(self.state), check=False).stdout

    def wait_online(self, n: int, timeout: float = 90.0) -> None:
        """Until n nodes are online at the SuperLink (a round would otherwise wait for them)."""
        import json

        deadline = time.monotonic() + timeout
        env = self._env() | {"FLWR_HOME": str(self.state / "flwr")}
        while time.monotonic() < deadline:
            out = subprocess.run(
                [str(BIN / "flwr"), "supernode", "list", "--format", "json"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout
            try:
                nodes = json.loads(out[out.find("{") :]).get("nodes", [])
            except ValueError:
                nodes = []
            if sum(1 for x in nodes if x.get("status") == "online") >= n:
                return
            time.sleep(1.0)
        raise RuntimeError(f"fewer than {n} sites came online within {timeout:.0f} s")

    def stop_all(self) -> None:
        for name in list(self.procs):
            if name != "server":
                self.procs[name].stop()
        if "server" in self.procs:
            self.procs["server"].stop()


def write_config(
    path: Path,
    *,
    rounds: int,
    min_sites: int,
    steps: int,
    probe_steps: int,
    sample_rate: float,
    noise: float,
    delta: float,
    max_epsilon: float,
    max_pairs: int | None,
    round_timeout: float = 900.0,
    wait_for_sites: float = 120.0,
    max_attempts: int = 2,
) -> Path:
    """A federation config (the same keys as configs/federation.toml)."""
    lines = [
        'name = "demo"',
        f"rounds = {rounds}",
        f"min_sites = {min_sites}",
        f"round_timeout_s = {round_timeout}",
        f"wait_for_sites_s = {wait_for_sites}",
        f"max_round_attempts = {max_attempts}",
        'weighting = "people"',
        "",
        "[evaluate]",
        'pairs = "pairsDevTest.txt"',
    ]
    if max_pairs:
        lines.append(f"max_pairs = {max_pairs}")
    lines += [
        "",
        "[train]",
        'privacy_unit = "person"',
        f"delta = {delta}",
        f"max_epsilon = {max_epsilon}",
        f"noise_multiplier = {noise}",
        "max_grad_norm = 1.0",
        f"sample_rate = {sample_rate}",
        f"steps = {steps}",
        f"probe_steps = {probe_steps}",
        'train_from = "conv_5"',
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


# -- what is left of a person on disk (the demo and the end-to-end tests scan with these) ---------------
def shares_of(vault: Path, stores: list[Path], pseudonym: str) -> dict[str, int]:
    """Share files of this person per store, found by the keyed owner tag in each share header."""
    from facefed.client.vault.sharefile import HEADER, ShareKeys

    owner = ShareKeys((vault / "key").read_bytes()).owner(pseudonym)
    return {
        s.name: sum(HEADER.unpack_from(f.read_bytes())[7] == owner for f in s.iterdir() if f.is_file()) for s in stores
    }


def head_rows_of(state: Path, pseudonym: str, person: str) -> list[str]:
    """Stored head checkpoints that still hold a row for this person."""
    import torch

    hits = []
    for f in sorted(state.rglob("*.pt")):
        blob = torch.load(f, map_location="cpu", weights_only=True)
        ids = blob.get("ids", []) if isinstance(blob, dict) else []
        if pseudonym in ids or person in ids:
            hits.append(str(f.relative_to(state)))
    return hits


def files_mentioning(root: Path, *needles: str) -> list[str]:
    """Every file under `root` whose raw bytes contain one of the needles (SQLite free pages included)."""
    found = []
    for f in root.rglob("*"):
        if f.is_file():
            raw = f.read_bytes()
            if any(n.encode() in raw for n in needles):
                found.append(str(f.relative_to(root)))
    return found


def test_set(config: Path) -> str:
    """The test pairs a federation config evaluates on, as output names them."""
    from facefed.common.config import load_config
    from facefed.common.fedconfig import FederationConfig

    return load_config(config, FederationConfig).evaluate.label


def accuracy_by_round(state: Path) -> str:
    """One line: the latest run's LFW accuracy and AUC before training and after every committed round."""
    from facefed.server.ledger.db import Ledger

    with Ledger(state / "ledger.sqlite") as ledger:
        runs = ledger.runs()
        if not runs:
            return "no run"
        run = runs[-1]
        base = run.base_metrics or {}
        points = [("base", base)] + [
            (f"round {r.round}", r.metrics) for r in ledger.rounds(run.run_id, committed_only=True)
        ]
    cells = [
        f"{name} {100 * m['lfw_accuracy']:.2f} % (AUC {m['lfw_auc']:.4f})" for name, m in points if "lfw_accuracy" in m
    ]
    if len(cells) < 2 or "lfw_accuracy" not in base:
        return " -> ".join(cells) or "not evaluated"
    last = points[-1][1]
    change = 100 * (last["lfw_accuracy"] - base["lfw_accuracy"])
    pairs = round(change / 100 * last.get("lfw_pairs", 0))
    return (
        " -> ".join(cells) + f"; change {change:+.2f} points ({pairs:+d} of {int(last.get('lfw_pairs', 0))} pairs; "
        f"the 10-fold spread is ± {100 * base.get('lfw_accuracy_std', 0):.2f})"
    )


def main(argv: list[str] | None = None, after: Callable[[Federation], int] | None = None) -> int:
    """Build the vaults, start everything, train; then `after(fed)` while it all still runs."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / "demo-state" / "federation")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "federation.toml")
    ap.add_argument(
        "--people",
        type=int,
        default=None,
        help="people per site (default: all peopleDevTrain people with >= 2 images, ~395 per site)",
    )
    ap.add_argument("--max-images", type=int, default=8, help="images per person in the vaults")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per site (3 sites share the cores)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(2)
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so the `finally` below stops every process.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sites = ["north", "south", "east"]
    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    t0 = time.monotonic()
    lfw = LFW()
    fed = Federation(args.workdir, sites, threads=args.threads)
    split = pick_people(lfw, len(sites), args.people, min_images=SITE_MIN_IMAGES)
    print(
        f"[demo] building 3 site vaults ({' / '.join(str(len(n)) for n in split)} disjoint peopleDevTrain people, "
        f"<= {args.max_images} images each, detected + aligned into canonical crops, Shamir 2-of-3; "
        f"a few minutes the first time, then the landmarks are cached)",
        flush=True,
    )
    for site, names in zip(sites, split):
        t_site = time.monotonic()
        build_vault(lfw, names, fed.site_dir(site), max_images=args.max_images)
        print(f"[demo]   {site}: {len(names)} people in {time.monotonic() - t_site:.0f} s", flush=True)
    print(
        f"[demo] server on {fed.address} with TLS and node authentication; registering {', '.join(sites)}", flush=True
    )
    try:
        fed.setup()
        fed.wait_online(len(sites))
        print(
            f"[demo] {len(sites)} site nodes online after {time.monotonic() - t0:.0f} s; training "
            f"({args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config})",
            flush=True,
        )
        proc = subprocess.Popen(
            [SERVER, "train", "--state", str(fed.state), "--config", str(args.config)],
            env=fed._env(),
            stdout=sys.stdout,
            stderr=sys.stderr,
        )
        try:
            code = proc.wait()
        finally:
            if proc.poll() is None:  # interrupted: the follower goes too
                proc.terminate()
                proc.wait(30)
        print(fed.status(), flush=True)
        print(f"[demo] LFW {test_set(args.config)} (aligned) per round: {accuracy_by_round(fed.state)}", flush=True)
        print(
            f"[demo] federation done in {time.monotonic() - t0:.0f} s (exit {code}); state in {args.workdir}",
            flush=True,
        )
        if code == 0 and after is not None:
            code = after(fed)
        return code
    finally:
        fed.stop_all()


if __name__ == "__main__":
    sys.exit(main())
