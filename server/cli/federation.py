"""`facefed-server start/certs/sites/train/status/simulate`: run and steer the federation."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from facefed.common import certs as certmod
from facefed.common.cli import fail
from facefed.common.config import ConfigError, load_config
from facefed.common.fedconfig import FederationConfig
from facefed.common.nodekeys import NodeKeyError, check_site_name, fingerprint, load_public, openssh_public
from facefed.common.paths import DataNotFound, lfw_path, pretrained_path
from facefed.server.ledger.db import Ledger, LedgerError
from facefed.server.ops.progress import follow, submit
from facefed.server.ops.superlink import (
    TLS_CA,
    TLS_CERT,
    TLS_KEY,
    SuperLinkError,
    TlsFiles,
    flwr_cli,
    serve,
)
from facefed.server.state import StateDirError, StatePaths

StateOpt = Annotated[
    Path,
    typer.Option(
        "--state",
        envvar="FACEFED_SERVER_STATE",
        help="Server state directory (ledger, checkpoints, SuperLink database).",
    ),
]
sites_app = typer.Typer(help="Register, list and revoke the sites allowed to join.", no_args_is_help=True)
console = Console()
RECEIPT_KEY, RECEIPT_PUB = "receipts.key", "receipts.pub"


def _paths(state: Path, *, create: bool = False) -> StatePaths:
    try:
        return StatePaths.at(state, create=create, started=not create)
    except StateDirError as e:
        fail(str(e))
        raise  # unreachable


# -- start / certs --------------------------------------------------------------------------------
def start(
    state: StateOpt,
    port: Annotated[int, typer.Option("--port", help="The port sites dial: the Fleet API only.")] = 8000,
    host: Annotated[str, typer.Option("--host", help="Address the sites' port listens on.")] = "127.0.0.1",
    control_port: Annotated[
        int,
        typer.Option(
            "--control-port",
            help="Loopback port of the Control and Runtime APIs (this host's operator only); 0 picks a free one.",
        ),
    ] = 0,
    tls_dir: Annotated[
        Path | None, typer.Option("--tls-dir", help="ca.crt, server.crt, server.key (from `facefed-server certs`).")
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="No TLS and no node authentication (local experiments only).")
    ] = False,
) -> None:
    """Run the server (Flower SuperLink) in the foreground; Ctrl-C stops it cleanly."""
    if not 0 < port < 65536:
        fail(f"--port {port} is not a TCP port")
    if not 0 <= control_port < 65536:
        fail(f"--control-port {control_port} is not a TCP port")
    if tls_dir is None and not insecure:
        fail(
            "the server runs with TLS and node authentication by default: pass --tls-dir DIR "
            "(make it with `facefed-server certs --out DIR`), or --insecure for a local experiment"
        )
    if tls_dir is not None and insecure:
        fail("--insecure and --tls-dir contradict each other; pick one")
    try:  # bad TLS input is refused before the state directory is created
        tls = TlsFiles.from_dir(tls_dir) if tls_dir else None
    except SuperLinkError as e:
        fail(str(e))
    if state.expanduser().exists() and not state.expanduser().is_dir():
        fail(f"--state {state} is a file; give a directory for the server state")
    paths = _paths(state, create=True)
    try:
        Ledger(paths.ledger).close()  # create it now so `status` works before the first run
        code = serve(paths, host=host, port=port, control_port=control_port, tls=tls, node_auth=tls is not None)
    except SuperLinkError as e:
        fail(str(e), 3)
    raise typer.Exit(0 if code in (0, -2, 130, -15, 143) else code)


def certs(
    out: Annotated[Path, typer.Option("--out", help="Directory for the CA, server and receipt keys.")],
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="Name or IP sites dial (repeatable); 127.0.0.1 and localhost are always included."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing files.")] = False,
) -> None:
    """Make the federation's CA, the server TLS certificate and the receipt-signing key."""
    out = out.expanduser().resolve()
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file; give a directory for the certificates and keys")
    targets = [out / n for n in (TLS_CA, "ca.key", TLS_CERT, TLS_KEY, RECEIPT_KEY, RECEIPT_PUB)]
    existing = [p.name for p in targets if p.exists()]
    if existing and not force:
        fail(
            f"{out} already holds {', '.join(existing)}; pass --force to replace them (sites then need the new ca.crt)"
        )
    hosts = ["127.0.0.1", "localhost", *(host or [])]
    ca = certmod.make_ca("facefed federation CA")
    leaf = certmod.issue(ca, "facefed-server", hosts=list(dict.fromkeys(hosts)), server=True)
    try:
        certmod.write_public(out / TLS_CA, certmod.pem_cert(ca.cert))
        certmod.write_private(out / "ca.key", certmod.pem_private(ca.key))
        certmod.write_public(out / TLS_CERT, certmod.pem_cert(leaf.cert))
        certmod.write_private(out / TLS_KEY, certmod.pem_private(leaf.key))
        certmod.make_ed25519(out / RECEIPT_KEY, out / RECEIPT_PUB)
    except OSError as e:
        fail(f"--out {out}: {e.strerror or e} ({e.filename or out})")
    typer.echo(f"CA certificate:      {out / TLS_CA}  (give this to every site: --root-cert)")
    typer.echo(f"CA key:              {out / 'ca.key'}  (keep offline; only needed to issue new certificates)")
    typer.echo(f"server certificate:  {out / TLS_CERT}  for {', '.join(dict.fromkeys(hosts))}")
    typer.echo(f"server key:          {out / TLS_KEY}")
    typer.echo(f"receipt signing key: {out / RECEIPT_KEY}  (public: {RECEIPT_PUB})")


# -- sites ----------------------------------------------------------------------------------------
@sites_app.command("register")
def sites_register(
    key: Annotated[Path, typer.Argument(help="The site's node.pub (from `facefed-client keygen`).")],
    name: Annotated[str, typer.Option("--name", help="The site's name.")],
    state: StateOpt,
) -> None:
    """Allow a site's node key to join (registers it with the SuperLink and in the ledger)."""
    paths = _paths(state)
    try:
        check_site_name(name)
        pub = load_public(key)
    except (ValueError, NodeKeyError) as e:
        fail(str(e))
    fp = fingerprint(pub)
    with Ledger(paths.ledger) as ledger:
        current = {s.name: s for s in ledger.sites()}
        if name in current and current[name].active:
            fail(
                f"site {name!r} is already registered (key {current[name].fingerprint}); "
                f"revoke it first with `facefed-server sites revoke {name}`"
            )
        holder = ledger.site_by_fingerprint(fp)
        if holder:
            fail(f"this key ({fp}) is already registered for site {holder.name!r}")
        # `flwr supernode register` reads OpenSSH; accept a PEM key too by converting it.
        ssh_path = paths.root / "keys" / f"{name}.pub"
        ssh_path.parent.mkdir(exist_ok=True)
        ssh_path.write_bytes(openssh_public(pub) + b"\n")
        try:
            res = flwr_cli(paths, ["supernode", "register", str(ssh_path), "--name", name])
        except SuperLinkError as e:
            fail(str(e), 3)
        try:
            ledger.add_site(name, fp, openssh_public(pub).decode(), str(res.get("node-id", "")) or None)
        except LedgerError as e:
            fail(str(e))
    typer.echo(f"registered site {name}: node {res.get('node-id')} key {fp}")


@sites_app.command("ls")
def sites_ls(state: StateOpt) -> None:
    """List sites: registration, key fingerprint, online status, privacy spent."""
    paths = _paths(state)
    online: dict[str, str] = {}
    try:
        for n in flwr_cli(paths, ["supernode", "list"], timeout=30).get("nodes", []):
            online[str(n.get("node-id"))] = str(n.get("status"))
    except SuperLinkError:
        pass  # the server may be down: the ledger still answers
    with Ledger(paths.ledger) as ledger:
        eps = ledger.site_epsilons()
        t = Table(title="sites")
        for col in ("site", "node id", "key fingerprint", "registered", "revoked", "status", "epsilon"):
            t.add_column(col)
        for s in ledger.sites():
            e = eps.get(s.name)
            t.add_row(
                s.name,
                s.node_id or "-",
                s.fingerprint[:23] + "...",
                _ts(s.registered_at),
                _ts(s.revoked_at) if s.revoked_at else "-",
                online.get(s.node_id or "", "unknown" if not online else "offline") if s.active else "revoked",
                f"{e.epsilon:.3f} per {e.unit} (delta {e.delta:g})" if e else "-",
            )
    console.print(t)


@sites_app.command("revoke")
def sites_revoke(name: Annotated[str, typer.Argument(help="Site name.")], state: StateOpt) -> None:
    """Stop a site from joining: unregisters its node key; its past rounds stay in the ledger."""
    paths = _paths(state)
    with Ledger(paths.ledger) as ledger:
        try:
            site = ledger.site(name)
        except LedgerError as e:
            fail(str(e))
        if not site.active:
            fail(f"site {name!r} is already revoked")
        if site.node_id:
            try:
                flwr_cli(paths, ["supernode", "unregister", site.node_id])
            except SuperLinkError as e:
                fail(f"{e}\nthe site stays registered; retry when the server is running", 3)
        ledger.revoke_site(name)
    typer.echo(f"revoked site {name} (key {site.fingerprint})")


# -- train ----------------------------------------------------------------------------------------
def _resolve_data(cfg: FederationConfig) -> tuple[str | None, str]:
    try:
        pre = str(pretrained_path(cfg.pretrained or cfg.train.pretrained).resolve())
        lfw = str(lfw_path(cfg.lfw).resolve()) if cfg.evaluate.every else None
    except DataNotFound as e:
        fail(str(e))
        raise
    return lfw, pre


def train(
    state: StateOpt,
    config: Annotated[Path, typer.Option("--config", help="Federation config (configs/federation*.toml).")],
    run: Annotated[str | None, typer.Option("--run", help="Resume this run id.")] = None,
    new: Annotated[
        bool, typer.Option("--new", help="Start a new run even if one with this config is unfinished.")
    ] = False,
    detach: Annotated[bool, typer.Option("--detach", help="Submit and return without following.")] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="Stop following after this many seconds.")] = 0.0,
    receipt_key: Annotated[
        Path | None,
        typer.Option(
            "--receipt-key",
            help="Ed25519 key for forget receipts (default: beside the server's CA, else STATE/keys/receipts.key).",
        ),
    ] = None,
) -> None:
    """Submit a training run (or resume an unfinished one) and stream per-round progress.

    Before the run and between rounds the sites are asked for forget requests; a request whose
    person the run was trained with makes it replay from before their first round (see `unlearn`)."""
    from facefed.server.ops.submission import new_run_id, write_submission

    paths = _paths(state)
    try:
        cfg = load_config(config, FederationConfig)
    except ConfigError as e:
        fail(str(e))
    lfw, pre = _resolve_data(cfg)
    with Ledger(paths.ledger) as ledger:
        if run is not None:
            try:
                existing = ledger.run(run)
            except LedgerError as e:
                fail(str(e))
            if existing.status == "completed":
                fail(f"run {run} is already completed")
            if existing.config_sha256 != cfg.sha256():
                fail(f"run {run} was started with another configuration; pass the same --config to resume it")
            run_id, resume = run, True
        elif cfg.shards > 1:  # a sharded job: its shard runs are <job>-s<k> (and their replays)
            found = None if new else ledger.resumable_family(cfg.sha256(), cfg.shards)
            run_id, resume = (found, True) if found else (new_run_id(cfg), False)
        else:
            resumable = None if new else ledger.resumable_run(cfg.sha256())
            run_id, resume = (resumable.run_id, True) if resumable else (new_run_id(cfg), False)
    if receipt_key is not None and not receipt_key.is_file():
        fail(f"--receipt-key {receipt_key} does not exist; make one with `facefed-server certs --out DIR`")
    sub = write_submission(
        paths,
        cfg,
        run_id=run_id,
        resume=resume,
        lfw=lfw,
        pretrained=pre,
        receipt_key=str(receipt_key.resolve()) if receipt_key else None,
    )
    try:
        flwr_run = submit(paths, sub)
    except SuperLinkError as e:
        fail(str(e), 3)
    typer.echo(
        f"{'resuming' if resume else 'started'} run {run_id} (Flower run {flwr_run})"
        + (f" as {cfg.shards} shard runs {run_id}-s0..s{cfg.shards - 1}" if cfg.shards > 1 else "")
    )
    if detach:
        return
    if cfg.shards > 1:
        from facefed.server.ops.progress import follow_family

        raise typer.Exit(follow_family(paths, run_id, cfg.shards, flwr_run, timeout=timeout))
    raise typer.Exit(follow(paths, run_id, flwr_run, timeout=timeout))


# -- status ---------------------------------------------------------------------------------------
def _ts(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def status(
    state: StateOpt,
    run: Annotated[str | None, typer.Option("--run", help="Show the rounds of this run (default: latest).")] = None,
) -> None:
    """Runs, rounds, sites and the latest metrics, from the ledger."""
    paths = _paths(state)
    with Ledger(paths.ledger) as ledger:
        runs = ledger.runs()
        t = Table(title="runs")
        for col in ("run", "status", "rounds", "created", "LFW acc (base -> latest)", "detail"):
            t.add_column(col)
        for r in runs:
            done = ledger.rounds(r.run_id, committed_only=True)
            acc = next((x.metrics.get("lfw_accuracy") for x in reversed(done) if "lfw_accuracy" in x.metrics), None)
            base = (r.base_metrics or {}).get("lfw_accuracy")
            t.add_row(
                r.run_id,
                r.status,
                f"{len(done)}/{r.rounds_planned}",
                _ts(r.created_at),
                f"{base:.4f} -> {acc:.4f}"
                if acc is not None and base is not None
                else f"{acc:.4f}"
                if acc is not None
                else "-",
                (r.detail or "")[:60],
            )
        console.print(t)
        target = run or (runs[-1].run_id if runs else None)
        if target:
            try:
                rounds = ledger.rounds(target)
            except LedgerError as e:
                fail(str(e))
            t = Table(title=f"rounds of {target}")
            for col in (
                "round",
                "try",
                "status",
                "ended",
                "sites",
                "missing",
                "LFW acc",
                "epsilon per site",
                "checkpoint",
                "sha256",
            ):
                t.add_column(col)
            for rr in rounds:
                acc = rr.metrics.get("lfw_accuracy")
                eps = " ".join(
                    f"{s.site}:{s.epsilon:.2f}" for s in rr.sites if s.status == "ok" and s.epsilon is not None
                )
                t.add_row(
                    str(rr.round),
                    str(rr.attempt),
                    rr.status,
                    _ts(rr.ended_at),
                    ", ".join(rr.participants) or "-",
                    ", ".join(rr.missing) or "-",
                    f"{acc:.4f}" if acc is not None else "-",
                    eps or "-",
                    rr.checkpoint_id or "-",
                    (rr.checkpoint_sha256 or "-")[:12],
                )
            console.print(t)
        t = Table(title="sites")
        for col in ("site", "key fingerprint", "registered", "revoked", "epsilon", "unit", "delta", "accountant"):
            t.add_column(col)
        spent = ledger.site_epsilons()
        names = [s.name for s in ledger.sites()] + [n for n in spent if n not in {s.name for s in ledger.sites()}]
        by_name = {s.name: s for s in ledger.sites()}
        for n in names:
            site, last = by_name.get(n), spent.get(n)
            t.add_row(
                n,
                (site.fingerprint[:23] + "...") if site else "(unregistered)",
                _ts(site.registered_at) if site else "-",
                _ts(site.revoked_at) if site and site.revoked_at else "-",
                f"{last.epsilon:.3f}" if last else "-",
                last.unit if last else "-",
                f"{last.delta:g}" if last else "-",
                last.accountant if last else "-",
            )
        console.print(t)


# -- simulate -------------------------------------------------------------------------------------
def simulate(
    config: Annotated[Path, typer.Option("--config", help="Federation config.")],
    sites: Annotated[int, typer.Option("--sites", help="Number of virtual sites.")] = 3,
    state: Annotated[Path, typer.Option("--state", help="State directory for the simulation.")] = Path("sim-state"),
    people_per_site: Annotated[
        int | None, typer.Option("--people-per-site", help="Use at most this many LFW people per site.")
    ] = None,
    max_images: Annotated[
        int | None, typer.Option("--max-images", help="Use at most this many images per person.")
    ] = None,
    cpus: Annotated[int, typer.Option("--cpus", help="CPUs for the simulation engine.")] = min(2, os.cpu_count() or 1),
) -> None:
    """Run the same ServerApp and ClientApp on Flower's simulation engine, LFW people over N virtual sites."""
    from facefed.server.ops.simulate import SimulationError, run_simulation

    if sites < 1:
        fail("--sites must be >= 1")
    try:
        cfg = load_config(config, FederationConfig)
    except ConfigError as e:
        fail(str(e))
    lfw, pre = _resolve_data(cfg)
    try:
        run_simulation(
            cfg,
            sites=sites,
            state=state,
            lfw=lfw or str(lfw_path(cfg.lfw)),
            pretrained=pre,
            people_per_site=people_per_site,
            max_images=max_images,
            cpus=cpus,
        )
    except (SimulationError, DataNotFound) as e:
        fail(str(e), 3)
    status(state.expanduser().resolve())


def register(app: typer.Typer) -> None:
    """Add the federation commands to the main CLI."""
    app.command("start")(start)
    app.command("certs")(certs)
    app.add_typer(sites_app, name="sites")
    app.command("train")(train)
    app.command("status")(status)
    app.command("simulate")(simulate)
