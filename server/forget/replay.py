"""The unlearning sequence on the server: plan the replays forget requests call for, run them, then
delete the tainted checkpoints and sign one receipt per request (server/forget/unlearn.py says what
a request taints; docs/server-rounds.md why the order of the steps makes each resumable).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from facefed.common.config import validate_config
from facefed.common.durable import atomic_write_bytes
from facefed.common.fedconfig import FederationConfig
from facefed.common.protocol.forget import BudgetAsk
from facefed.server.evaluation import evaluate_ensemble
from facefed.server.forget.receipts import issue, key_paths, signing_key
from facefed.server.forget.sync import sync
from facefed.server.forget.unlearn import deletion_reason, plan_replays, replay_run_id, tainted_of
from facefed.server.ledger.db import ForgetRow
from facefed.server.rounds import RoundRunner
from facefed.server.runs import RunContext, RunFailed, run_lock
from facefed.server.state import StatePaths

PURGE_WAIT_S = 120.0  # linkd purges at least every 30 s; a request file makes it purge within seconds


class Unlearning:
    """Forget requests, from the query that reports them to the receipts that settle them."""

    def __init__(self, runner: RoundRunner, paths: StatePaths, receipt_key: str | None):
        self.runner, self.paths, self.receipt_key = runner, paths, receipt_key
        self.ledger, self.store, self.log = runner.ledger, runner.store, runner.log

    def config_of(self, run_id: str) -> FederationConfig:
        return validate_config(
            json.loads(self.ledger.run(run_id).config_json), FederationConfig, where=f"ledger run {run_id}"
        )

    def _key(self) -> Ed25519PrivateKey:
        return signing_key(*key_paths(self.paths, Path(self.receipt_key) if self.receipt_key else None))

    def unlearn(self, cfg: FederationConfig | None, current: str | None) -> str | None:
        """Query the sites; finish interrupted replays; replay every run that reported requests taint.

        `cfg`: the configuration sites are chosen by (None: all registered). `current`: the run being
        trained, if any; returned as is, or as its replay when a request replaced it. A replay of
        `current` that is refused fails the run (training must not go on from a tainted model)."""
        ledger = self.ledger
        sync(self.runner, cfg)
        resumed = False
        for run in ledger.runs():  # a server that died mid-replay: finish it first
            if run.kind == "replay" and any(r.replay_run_id == run.run_id for r in ledger.requests("replaying")):
                self.finish_replay(run.run_id, continuing=run.run_id == current)
                resumed = True
        # Refused requests are tried again: the operator may have raised a budget; and in train mode a
        # run they taint must fail again rather than train on.
        open_requests = ledger.requests("pending") + ledger.requests("refused")
        plans = plan_replays(ledger, open_requests) if open_requests else []
        planned = {r.request_id for p in plans for r in p.requests}
        self.untainted([r for r in open_requests if r.request_id not in planned])
        for plan in plans:
            run_cfg = self.config_of(plan.run.run_id)
            ids = [r.request_id for r in plan.requests]
            answers = sync(
                self.runner,
                cfg,
                budget=BudgetAsk(
                    train_config=run_cfg.train.model_dump_json(),
                    rounds=len(plan.rounds),
                    steps=run_cfg.local_steps(),
                    shard=plan.run.shard,
                    shards=run_cfg.shards,
                ),
            )
            refusals = [f"site {s}: {a.budget.detail}" for s, a in answers.items() if a.budget and not a.budget.fits]
            if refusals:
                why = (
                    f"replay of run {plan.run.run_id} from round {plan.rollback.round} refused: "
                    + "; ".join(refusals)
                    + ". Raise the sites' max_epsilon, or start a new run (`facefed-server train --new`), which "
                    "never saw the forgotten people"
                )
                ledger.refuse_requests(ids, why)
                self.log(f"[facefed] {why}")
                if plan.run.run_id == current:
                    raise RunFailed(why)
                continue
            replay_id = replay_run_id(ledger, plan.run)
            ledger.create_run(
                replay_id,
                config_json=plan.run.config_json,
                config_sha256=plan.run.config_sha256,
                rounds=plan.run.rounds_planned,
                base=plan.rollback,
                kind="replay",
                parent_run_id=plan.run.run_id,
                family=plan.run.family,
                shard=plan.run.shard,
            )
            ledger.start_replay(
                ids,
                replay_id,
                plan.rollback.checkpoint_id,
                plan.run.run_id,
                f"superseded by replay run {replay_id} (forget request(s) {', '.join(ids)})",
            )
            self.log(
                f"[facefed] unlearning {len(ids)} request(s): run {plan.run.run_id} rolls back to "
                f"{plan.rollback.checkpoint_id} and replays round(s) {plan.rounds} as run {replay_id}"
            )
            continuing = plan.run.run_id == current
            self.finish_replay(replay_id, continuing=continuing)
            if run_cfg.shards > 1 and not continuing:  # the sharded embedder changed: evaluate it again
                evaluate_ensemble(
                    ledger, self.store, self.runner.evaluators, run_cfg, plan.run.family or plan.run.run_id, self.log
                )
            if continuing and current is not None:
                ledger.end_attempt(current, self.runner.flwr_run_id, f"superseded by replay {replay_id}")
                current = replay_id
                ledger.add_attempt(current, self.runner.flwr_run_id)
        if resumed or open_requests:
            sync(self.runner, cfg)  # deliver the receipts and the head deletions now
        return current

    def untainted(self, requests: Iterable[ForgetRow]) -> None:
        """Requests whose person is in no live model (never trained on, or only in replaced runs): the
        current model already excludes them; the receipt names it, with nothing replayed."""
        requests = list(requests)
        live = [r for r in self.ledger.runs() if r.status != "superseded"]
        if not requests or not live:
            return  # no model yet: they are settled at the first run's start
        model = self.ledger.head(live[-1].run_id)[1]
        key = self._key()
        for req in requests:
            receipt = issue(
                req, replay_run=model.run_id or live[-1].run_id, rollback=model, model=model, deleted=[], key=key
            )
            self.ledger.finish_request(req.request_id, model=model, deleted=[], receipt=receipt)
            self.log(
                f"[facefed] forget request {req.request_id}: no live model was trained with them; "
                f"receipt names {model.checkpoint_id}"
            )

    def await_purge(self, timeout: float = PURGE_WAIT_S) -> tuple[float, set[int]] | None:
        """Ask the SuperLink (server/ops/linkd.py) to purge its database now and wait for that pass:
        (when it started, the Flower runs it cleaned); None without a SuperLink database or on timeout."""
        paths = self.paths
        if not paths.superlink_db.exists():
            return None
        asked = time.time()
        atomic_write_bytes(paths.purge_request, b"")
        self.log("[facefed] purging the SuperLink's database of the replaced run before signing receipts")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                rec = json.loads(paths.purge_record.read_text())
                if float(rec["started_at"]) >= asked:
                    return float(rec["finished_at"]), {int(r) for r in rec["runs_cleaned"]}
            except (OSError, ValueError, KeyError, TypeError):
                pass
            time.sleep(0.5)
        self.log(
            f"[facefed] the SuperLink did not purge its database within {timeout:.0f} s; the receipts say "
            "nothing was purged (it is purged every 30 s while the server runs)"
        )
        return None

    def finish_replay(self, replay_id: str, *, continuing: bool) -> None:
        """Replay the rounds, delete the tainted checkpoints, sign the receipts (each step resumable)."""
        ledger = self.ledger
        replay = ledger.run(replay_id)
        if replay.parent_run_id is None:
            raise RunFailed(f"run {replay_id} is not a replay (no parent run)")
        target = ledger.head(replay.parent_run_id)[0]
        ctx = RunContext(replay_id, self.config_of(replay_id))
        ledger.set_run_status(replay_id, "running")
        t0 = time.monotonic()
        try:
            with run_lock(self.paths, replay_id, log=self.log):
                self.runner.rounds(ctx, until=target)
        except RunFailed as e:
            ledger.set_run_status(replay_id, "stopped", f"replay interrupted: {e}; `facefed-server unlearn` resumes it")
            raise
        ids = [r.request_id for r in ledger.requests("replaying") if r.replay_run_id == replay_id]
        reason = deletion_reason(ids, replay_id)
        deleted = []
        for c in tainted_of(ledger, replay):
            self.store.delete(c)
            if c.deleted_at is None:
                ledger.mark_checkpoint_deleted(c.checkpoint_id, reason)
            deleted.append(c.checkpoint_id)
        model = ledger.head(replay_id)[1]
        rollback = ledger.checkpoint(replay.base_checkpoint)
        key = self._key()
        released = {
            int(a["flwr_run_id"])
            for run in {ledger.checkpoint(cid).run_id for cid in deleted}
            if run is not None
            for a in ledger.attempts(run)
            if str(a["flwr_run_id"]).isdigit()
        }
        purge = self.await_purge()
        purged_at, runs_purged = (None, []) if purge is None else (purge[0], sorted(released & purge[1]))
        for rid in ids:
            receipt = issue(
                ledger.request(rid),
                replay_run=replay_id,
                rollback=rollback,
                model=model,
                deleted=deleted,
                key=key,
                purged_at=purged_at,
                runs_purged=runs_purged,
            )
            ledger.finish_request(rid, model=model, deleted=deleted, receipt=receipt)
        if target >= replay.rounds_planned:
            ledger.set_run_status(replay_id, "completed")
        elif not continuing:
            ledger.set_run_status(
                replay_id,
                "stopped",
                f"replayed through round {target}; `facefed-server train` with the same config continues it",
            )
        self.log(
            f"[facefed] replay {replay_id} done in {time.monotonic() - t0:.1f} s: model {model.checkpoint_id} "
            f"({model.sha256[:12]}); deleted {len(deleted)} tainted checkpoint(s); receipts for {', '.join(ids)}"
        )
