"""`facefed-server start/certs/sites/train/status/simulate`: run and steer the federation."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from facefed.common import certs as certmod
from facefed.common.cli import fail, out_console, print_json
from facefed.common.config import ConfigError, load_config
from facefed.common.fedconfig import FederationConfig
from facefed.common.nodekeys import NodeKeyError, check_site_name, fingerprint, load_public, openssh_public
from facefed.common.paths import DataNotFound, lfw_path, pretrained_path
from facefed.server.ledger.db import Ledger, LedgerError, refusal_line
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
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON document instead of tables (for scripts).")]
sites_app = typer.Typer(help="Register, list and revoke the sites allowed to join.", no_args_is_help=True)
runs_app = typer.Typer(help="List the runs in the ledger and stop a running one.", no_args_is_help=True)
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


def _online(paths: StatePaths) -> dict[str, str]:
    """node id -> Flower's status for it; empty when the server is down (the ledger still answers)."""
    online: dict[str, str] = {}
    try:
        for n in flwr_cli(paths, ["supernode", "list"], timeout=30).get("nodes", []):
            online[str(n.get("node-id"))] = str(n.get("status"))
    except SuperLinkError:
        pass
    return online


def sites_rows(ledger: Ledger, online: dict[str, str]) -> list[dict[str, Any]]:
    """Every site the ledger knows (registered or seen in a round), with its latest privacy spend."""
    eps = ledger.site_epsilons()
    rows: list[dict[str, Any]] = []
    registered = ledger.sites()
    for s in registered:
        e = eps.get(s.name)
        rows.append(
            {
                "site": s.name,
                "node_id": s.node_id,
                "fingerprint": s.fingerprint,
                "registered_at": s.registered_at,
                "revoked_at": s.revoked_at,
                "status": (online.get(s.node_id or "", "unknown" if not online else "offline"))
                if s.active
                else "revoked",
                "epsilon": e.epsilon if e else None,
                "unit": e.unit if e else None,
                "delta": e.delta if e else None,
                "accountant": e.accountant if e else None,
            }
        )
    known = {s.name for s in registered}
    for name, e in eps.items():
        if name not in known:
            rows.append(
                {
                    "site": name,
                    "node_id": None,
                    "fingerprint": None,
                    "registered_at": None,
                    "revoked_at": None,
                    "status": "unregistered",
                    "epsilon": e.epsilon,
                    "unit": e.unit,
                    "delta": e.delta,
                    "accountant": e.accountant,
                }
            )
    return rows


def sites_table(rows: list[dict[str, Any]]) -> Table:
    t = Table(title="sites")
    for col in ("site", "node id", "key fingerprint", "registered", "revoked", "status", "epsilon"):
        t.add_column(col)
    for r in rows:
        t.add_row(
            r["site"],
            r["node_id"] or "-",
            (r["fingerprint"][:23] + "...") if r["fingerprint"] else "(unregistered)",
            _ts(r["registered_at"]),
            _ts(r["revoked_at"]) if r["revoked_at"] else "-",
            r["status"],
            f"{r['epsilon']:.3f} per {r['unit']} (delta {r['delta']:g}, {r['accountant']})"
            if r["epsilon"] is not None
            else "-",
        )
    return t


@sites_app.command("ls")
def sites_ls(state: StateOpt, as_json: JsonOpt = False) -> None:
    """List sites: registration, key fingerprint, online status, privacy spent."""
    paths = _paths(state)
    online = _online(paths)
    with Ledger(paths.ledger) as ledger:
        rows = sites_rows(ledger, online)
    if as_json:
        print_json(rows)
        return
    out_console().print(sites_table(rows))


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
        lfw = str(lfw_path(cfg.lfw, how="set `lfw = PATH` in the config").resolve()) if cfg.evaluate.every else None
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
    person the run was trained with makes it replay from before their first round (see `unlearn`).
    A round that scores below the best model so far on the validation pairs is reported in one line;
    the best stays the served model (`current`)."""
    from facefed.server.ops.submission import new_run_id, write_submission

    paths = _paths(state)
    try:
        cfg = load_config(config, FederationConfig)
    except ConfigError as e:
        fail(str(e))
    lfw, pre = _resolve_data(cfg)
    with Ledger(paths.ledger) as ledger:
        from facefed.server.preflight import problems

        broken = problems(cfg, ledger)
        if broken:
            fail(f"config {config}: " + f"\nconfig {config}: ".join(broken))
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
    paths.record_data(run_id, lfw=lfw, pretrained=pre)  # `unlearn`, `evaluate`, `report` read it back
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


def _acc_text(base: float | None, acc: float | None) -> str:
    if base is not None:
        return f"{base:.4f} -> {acc:.4f}" if acc is not None else f"{base:.4f} -> -"
    return f"{acc:.4f}" if acc is not None else "-"


def _best_text(r: dict[str, Any]) -> str:
    if not r["best"]:
        return "-"
    if r["best_val_accuracy"] is None:
        return r["best"]
    return f"{r['best']} (AUC {r['best_val_auc']:.4f}, {r['best_val_accuracy']:.4f})"


def runs_rows(ledger: Ledger) -> list[dict[str, Any]]:
    """Every run in the ledger with its progress, accuracy (base and latest), its latest model, its best
    model on the validation pairs (what `current` serves of it) and how it ended."""
    out = []
    for r in ledger.runs():
        done = ledger.rounds(r.run_id, committed_only=True)
        last = next((x for x in reversed(done) if "lfw_accuracy" in x.metrics), None)
        attempts = ledger.attempts(r.run_id)
        best = ledger.best(r.run_id)
        best_score = ledger.checkpoint_score(best.checkpoint_id) if best else None
        out.append(
            {
                "run": r.run_id,
                "kind": r.kind,
                "replaces": r.parent_run_id,
                "status": r.status,
                "rounds_done": len(done),
                "rounds_planned": r.rounds_planned,
                "created_at": r.created_at,
                "ended_at": r.ended_at,
                "base_accuracy": (r.base_metrics or {}).get("lfw_accuracy"),
                "accuracy": last.metrics["lfw_accuracy"] if last else None,
                "model": done[-1].checkpoint_id if done else r.base_checkpoint,
                "best": best.checkpoint_id if best else None,
                "best_val_auc": best_score[0] if best_score else None,
                "best_val_accuracy": best_score[1] if best_score else None,
                "flwr_run": str(attempts[-1]["flwr_run_id"]) if attempts else None,
                "detail": r.detail,
            }
        )
    return out


def rounds_rows(ledger: Ledger, run_id: str) -> list[dict[str, Any]]:
    """The round attempts of a run, with each site's part (refusals as `site NAME refused (KIND): REASON`),
    the validation score, whether the round is the run's best model and, if it scored below the best
    model before it, that model (`worse_than`)."""
    out = []
    best = ledger.best(run_id)
    for rr in ledger.rounds(run_id):
        worse = ledger.worse_than(rr)
        out.append(
            {
                "round": rr.round,
                "attempt": rr.attempt,
                "status": rr.status,
                "started_at": rr.started_at,
                "ended_at": rr.ended_at,
                "participants": rr.participants,
                "missing": rr.missing,
                "accuracy": rr.metrics.get("lfw_accuracy"),
                "val_accuracy": rr.metrics.get("val_accuracy"),
                "val_auc": rr.metrics.get("val_auc"),
                "best": best is not None and rr.checkpoint_id == best.checkpoint_id,
                "worse_than": worse.best_checkpoint if worse else None,
                "checkpoint": rr.checkpoint_id,
                "sha256": rr.checkpoint_sha256,
                "detail": rr.detail,
                "sites": [
                    {
                        "site": x.site,
                        "status": x.status,
                        "epsilon": x.epsilon,
                        "delta": x.delta,
                        "unit": x.unit,
                        "detail": x.detail,
                        "refusal": refusal_line(x.site, x.detail),
                    }
                    for x in rr.sites
                ],
            }
        )
    return out


def status_doc(paths: StatePaths, run: str | None) -> dict[str, Any]:
    with Ledger(paths.ledger) as ledger:
        runs = runs_rows(ledger)
        target = run or (runs[-1]["run"] if runs else None)
        try:
            rounds = rounds_rows(ledger, target) if target else []
        except LedgerError as e:
            fail(str(e))
        best = next((r["best"] for r in runs if r["run"] == target), None)
        return {
            "runs": runs,
            "run": target,
            "best": best,
            "rounds": rounds,
            "sites": sites_rows(ledger, _online(paths)),
        }


def print_status(doc: dict[str, Any]) -> None:
    console = out_console()
    t = Table(title="runs")
    for col in (
        "run",
        "status",
        "rounds",
        "created",
        "LFW acc (base -> latest)",
        "model",
        "best (validation)",
        "detail",
    ):
        t.add_column(col)
    for r in doc["runs"]:
        t.add_row(
            r["run"],
            r["status"],
            f"{r['rounds_done']}/{r['rounds_planned']}",
            _ts(r["created_at"]),
            _acc_text(r["base_accuracy"], r["accuracy"]),
            r["model"] or "-",
            _best_text(r),
            (r["detail"] or "")[:200],
        )
    console.print(t)
    if doc["run"]:
        t = Table(title=f"rounds of {doc['run']}")
        cols = ("round", "try", "status", "ended", "sites", "missing", "LFW acc", "val AUC, acc", "epsilon per site")
        for col in (*cols, "checkpoint"):
            t.add_column(col)
        for rr in doc["rounds"]:
            eps = " ".join(
                f"{x['site']}:{x['epsilon']:.2f}"
                for x in rr["sites"]
                if x["status"] == "ok" and x["epsilon"] is not None
            )
            t.add_row(
                str(rr["round"]),
                str(rr["attempt"]),
                rr["status"],
                _ts(rr["ended_at"]),
                ", ".join(rr["participants"]) or "-",
                ", ".join(rr["missing"]) or "-",
                f"{rr['accuracy']:.4f}" if rr["accuracy"] is not None else "-",
                (f"{rr['val_auc'] or 0:.4f}, {rr['val_accuracy']:.4f}" if rr["val_accuracy"] is not None else "-")
                + (" (worse)" if rr["worse_than"] else ""),
                eps or "-",
                (rr["checkpoint"] or "-") + (" (best)" if rr["best"] else ""),
            )
        console.print(t)
        for rr in doc["rounds"]:
            for x in rr["sites"]:
                if x["refusal"]:
                    typer.echo(f"round {rr['round']} attempt {rr['attempt']}: {x['refusal']}")
        if doc.get("best"):
            typer.echo(f"best model of {doc['run']} on the validation pairs: {doc['best']}")
    console.print(sites_table(doc["sites"]))


def status(
    state: StateOpt,
    run: Annotated[str | None, typer.Option("--run", help="Show the rounds of this run (default: latest).")] = None,
    as_json: JsonOpt = False,
    watch: Annotated[
        float, typer.Option("--watch", help="Redraw every this many seconds until Ctrl-C (0: once).", min=0)
    ] = 0.0,
) -> None:
    """Runs, rounds (with each site's refusal, if any), sites and the latest metrics, from the ledger; each
    run's best checkpoint on the validation pairs (what `current` serves) is marked `(best)`, a round
    that scored below the best before it `(worse)`."""
    paths = _paths(state)
    while True:
        doc = status_doc(paths, run)
        if as_json:
            print_json(doc)
        else:
            if watch and sys.stdout.isatty():
                typer.echo("\x1b[2J\x1b[H", nl=False)  # clear the terminal between redraws
            print_status(doc)
        if not watch:
            return
        try:
            time.sleep(watch)
        except KeyboardInterrupt:
            return
        if not sys.stdout.isatty():
            typer.echo(f"-- {_ts(time.time())}")


# -- runs -----------------------------------------------------------------------------------------
@runs_app.command("ls")
def runs_ls(state: StateOpt, as_json: JsonOpt = False) -> None:
    """Every run: kind, status, rounds done, accuracy, its latest model, its best model on the validation
    pairs (what `current` serves of it) and Flower run id."""
    paths = _paths(state)
    with Ledger(paths.ledger) as ledger:
        rows = runs_rows(ledger)
    if as_json:
        print_json(rows)
        return
    t = Table(title="runs")
    cols = ("run", "kind", "status", "rounds", "LFW acc (base -> latest)", "model", "best (validation)", "Flower run")
    for col in (*cols, "detail"):
        t.add_column(col)
    for r in rows:
        t.add_row(
            r["run"],
            r["kind"] + (f" of {r['replaces']}" if r["replaces"] else ""),
            r["status"],
            f"{r['rounds_done']}/{r['rounds_planned']}",
            _acc_text(r["base_accuracy"], r["accuracy"]),
            r["model"] or "-",
            _best_text(r),
            r["flwr_run"] or "-",
            (r["detail"] or "")[:200],
        )
    out_console().print(t)


@runs_app.command("stop")
def runs_stop(run: Annotated[str, typer.Argument(help="The run id (from `runs ls`).")], state: StateOpt) -> None:
    """Stop a running run: its ServerApp is stopped; committed rounds stay, `train` resumes it later."""
    paths = _paths(state)
    with Ledger(paths.ledger) as ledger:
        try:
            row = ledger.run(run)
        except LedgerError as e:
            fail(str(e))
        if row.status != "running":
            fail(f"run {run} is {row.status}, not running")
        attempts = ledger.attempts(run)
        if not attempts:
            fail(f"run {run} has no ServerApp attempt to stop")
        flwr_run = str(attempts[-1]["flwr_run_id"])
        try:
            flwr_cli(paths, ["stop", flwr_run], timeout=60)
        except SuperLinkError as e:
            fail(f"{e}\nthe run goes on; retry when the server answers", 3)
        detail = (
            "stopped by the operator (`facefed-server runs stop`); `facefed-server train` with its config resumes it"
        )
        if ledger.run(run).status == "running":
            ledger.set_run_status(run, "stopped", detail)
            ledger.end_attempt(run, flwr_run, "stopped")
    typer.echo(f"stopped run {run} (Flower run {flwr_run}); `facefed-server train` with its config resumes it")


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
    app.add_typer(runs_app, name="runs")
    app.command("simulate")(simulate)
