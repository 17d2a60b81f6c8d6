"""The ServerApp (Flower Message API) and the life of a run: open or resume it, hold its lock, train
its rounds (server/rounds.py) with the forget query between them (server/forget/), one run per shard
for a sharded job, and record how each attempt ended.

One Flower run works on one ledger run (our id); a run counts a round only once the ledger committed
it, so a killed server resumes from the last committed checkpoint. Why the steps are ordered as they
are (crash safety, unlearning): docs/server-rounds.md.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from facefed.common.fedconfig import FederationConfig
from facefed.common.model.mobilefacenet import MobileFaceNet, build_embedder, sha256_file
from facefed.server.evaluation import Evaluator, Evaluators, evaluate_ensemble, save_roc
from facefed.server.forget.replay import Unlearning
from facefed.server.ledger.best import score, score_text
from facefed.server.ledger.checkpoints import CheckpointStore
from facefed.server.ledger.db import Ledger
from facefed.server.ops.submission import Submission, read_submission
from facefed.server.rounds import RoundRunner
from facefed.server.runs import RunContext, RunFailed, run_lock
from facefed.server.sites import Sites
from facefed.server.state import StatePaths

__all__ = ["Coordinator", "Evaluator", "RunFailed", "app", "main", "run_lock"]

app = ServerApp()


class Coordinator:
    """One ServerApp's work: the submission's run (or job of shard runs), or an `unlearn` pass."""

    def __init__(
        self,
        grid: Grid,
        paths: StatePaths,
        sub: Submission,
        *,
        evaluator: Callable[[MobileFaceNet], dict[str, float]] | None = None,
        log: Callable[[str], None] = print,
    ):
        self.paths, self.sub, self.log = paths, sub, log
        self.ledger = Ledger(paths.ledger)
        self.store = CheckpointStore(paths.checkpoints)
        self.sites = Sites(grid, self.ledger, phase=paths.write_phase)
        self.evaluators = Evaluators(sub.lfw, evaluator)
        self.runner = RoundRunner(
            grid,
            self.ledger,
            self.store,
            self.sites,
            self.evaluators,
            base_sha256=sha256_file(sub.pretrained),
            log=log,
            phase=paths.write_phase,
        )
        self.unlearning = Unlearning(self.runner, paths, sub.receipt_key)
        self.flwr_run_id = self.runner.flwr_run_id

    # -- run ------------------------------------------------------------------------------------
    def run(self) -> None:
        if self.sub.mode == "unlearn":
            self.run_unlearn()
            return
        cfg = self.sub.config
        if cfg is None:
            raise RunFailed(f"submission {self.sub.name} has no configuration to train")
        if cfg.shards > 1:
            self._run_shards(cfg)
            return
        self._run_one(RunContext(self.sub.run_id, cfg), resume=self.sub.resume)

    def _run_shards(self, cfg: FederationConfig) -> None:
        """SISA: one run per shard (each on the people the sites' keyed hash puts in it), one after the
        other; a resumed job skips the shards that completed. Then the ensemble is evaluated."""
        family, shards = self.sub.run_id, cfg.shards
        for k in range(shards):
            live = self.ledger.live_run(family, k)
            if live is not None and live.status == "completed":
                continue
            ctx = RunContext(live.run_id if live else f"{family}-s{k}", cfg, family=family, shard=k)
            self.log(f"[facefed] shard {k + 1}/{shards}: run {ctx.run_id}")
            self._run_one(ctx, resume=live is not None)
        evaluate_ensemble(self.ledger, self.store, self.evaluators, cfg, family, self.log)

    def _run_one(self, ctx: RunContext, *, resume: bool) -> None:
        with run_lock(self.paths, ctx.run_id, log=self.log):
            ctx = self._open_run(ctx, resume=resume)
            self.ledger.add_attempt(ctx.run_id, self.flwr_run_id)
            # The run being trained: the forget query between rounds may replace it by its replay.
            current = ctx

            def between(c: RunContext) -> RunContext:
                nonlocal current
                run_id = self.unlearning.unlearn(c.config, current=c.run_id) or c.run_id
                current = c if run_id == c.run_id else dataclasses.replace(c, run_id=run_id)
                return current

            try:
                self.sites.wait(ctx.config)
                self.paths.write_phase("asking the sites for forget requests", ctx.run_id)
                between(ctx)  # before the run: requests that arrived meanwhile
                self.runner.rounds(current, between=between)
            except (KeyboardInterrupt, SystemExit) as e:
                # The SuperLink is going away (Ctrl-C, SIGTERM, or its death noticed by Flower's parent
                # monitor): the run is resumable from its last committed round.
                detail = f"interrupted ({type(e).__name__}); `facefed-server train` with the same config resumes it"
                self._end_attempt(current.run_id, "stopped", detail, "interrupted")
                raise
            except BaseException as e:
                detail = f"{type(e).__name__}: {e}"
                self._end_attempt(current.run_id, "failed", detail, f"failed: {detail}")
                raise
            self.ledger.set_run_status(current.run_id, "completed")
            self.ledger.end_attempt(current.run_id, self.flwr_run_id, "completed")
            self.log(f"[facefed] run {current.run_id} completed")

    def _end_attempt(self, run_id: str, status: str, detail: str, outcome: str) -> None:
        """Record how this attempt ended, and set the run's status only while this attempt is the
        run's latest: a ServerApp that a crashed server left behind may end after the one that resumed
        the run has started, and must not mark that one's run stopped."""
        attempts = self.ledger.attempts(run_id)
        if not attempts or str(attempts[-1]["flwr_run_id"]) == self.flwr_run_id:
            self.ledger.set_run_status(run_id, status, detail)
        self.ledger.end_attempt(run_id, self.flwr_run_id, outcome)

    def run_unlearn(self) -> None:
        """`facefed-server unlearn`: collect requests, replay what they taint, deliver receipts."""
        active = [s.name for s in self.ledger.sites() if s.active]
        deadline = time.monotonic() + self.sub.wait_s
        while len(self.sites.choose(None)[0]) < max(1, len(active)) and time.monotonic() < deadline:
            self.paths.write_phase(
                f"unlearn: waiting for the sites, {len(self.sites.choose(None)[0])} of {len(active)} online "
                f"(up to {deadline - time.monotonic():.0f} s more)"
            )
            time.sleep(1.0)
        self.paths.write_phase("unlearn: asking the sites for forget requests")
        online = len(self.sites.choose(None)[0])
        self.log(f"[facefed] unlearn: {online} site(s) online of {len(active) or '?'} registered")
        self.unlearning.unlearn(None, current=None)

    def _open_run(self, ctx: RunContext, *, resume: bool) -> RunContext:
        """The run to train: resumed from the ledger (a replaced run: its replay), or created from the
        pretrained base."""
        cfg = ctx.config
        known = {r.run_id: r for r in self.ledger.runs()}
        if ctx.run_id in known:
            if not resume:
                raise RunFailed(f"run {ctx.run_id} already exists in the ledger")
            run = known[ctx.run_id]
            while run.status == "superseded":  # replaced by an unlearning replay: go on with that one
                nxt = [r for r in known.values() if r.parent_run_id == run.run_id and r.kind == "replay"]
                if not nxt:
                    raise RunFailed(f"run {run.run_id} is superseded but no replay run replaces it")
                self.log(f"[facefed] run {run.run_id} was replaced by replay {nxt[-1].run_id}; continuing that")
                run = nxt[-1]
                ctx = dataclasses.replace(ctx, run_id=run.run_id)
            if run.config_sha256 != cfg.sha256():
                raise RunFailed(
                    f"run {ctx.run_id} was started with another configuration "
                    f"(sha256 {run.config_sha256[:12]}..); resume it with the same config"
                )
            self.ledger.set_run_status(ctx.run_id, "running")
            done, _ = self.ledger.head(ctx.run_id)
            self.log(f"[facefed] resuming run {ctx.run_id} after round {done}")
            return ctx
        model = build_embedder(self.sub.pretrained, train_from=cfg.train.train_from)
        meta: dict[str, Any] = {"source": "pretrained", "pretrained_sha256": self.runner.base_sha256}
        validator = self.evaluators.validator_for(cfg)
        val_metrics: dict[str, float] = {}
        if validator is not None:  # the base model gets its decision threshold and its rank too
            self.paths.write_phase("scoring the base model on the validation pairs (aligning them first)")
            threshold, val_metrics = validator(model)
            meta["threshold"] = threshold.to_dict()
        base = self.store.save(
            model, run_id=ctx.run_id, rnd=0, parent=None, meta=meta, base_sha256=self.runner.base_sha256
        )
        self.ledger.create_run(
            ctx.run_id,
            config_json=cfg.frozen_json(),
            config_sha256=cfg.sha256(),
            rounds=cfg.rounds,
            base=base,
            family=ctx.family,
            shard=ctx.shard,
        )
        self.log(f"[facefed] new run {ctx.run_id}: {cfg.rounds} rounds, base {base.checkpoint_id}")
        evaluator = self.evaluators.for_config(cfg)
        if evaluator is not None:
            self.paths.write_phase(f"evaluating the base model on LFW {cfg.evaluate.label} (decoding the images first)")
            metrics = evaluator(model) | val_metrics
            save_roc(evaluator, base.path)
            self.ledger.set_base_metrics(ctx.run_id, metrics)  # a candidate for the run's best model
            val = score(metrics)
            self.log(
                f"[facefed] base model: LFW accuracy {metrics['lfw_accuracy']:.4f}"
                + (f", validation {score_text(val)}" if val is not None else "")
            )
        return ctx


@app.main()
def main(grid: Grid, context: Context) -> None:
    state_dir = str(context.run_config.get("state-dir", ""))
    submission = str(context.run_config.get("submission", ""))
    if not state_dir or not Path(state_dir).is_absolute():
        raise ValueError(
            "run config `state-dir` must be the server's absolute state directory; "
            "submit runs with `facefed-server train --state DIR --config FILE`"
        )
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    paths = StatePaths.at(state_dir)
    Coordinator(grid, paths, read_submission(paths, submission)).run()
