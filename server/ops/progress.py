"""Submitting a run with `flwr run` and following its progress in the ledger.

`train` and `simulate` hand the ServerApp a run config (a small TOML file: the state dir and the
submission name, plus simulation paths), then print each round as the ledger commits it. The ledger,
not Flower's log stream, is what is followed: a round shows up only once it really counts.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import tomli_w
import typer

from facefed.server.ledger.best import score, score_text
from facefed.server.ledger.db import Ledger, LedgerError, RoundRow, refusal_line
from facefed.server.ops.flwr_app import write_app_dir
from facefed.server.ops.superlink import SuperLinkError, flwr_cli
from facefed.server.state import StatePaths  # noqa: TC001 - used at run time


def submit(paths: StatePaths, submission: str, extra: dict[str, Any] | None = None) -> str:
    """`flwr run` our Flower app with this submission; returns Flower's run id."""
    run_cfg = paths.submissions / (submission.removesuffix(".json") + ".run.toml")
    run_cfg.write_text(tomli_w.dumps({"state-dir": str(paths.root), "submission": submission, **(extra or {})}))
    res = flwr_cli(paths, ["run", str(write_app_dir(paths.root)), "--run-config", str(run_cfg)])
    return str(res.get("run-id", "?"))


PHASE_EVERY_S = 10.0  # repeat an unchanged phase this often, so no wait is silent


class PhaseTicker:
    """Prints what the ServerApp is doing (STATE/phase.json) when it changes, and every PHASE_EVERY_S
    while it does not: "... waiting for sites: 1 online, min_sites=2 (for 20 s)"."""

    def __init__(self, paths: StatePaths, since: float):
        self.paths, self.since = paths, since
        self.last: tuple[str, float] | None = None
        self.printed_at = 0.0

    def tick(self, quiet: bool = False) -> None:
        doc = self.paths.read_phase()
        if not doc or float(str(doc.get("since", 0))) < self.since - 1:
            return
        text, since = str(doc.get("phase", "")), float(str(doc.get("since", 0)))
        base = text.split(" after ")[0].split(" (up to")[0]
        now = time.monotonic()
        changed = self.last is None or self.last[0] != base
        if changed or now - self.printed_at >= PHASE_EVERY_S:
            if changed:
                self.last = (base, time.time())
            held = time.time() - (self.last[1] if self.last else since)
            if not quiet:
                typer.echo(f"  ... {text}" + (f" (for {held:.0f} s)" if not changed and held >= 1 else ""))
            self.printed_at = now


def print_refusals(r: RoundRow) -> None:
    """One line per site that refused this round: `site NAME refused (KIND): REASON`."""
    for s in r.sites:
        line = refusal_line(s.site, s.detail)
        if line:
            typer.secho(line, fg=typer.colors.RED)


def print_round(r: RoundRow, planned: int, ledger: Ledger) -> None:
    """The round's line; then, if validation scored it below the best model before it, one more line
    saying so and which model stays served."""
    print_refusals(r)
    if r.status == "failed":
        typer.secho(
            f"round {r.round}/{planned} attempt {r.attempt}: FAILED ({r.detail}); "
            f"missing {', '.join(r.missing) or 'none'}",
            fg=typer.colors.YELLOW,
        )
        return
    acc, val = r.metrics.get("lfw_accuracy"), score(r.metrics)
    eps = ", ".join(
        f"{s.site} {s.epsilon:.3f}" for s in r.sites if s.status == "ok" and s.epsilon is not None and s.epsilon >= 0
    )
    typer.echo(
        f"round {r.round}/{planned}: "
        + (f"LFW accuracy {acc:.4f} (AUC {r.metrics.get('lfw_auc', 0):.4f}); " if acc is not None else "")
        + (f"validation {score_text(val)}; " if val is not None else "")
        + (f"epsilon {eps}; " if eps else "")
        + f"sites {', '.join(r.participants)}"
        + (f"; missing {', '.join(r.missing)}" if r.missing else "")
        + f"; {r.metrics.get('round_s', 0):.1f} s (slowest site {r.metrics.get('slowest_site_s', 0):.1f} s)"
        + f"; checkpoint {r.checkpoint_id} ({(r.checkpoint_sha256 or '')[:12]})"
    )
    worse = ledger.worse_than(r)
    if worse is not None:
        typer.secho(worse.line(), fg=typer.colors.YELLOW)


def _flwr_run(paths: StatePaths, flwr_run: str) -> dict[str, Any] | None:
    try:
        runs = flwr_cli(paths, ["ls", "--run-id", flwr_run], timeout=30).get("runs", [])
    except SuperLinkError:
        return None
    return dict(runs[0]) if runs else None


def flwr_status(paths: StatePaths, flwr_run: str) -> str | None:
    run = _flwr_run(paths, flwr_run)
    return str(run.get("status")) if run else None


def how_it_ended(paths: StatePaths, flwr_run: str, status: str) -> str:
    """`finished:failed: ServerApp failed with exception: ...`: Flower's status with its details (the
    ServerApp's exception, or "No heartbeat received"), so the operator reads why without `flwr log`."""
    run = _flwr_run(paths, flwr_run)
    details = " ".join(str(run.get("status-details") or "").split()) if run else ""
    return f"{status}: {details[:600]}" if details else status


def _latest_attempt(ledger: Ledger, run_id: str) -> str | None:
    attempts = ledger.attempts(run_id)
    return str(attempts[-1]["flwr_run_id"]) if attempts else None


def follow(paths: StatePaths, run_id: str, flwr_run: str, *, timeout: float = 0.0, quiet: bool = False) -> int:
    """Print rounds as the ledger commits them until the run ends: 0 completed, 1 failed, 2 timeout."""
    shown: set[tuple[int, int]] = set()
    t0, last_check = time.monotonic(), time.monotonic()
    ticker = PhaseTicker(paths, time.time())
    with Ledger(paths.ledger) as ledger:
        while True:
            ticker.tick(quiet)
            try:
                run = ledger.run(run_id)
                rows = ledger.rounds(run_id)
            except LedgerError:
                run, rows = None, []
            if run is not None and run.status == "superseded":
                # Forget requests tainted this run: it was replaced by its replay, which goes on.
                nxt = [r for r in ledger.runs() if r.parent_run_id == run_id and r.kind == "replay"]
                if nxt:
                    if not quiet:
                        typer.echo(f"run {run_id} superseded: {run.detail}; following {nxt[-1].run_id}")
                    run_id = nxt[-1].run_id
                    continue
            if run is not None and run.base_metrics and (0, 0) not in shown:
                shown.add((0, 0))
                if not quiet and "lfw_accuracy" in run.base_metrics:
                    val = score(run.base_metrics)
                    typer.echo(
                        f"round 0 (base model): LFW accuracy {run.base_metrics['lfw_accuracy']:.4f} "
                        f"(AUC {run.base_metrics.get('lfw_auc', 0):.4f})"
                        + (f"; validation {score_text(val)}" if val is not None else "")
                    )
            for r in rows:
                if (r.round, r.attempt) not in shown:
                    shown.add((r.round, r.attempt))
                    if not quiet:
                        print_round(r, run.rounds_planned if run else 0, ledger)
            # A resumed run shows how its previous attempt ended (written, after a server crash, by a
            # ServerApp that may outlive the submission by seconds) until ours opens it: an end counts
            # only once the run's latest attempt is our Flower run.
            if (
                run is not None
                and run.status in ("completed", "failed", "stopped")
                and _latest_attempt(ledger, run_id) == flwr_run
            ):
                if run.status == "completed":
                    if not quiet:
                        best = ledger.best(run_id)
                        typer.echo(
                            f"run {run_id} completed" + (f"; its best model: {best.checkpoint_id}" if best else "")
                        )
                    return 0
                typer.secho(f"run {run_id} {run.status}: {run.detail}", fg=typer.colors.RED, err=True)
                return 1
            if time.monotonic() - last_check > 10:
                last_check = time.monotonic()
                st = flwr_status(paths, flwr_run)
                # The ServerApp died without marking the run (killed, or failed before opening it).
                if st and st.startswith("finished"):
                    time.sleep(2)  # let a final ledger write land
                    run = ledger.run(run_id) if run is not None else None
                    if run is None or run.status == "running" or _latest_attempt(ledger, run_id) != flwr_run:
                        typer.secho(
                            f"the ServerApp ended ({how_it_ended(paths, flwr_run, st)}) before run {run_id} finished; "
                            f"FLWR_HOME={paths.flwr_home} flwr log {flwr_run} shows why; "
                            f"`facefed-server train` with the same config resumes it",
                            fg=typer.colors.RED,
                            err=True,
                        )
                        return 1
                    continue
            if timeout and time.monotonic() - t0 > timeout:
                typer.echo(f"stopped following after {timeout:.0f} s; the run goes on")
                return 2
            time.sleep(1.0)


def run_config_path(paths: StatePaths, submission: str) -> Path:
    return paths.submissions / (submission.removesuffix(".json") + ".run.toml")


def follow_unlearn(paths: StatePaths, flwr_run: str, started: float, *, timeout: float = 0.0) -> int:
    """Print forget requests and replay rounds as the ledger records them, until the ServerApp ends:
    0 done, 1 the ServerApp failed (or a request was refused), 2 timeout."""
    t0 = time.monotonic()
    with Ledger(paths.ledger) as ledger:
        seen = {r.request_id: r.status for r in ledger.requests()}
        shown: set[tuple[str, int, int]] = set()
        asked: set[tuple[str, float]] = set()
        ticker = PhaseTicker(paths, started)
        while True:
            ticker.tick()
            for qrow in ledger.queries_since(started - 1):
                if (qrow["site"], qrow["at"]) not in asked:
                    asked.add((qrow["site"], qrow["at"]))
                    if not qrow["ok"]:
                        typer.secho(
                            f"site {qrow['site']} did not answer the query ({qrow['detail']}); its requests "
                            f"wait until it does",
                            fg=typer.colors.YELLOW,
                        )
                    elif qrow["detail"]:
                        typer.echo(f"site {qrow['site']}: {qrow['detail']}")
            for run in ledger.runs():
                if run.kind != "replay" or run.created_at < started - 1:
                    continue
                for r in ledger.rounds(run.run_id):
                    if (run.run_id, r.round, r.attempt) not in shown:
                        shown.add((run.run_id, r.round, r.attempt))
                        typer.echo(f"replay {run.run_id} (replaces {run.parent_run_id}): ", nl=False)
                        print_round(r, run.rounds_planned, ledger)
            for q in ledger.requests():
                if seen.get(q.request_id) != q.status:
                    seen[q.request_id] = q.status
                    extra = (
                        f": model {q.model_checkpoint} ({(q.model_sha256 or '')[:12]}), "
                        f"{len(q.checkpoints_deleted)} tainted checkpoint(s) deleted"
                        if q.status == "unlearned"
                        else f": {q.detail}"
                        if q.detail
                        else ""
                    )
                    typer.echo(f"request {q.request_id} from site {q.site}: {q.status}{extra}")
            st = flwr_status(paths, flwr_run)
            if st and st.startswith("finished"):
                time.sleep(1.0)
                refused = [r.request_id for r in ledger.requests("refused")]
                pending = [r.request_id for r in ledger.requests("pending")]
                undelivered = [r.request_id for r in ledger.requests("unlearned") if r.delivered_at is None]
                for fr in ledger.requests("unlearned"):
                    if fr.delivered_at is not None and fr.delivered_at >= started:
                        typer.echo(f"receipt for {fr.request_id} delivered to site {fr.site}")
                if undelivered:
                    typer.echo(f"receipts waiting for their site to come online: {', '.join(undelivered)}")
                if pending:
                    typer.echo(f"requests still pending: {', '.join(pending)}")
                if not st.endswith("completed"):
                    typer.secho(
                        f"the unlearning ServerApp ended ({how_it_ended(paths, flwr_run, st)}); FLWR_HOME={paths.flwr_home} flwr log "
                        f"{flwr_run} shows why; `facefed-server unlearn` resumes it",
                        fg=typer.colors.RED,
                        err=True,
                    )
                    return 1
                if refused:
                    typer.secho(
                        f"refused (see `facefed-server requests`): {', '.join(refused)}", fg=typer.colors.RED, err=True
                    )
                    return 1
                typer.echo("unlearning done")
                return 0
            if timeout and time.monotonic() - t0 > timeout:
                typer.echo(f"stopped following after {timeout:.0f} s; unlearning goes on")
                return 2
            time.sleep(1.0)


def follow_family(paths: StatePaths, family: str, shards: int, flwr_run: str, *, timeout: float = 0.0) -> int:
    """A sharded job: follow its shard runs in turn, then print the ensemble's accuracy."""
    t0 = time.monotonic()
    for k in range(shards):
        while True:
            with Ledger(paths.ledger) as ledger:
                live = ledger.live_run(family, k)
            if live is not None:
                break
            st = flwr_status(paths, flwr_run)
            if st and st.startswith("finished"):
                typer.secho(
                    f"the ServerApp ended ({how_it_ended(paths, flwr_run, st)}) before shard {k} started; FLWR_HOME={paths.flwr_home} "
                    f"flwr log {flwr_run} shows why",
                    fg=typer.colors.RED,
                    err=True,
                )
                return 1
            if timeout and time.monotonic() - t0 > timeout:
                return 2
            time.sleep(1.0)
        typer.echo(f"shard {k + 1}/{shards}: run {live.run_id}")
        if live.status != "completed":
            left = max(0.0, timeout - (time.monotonic() - t0)) if timeout else 0.0
            code = follow(paths, live.run_id, flwr_run, timeout=left)
            if code:
                return code
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # the ensemble evaluation follows the last shard
        with Ledger(paths.ledger) as ledger:
            ens = ledger.ensembles(family)
        if ens:
            m = ens[-1]["metrics"]
            typer.echo(f"{shards}-shard ensemble (normalised concatenation): LFW accuracy {m['lfw_accuracy']:.4f}")
            break
        st = flwr_status(paths, flwr_run)
        if st and st.startswith("finished"):
            break
        time.sleep(1.0)
    return 0
