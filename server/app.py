"""The ServerApp (Flower Message API): federated rounds of backbone-only FedAvg, with a ledger.

One Flower run works on one ledger run (our id). For each round it waits for enough registered
sites to be online, sends each the current shared tail with the round's training config, collects
replies until all are in or `round_timeout_s` passes, rejects replies that are not exactly a
backbone (see `server.strategy`), averages the rest, and then, in this order:

  1. writes the new global checkpoint durably,
  2. evaluates it on LFW (pairs disjoint from every site's people),
  3. commits the round to the ledger (participants, missing sites, metrics, epsilons, checkpoint
     id + sha256, parent checkpoint) in one transaction.

A round counts only once step 3 has committed, so a server killed anywhere in between loses no
committed round and never counts one twice: the next `facefed-server train` resumes the run from the
ledger's last committed checkpoint. A round without `min_sites` valid replies is recorded as failed
(who was missing and why) and retried up to `max_round_attempts`, after which the run fails.

Right to be forgotten (server/unlearn.py): before each run and between rounds the server sends every
online site a `query` (common/forget_wire.py). Sites report requests whose data they erased; the
server records them in the ledger, finds the runs they taint, asks the sites whether their privacy
budget allows the replay, and replays each tainted run from its rollback checkpoint as a new run
(`kind = 'replay'`), one replay for all requests pending together. Then it deletes the tainted
checkpoints, signs one receipt per request (server/receipts.py) and delivers it at the next query,
together with the list of head files the sites must delete. A server killed during a replay resumes
it at the next `train` or `unlearn` (the ledger ties the requests to their replay run). Training
never goes on from a model that a reported request taints: if the replay is refused, the run fails
and says why.

Site identity: with node authentication, a node is the site whose registered key fingerprint matches
the node's public key (from the ledger), and a reply that claims another name is rejected. Without
authentication (local tests, simulation) the name the node reports is used.
"""

from __future__ import annotations

import copy
import dataclasses
import fcntl
import json
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from facefed.common.config import validate_config
from facefed.common.fedconfig import FederationConfig
from facefed.common.model.mobilefacenet import (
    MobileFaceNet,
    build_embedder,
    load_shared_state,
    prefix_fingerprint,
    sha256_file,
    shared_state,
)
from facefed.common.nodekeys import fingerprint_pem
from facefed.common.protocol.forget import ORDER_KEY, REPLY_KEY, BudgetAsk, Delivery, DropHeads, QueryOrder, QueryReply
from facefed.server.forget.receipts import issue, key_paths, signing_key
from facefed.server.forget.unlearn import deletion_reason, plan_replays, replay_run_id, tainted_of
from facefed.server.ledger.checkpoints import CheckpointStore
from facefed.server.ledger.db import CheckpointRow, ForgetRow, Ledger, RoundRow, SiteRound
from facefed.server.ops.submission import Submission, read_submission
from facefed.server.state import StatePaths
from facefed.server.strategy import (
    ARRAYS,
    CONFIG,
    Accepted,
    BackboneFedAvg,
    ReplyRejected,
    declared_names,
    payload_bytes,
    to_record,
)

POLL_S = 0.25  # how often to pull replies (Flower's own send_and_receive sleeps 3 s)
QUERY_TIMEOUT_S = 120.0  # a site's query answer (settling requests) is quick; do not hold a round up longer
UNREACHABLE = {ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE}
app = ServerApp()


class RunFailed(RuntimeError):
    """The run cannot go on (a round failed max_round_attempts times, or no sites); the ledger says why."""


RUN_LOCK_WAIT_S = 60.0


@contextmanager
def run_lock(paths: StatePaths, run_id: str, *, wait_s: float = RUN_LOCK_WAIT_S, log=print):
    """One ServerApp per ledger run, so two never interleave rounds. The holder may be the previous
    attempt's ServerApp, still shutting down after its SuperLink was killed (Flower interrupts it only
    when it notices its SuperExec is gone, seconds later): wait for it a bounded time, then fail."""
    lock_dir = paths.root / "locks"
    lock_dir.mkdir(exist_ok=True)
    with open(lock_dir / f"{run_id}.lock", "a+") as f:
        deadline, told = time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise RunFailed(
                        f"run {run_id} is being trained by another ServerApp (waited {wait_s:.0f} s); "
                        f"stop it or wait for it to end"
                    ) from None
                if not told:
                    log(
                        f"[facefed] run {run_id} is held by another ServerApp (a previous attempt shutting "
                        f"down?); waiting up to {wait_s:.0f} s"
                    )
                    told = True
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass
class SiteSlot:
    """A node chosen for a round and the site it is (None until it says so, without authentication)."""

    node_id: int
    site: str | None


class Evaluator:
    """LFW verification of the global model. The archive is read and the evaluation images decoded once
    per ServerApp process (`EvalCache`); each round then runs only the trainable tail."""

    def __init__(self, lfw_path: str | None, pairs: str, flip: bool, max_pairs: int | None = None):
        self.lfw_path, self.pairs, self.flip, self.max_pairs = lfw_path, pairs, flip, max_pairs
        self._cache = None

    def __call__(self, model: MobileFaceNet) -> dict[str, float]:
        from facefed.common.evaluate import EvalCache  # heavy imports only when evaluating
        from facefed.common.lfw import LFW

        t = time.monotonic()
        if self._cache is None:
            self._cache = EvalCache(LFW(self.lfw_path), self.pairs, flip=self.flip, max_pairs=self.max_pairs)
        res = self._cache.evaluate(model)
        return {
            "lfw_accuracy": float(res.accuracy_mean),
            "lfw_accuracy_std": float(res.accuracy_std),
            "lfw_auc": float(res.auc),
            "lfw_pairs": float(res.n_pairs),
            "eval_s": time.monotonic() - t,
        }


class Coordinator:
    def __init__(
        self,
        grid: Grid,
        paths: StatePaths,
        sub: Submission,
        *,
        evaluator: Callable[[MobileFaceNet], dict[str, float]] | None = None,
        log: Callable[[str], None] = print,
    ):
        self.grid, self.paths, self.sub, self.cfg = grid, paths, sub, sub.config
        self.ledger = Ledger(paths.ledger)
        self.store = CheckpointStore(paths.checkpoints)
        self.run_id = sub.run_id
        self.flwr_run_id = str(grid.run.run_id)
        self.log = log
        self._injected_evaluator = evaluator
        self._evaluators: dict[tuple, Evaluator] = {}
        self.base_sha256 = sha256_file(sub.pretrained)
        self.node_site: dict[int, str] = {}  # learnt from query replies (nodes without authentication)
        self.family: str | None = None  # with shards: the job's id; its shard runs are <family>-s<k>
        self.shard = 0

    @property
    def evaluator(self) -> Callable[[MobileFaceNet], dict[str, float]] | None:
        if self._injected_evaluator is not None:
            return self._injected_evaluator
        ev = self.cfg.evaluate
        if not ev.every:
            return None
        key = (ev.pairs, ev.flip, ev.max_pairs)
        if key not in self._evaluators:  # shared by the replays of this process (the cache is the cost)
            self._evaluators[key] = Evaluator(self.sub.lfw, ev.pairs, ev.flip, ev.max_pairs)
        return self._evaluators[key]

    def _for(self, run_id: str, cfg: FederationConfig) -> Coordinator:
        """This coordinator working on another run (a replay) with that run's configuration."""
        other = copy.copy(self)
        other.run_id, other.cfg = run_id, cfg
        return other

    def _config_of(self, run_id: str) -> FederationConfig:
        return validate_config(
            json.loads(self.ledger.run(run_id).config_json), FederationConfig, where=f"ledger run {run_id}"
        )

    # -- run ------------------------------------------------------------------------------------
    def run(self) -> None:
        if self.sub.mode == "unlearn":
            self.run_unlearn()
            return
        if self.cfg.shards > 1:
            self._run_shards()
            return
        self._run_one()

    def _run_shards(self) -> None:
        """SISA: one run per shard (each on the people the sites' keyed hash puts in it), one after the
        other; a resumed job skips the shards that completed. Then the ensemble is evaluated."""
        family, shards = self.sub.run_id, self.cfg.shards
        for k in range(shards):
            live = self.ledger.live_run(family, k)
            if live is not None and live.status == "completed":
                continue
            c = self._for(live.run_id if live else f"{family}-s{k}", self.cfg)
            c.family, c.shard = family, k
            c.sub = dataclasses.replace(self.sub, run_id=c.run_id, resume=live is not None)
            self.log(f"[facefed] shard {k + 1}/{shards}: run {c.run_id}")
            c._run_one()
        self.evaluate_ensemble(family)

    def evaluate_ensemble(self, family: str) -> None:
        runs = [self.ledger.live_run(family, k) for k in range(self.cfg.shards)]
        if self.evaluator is None or any(r is None or self.ledger.head(r.run_id)[0] == 0 for r in runs):
            return
        from facefed.common.evaluate import EvalCache
        from facefed.common.lfw import LFW

        heads = [self.ledger.head(r.run_id)[1] for r in runs]
        ev = self.cfg.evaluate
        cache = EvalCache(LFW(self.sub.lfw), ev.pairs, flip=ev.flip, max_pairs=ev.max_pairs)
        res = cache.evaluate_ensemble([self.store.load(h)[0] for h in heads])
        metrics = {
            "lfw_accuracy": float(res.accuracy_mean),
            "lfw_accuracy_std": float(res.accuracy_std),
            "lfw_auc": float(res.auc),
            "lfw_pairs": float(res.n_pairs),
        }
        self.ledger.record_ensemble(family, [h.checkpoint_id for h in heads], metrics)
        self.log(f"[facefed] {len(heads)}-shard ensemble of {family}: LFW accuracy {metrics['lfw_accuracy']:.4f}")

    def _run_one(self) -> None:
        with run_lock(self.paths, self.run_id, log=self.log):
            self._open_run()
            self.ledger.add_attempt(self.run_id, self.flwr_run_id)
            try:
                self._wait_for_sites()
                self.unlearn(current=True)  # before the run: requests that arrived meanwhile
                self._rounds()
            except (KeyboardInterrupt, SystemExit) as e:
                # The SuperLink is going away (Ctrl-C, SIGTERM, or its death noticed by Flower's parent
                # monitor): the run is resumable from its last committed round.
                self.ledger.set_run_status(
                    self.run_id,
                    "stopped",
                    f"interrupted ({type(e).__name__}); `facefed-server train` with the same config resumes it",
                )
                self.ledger.end_attempt(self.run_id, self.flwr_run_id, "interrupted")
                raise
            except BaseException as e:
                detail = f"{type(e).__name__}: {e}"
                self.ledger.set_run_status(self.run_id, "failed", detail)
                self.ledger.end_attempt(self.run_id, self.flwr_run_id, f"failed: {detail}")
                raise
            self.ledger.set_run_status(self.run_id, "completed")
            self.ledger.end_attempt(self.run_id, self.flwr_run_id, "completed")
            self.log(f"[facefed] run {self.run_id} completed")

    def run_unlearn(self) -> None:
        """`facefed-server unlearn`: collect requests, replay what they taint, deliver receipts."""
        active = [s.name for s in self.ledger.sites() if s.active]
        deadline = time.monotonic() + self.sub.wait_s
        while len(self._choose()[0]) < max(1, len(active)) and time.monotonic() < deadline:
            time.sleep(1.0)
        online = len(self._choose()[0])
        self.log(f"[facefed] unlearn: {online} site(s) online of {len(active) or '?'} registered")
        self.unlearn(current=False)

    def _open_run(self) -> None:
        known = {r.run_id: r for r in self.ledger.runs()}
        if self.run_id in known:
            if not self.sub.resume:
                raise RunFailed(f"run {self.run_id} already exists in the ledger")
            run = known[self.run_id]
            while run.status == "superseded":  # replaced by an unlearning replay: go on with that one
                nxt = [r for r in known.values() if r.parent_run_id == run.run_id and r.kind == "replay"]
                if not nxt:
                    raise RunFailed(f"run {run.run_id} is superseded but no replay run replaces it")
                self.log(f"[facefed] run {run.run_id} was replaced by replay {nxt[-1].run_id}; continuing that")
                run = nxt[-1]
                self.run_id = run.run_id
            if run.config_sha256 != self.cfg.sha256():
                raise RunFailed(
                    f"run {self.run_id} was started with another configuration "
                    f"(sha256 {run.config_sha256[:12]}..); resume it with the same config"
                )
            self.ledger.set_run_status(self.run_id, "running")
            done, _ = self.ledger.head(self.run_id)
            self.log(f"[facefed] resuming run {self.run_id} after round {done}")
            return
        model = build_embedder(self.sub.pretrained, train_from=self.cfg.train.train_from)
        base = self.store.save(
            model,
            run_id=self.run_id,
            rnd=0,
            parent=None,
            meta={"source": "pretrained", "pretrained_sha256": self.base_sha256},
        )
        self.ledger.create_run(
            self.run_id,
            config_json=self.cfg.frozen_json(),
            config_sha256=self.cfg.sha256(),
            rounds=self.cfg.rounds,
            base=base,
            family=self.family,
            shard=self.shard,
        )
        self.log(f"[facefed] new run {self.run_id}: {self.cfg.rounds} rounds, base {base.checkpoint_id}")
        if self.evaluator is not None:
            metrics = self.evaluator(model)
            self.ledger.set_base_metrics(self.run_id, metrics)
            self.log(f"[facefed] base model: LFW accuracy {metrics['lfw_accuracy']:.4f}")

    def _rounds(self, until: int | None = None) -> None:
        """Rounds of the current run up to `until` (default: all planned). Between rounds (not within a
        replay) the sites are queried, and a request that taints the current run replaces it by its
        replay, which this loop then goes on with."""
        while True:
            done, parent = self.ledger.head(self.run_id)
            last = self.cfg.rounds if until is None else until
            if done >= last:
                return
            model, _ = self.store.load(parent)
            model.train_from = self.cfg.train.train_from
            self.prefix = prefix_fingerprint(model)  # sites check their frozen layers against it
            rnd = done + 1
            # Attempts are numbered across restarts (ledger) but limited per `train` invocation, so a run
            # that failed for lack of sites can be resumed once they are back.
            for _ in range(self.cfg.max_round_attempts):
                if self.round(rnd, self.ledger.next_attempt(self.run_id, rnd), model, parent) is not None:
                    break
            else:
                raise RunFailed(
                    f"round {rnd} failed {self.cfg.max_round_attempts} time(s) in a row (run "
                    f"{self.run_id}); see `facefed-server status --run {self.run_id}`"
                )
            if until is None and rnd < last:
                self.unlearn(current=True)

    # -- right to be forgotten ------------------------------------------------------------------
    def sync(self, budget: BudgetAsk | None = None) -> dict[str, QueryReply]:
        """One `query` exchange with every online site: deliver receipts and head deletions, collect
        requests (recorded in the ledger) and, with `budget`, each site's answer for a replay."""
        slots, _ = self._choose()
        if not slots:
            return {}
        drops = [
            DropHeads(run_id=r.parent_run_id, from_round=r.start_round + 1)
            for r in self.ledger.runs()
            if r.kind == "replay" and r.parent_run_id
        ]
        deliver: dict[str, list[Delivery]] = {}
        for r in self.ledger.requests("unlearned"):
            if r.delivered_at is None and r.receipt is not None:
                m = self.ledger.checkpoint(r.model_checkpoint)
                deliver.setdefault(r.site, []).append(
                    Delivery(
                        request_id=r.request_id,
                        run_id=r.replay_run_id or m.run_id or "",
                        round=m.round,
                        checkpoint_id=m.checkpoint_id,
                        checkpoint_sha256=m.sha256,
                        receipt=r.receipt,
                    )
                )
        msgs = []
        for slot in slots:
            name = slot.site or self.node_site.get(slot.node_id)
            order = QueryOrder(deliver=deliver.get(name, []) if name else [], drop_heads=drops, budget=budget)
            msgs.append(
                Message(
                    RecordDict({CONFIG: ConfigRecord({ORDER_KEY: order.model_dump_json()})}),
                    dst_node_id=slot.node_id,
                    message_type=MessageType.QUERY,
                    ttl=QUERY_TIMEOUT_S + 60.0,
                    group_id=f"query/{self.flwr_run_id}/{time.time():.3f}",
                )
            )
        wait = QUERY_TIMEOUT_S if self.cfg is None else min(QUERY_TIMEOUT_S, self.cfg.round_timeout_s)
        replies = self._exchange(msgs, timeout=wait)
        out: dict[str, QueryReply] = {}
        for slot in slots:
            who = slot.site or self.node_site.get(slot.node_id) or f"node-{slot.node_id}"
            if slot.node_id not in replies:
                self.log(
                    f"[facefed] query: no answer from {who} within {wait:g} s; its requests wait for the next query"
                )
                self.ledger.record_query(who, False, detail=f"no answer within {wait:g} s")
                continue
            msg = replies[slot.node_id][0]
            try:
                if msg.has_error():
                    raise ValueError(f"error {msg.error.code}: {msg.error.reason}")
                qr = QueryReply.model_validate_json(str(msg.content[CONFIG][REPLY_KEY]))
            except (ValueError, KeyError) as e:  # pydantic's ValidationError is a ValueError
                self.log(f"[facefed] query: unusable answer from {who}: {str(e)[:300]}")
                self.ledger.record_query(who, False, detail=f"unusable answer: {str(e)[:300]}")
                continue
            if slot.site is not None and qr.site != slot.site:
                self.log(f"[facefed] query: node registered as {slot.site!r} answers as {qr.site!r}; ignored")
                self.ledger.record_query(who, False, detail=f"answered as site {qr.site!r}")
                continue
            name = slot.site or qr.site
            self.node_site[slot.node_id] = name
            for p in qr.pending:
                row, new = self.ledger.report_request(
                    ForgetRow(
                        request_id=p.request_id,
                        site=name,
                        pseudonym=p.pseudonym,
                        received_at=p.received_at,
                        erased_at=p.erased_at,
                        shares_destroyed=p.shares_destroyed,
                        contributions=p.contributions,
                    )
                )
                if new:
                    self.log(
                        f"[facefed] forget request {p.request_id} from site {name} (pseudonym {p.pseudonym[:8]}..): "
                        f"present in {', '.join(f'{k} rounds {v}' for k, v in p.contributions.items()) or 'no round'}"
                    )
            mine = {d.request_id for d in deliver.get(name, [])}
            if qr.stored:
                self.ledger.mark_delivered([rid for rid in qr.stored if rid in mine])
                self.log(f"[facefed] site {name} stored receipt(s) {', '.join(qr.stored)}")
            for problem in qr.problems:
                self.log(f"[facefed] site {name}: {problem}")
            self.ledger.record_query(name, True, len(qr.pending), "; ".join(qr.problems)[:1000] or None)
            out[name] = qr
        return out

    def unlearn(self, *, current: bool) -> None:
        """Query the sites; finish interrupted replays; replay every run that reported requests taint.

        `current`: we are training self.run_id and go on with its replacement if it is replayed; a
        replay that is refused then fails the run (training must not go on from a tainted model)."""
        self.sync()
        resumed = False
        for run in self.ledger.runs():  # a server that died mid-replay: finish it first
            if run.kind == "replay" and any(r.replay_run_id == run.run_id for r in self.ledger.requests("replaying")):
                self._finish_replay(run.run_id, continuing=current and run.run_id == self.run_id)
                resumed = True
        # Refused requests are tried again: the operator may have raised a budget; and in train mode a
        # run they taint must fail again rather than train on.
        open_requests = self.ledger.requests("pending") + self.ledger.requests("refused")
        plans = plan_replays(self.ledger, open_requests) if open_requests else []
        planned = {r.request_id for p in plans for r in p.requests}
        self._untainted([r for r in open_requests if r.request_id not in planned])
        for plan in plans:
            cfg = self._config_of(plan.run.run_id)
            ids = [r.request_id for r in plan.requests]
            answers = self.sync(
                budget=BudgetAsk(
                    train_config=cfg.train.model_dump_json(),
                    rounds=len(plan.rounds),
                    steps=cfg.local_steps(),
                    shard=plan.run.shard,
                    shards=cfg.shards,
                )
            )
            refusals = [f"site {s}: {a.budget.detail}" for s, a in answers.items() if a.budget and not a.budget.fits]
            if refusals:
                why = (
                    f"replay of run {plan.run.run_id} from round {plan.rollback.round} refused: "
                    + "; ".join(refusals)
                    + ". Raise the sites' max_epsilon, or start a new run (`facefed-server train --new`), which "
                    "never saw the forgotten people"
                )
                self.ledger.refuse_requests(ids, why)
                self.log(f"[facefed] {why}")
                if current and plan.run.run_id == self.run_id:
                    raise RunFailed(why)
                continue
            replay_id = replay_run_id(self.ledger, plan.run)
            self.ledger.create_run(
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
            self.ledger.start_replay(
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
            continuing = current and plan.run.run_id == self.run_id
            self._finish_replay(replay_id, continuing=continuing)
            if cfg.shards > 1 and not continuing:  # the sharded embedder changed: evaluate it again
                self._for(replay_id, cfg).evaluate_ensemble(plan.run.family or plan.run.run_id)
            if continuing:
                self.ledger.end_attempt(self.run_id, self.flwr_run_id, f"superseded by replay {replay_id}")
                self.run_id = replay_id
                self.ledger.add_attempt(self.run_id, self.flwr_run_id)
        if resumed or open_requests:
            self.sync()  # deliver the receipts and the head deletions now

    def _untainted(self, requests) -> None:
        """Requests whose person is in no live model (never trained on, or only in replaced runs): the
        current model already excludes them; the receipt names it, with nothing replayed."""
        requests = list(requests)
        live = [r for r in self.ledger.runs() if r.status != "superseded"]
        if not requests or not live:
            return  # no model yet: they are settled at the first run's start
        model = self.ledger.head(live[-1].run_id)[1]
        key = signing_key(*key_paths(self.paths, Path(self.sub.receipt_key) if self.sub.receipt_key else None))
        for req in requests:
            receipt = issue(
                req, replay_run=model.run_id or live[-1].run_id, rollback=model, model=model, deleted=[], key=key
            )
            self.ledger.finish_request(req.request_id, model=model, deleted=[], receipt=receipt)
            self.log(
                f"[facefed] forget request {req.request_id}: no live model was trained with them; "
                f"receipt names {model.checkpoint_id}"
            )

    def _finish_replay(self, replay_id: str, *, continuing: bool) -> None:
        """Replay the rounds, delete the tainted checkpoints, sign the receipts (each step resumable)."""
        replay = self.ledger.run(replay_id)
        target = self.ledger.head(replay.parent_run_id)[0]
        worker = self._for(replay_id, self._config_of(replay_id))
        self.ledger.set_run_status(replay_id, "running")
        t0 = time.monotonic()
        try:
            with run_lock(self.paths, replay_id, log=self.log):
                worker._rounds(until=target)
        except RunFailed as e:
            self.ledger.set_run_status(
                replay_id, "stopped", f"replay interrupted: {e}; `facefed-server unlearn` resumes it"
            )
            raise
        ids = [r.request_id for r in self.ledger.requests("replaying") if r.replay_run_id == replay_id]
        reason = deletion_reason(ids, replay_id)
        deleted = []
        for c in tainted_of(self.ledger, replay):
            self.store.delete(c)
            if c.deleted_at is None:
                self.ledger.mark_checkpoint_deleted(c.checkpoint_id, reason)
            deleted.append(c.checkpoint_id)
        model = self.ledger.head(replay_id)[1]
        rollback = self.ledger.checkpoint(replay.base_checkpoint)
        key = signing_key(*key_paths(self.paths, Path(self.sub.receipt_key) if self.sub.receipt_key else None))
        for rid in ids:
            receipt = issue(
                self.ledger.request(rid), replay_run=replay_id, rollback=rollback, model=model, deleted=deleted, key=key
            )
            self.ledger.finish_request(rid, model=model, deleted=deleted, receipt=receipt)
        if target >= replay.rounds_planned:
            self.ledger.set_run_status(replay_id, "completed")
        elif not continuing:
            self.ledger.set_run_status(
                replay_id,
                "stopped",
                f"replayed through round {target}; `facefed-server train` with the same config continues it",
            )
        self.log(
            f"[facefed] replay {replay_id} done in {time.monotonic() - t0:.1f} s: model {model.checkpoint_id} "
            f"({model.sha256[:12]}); deleted {len(deleted)} tainted checkpoint(s); receipts for {', '.join(ids)}"
        )

    # -- one round ------------------------------------------------------------------------------
    def _registered(self) -> dict[str, str]:
        """fingerprint -> site name, for active registered sites (empty without authentication)."""
        return {s.fingerprint: s.name for s in self.ledger.sites() if s.active}

    def _choose(self) -> tuple[list[SiteSlot], list[str]]:
        """Online nodes that are our sites, and the sites we expect (to name the missing ones)."""
        registered = self._registered()
        slots: list[SiteSlot] = []
        for n in self.grid.get_nodes():
            site: str | None = None
            if registered:
                fp = fingerprint_pem(n.public_key) if getattr(n, "public_key", b"") else None
                site = registered.get(fp) if fp else None
                if site is None:
                    continue  # a node whose key is not (or no longer) registered with us
            if self.cfg is not None and self.cfg.sites is not None and site is not None and site not in self.cfg.sites:
                continue
            slots.append(SiteSlot(n.node_id, site))
        expected = (
            list(self.cfg.sites) if self.cfg is not None and self.cfg.sites is not None else sorted(registered.values())
        )
        return slots, expected

    def _wait_for_sites(self) -> tuple[list[SiteSlot], list[str]]:
        deadline = time.monotonic() + self.cfg.wait_for_sites_s
        while True:
            slots, expected = self._choose()
            if len(slots) >= self.cfg.min_sites or time.monotonic() >= deadline:
                return slots, expected
            time.sleep(1.0)

    def _messages(
        self, slots: list[SiteSlot], rnd: int, attempt: int, sent: ArrayRecord, wire_layout: dict, parent: CheckpointRow
    ) -> list[Message]:
        cfg = self.cfg
        shard = self.ledger.run(self.run_id).shard
        msgs = []
        for slot in slots:
            name = slot.site or self.node_site.get(slot.node_id)
            # The site's head continues along the model's lineage (a replay: the replaced run's heads
            # before the rollback); 0 = a fresh head; -1 = unknown site: its latest head of this run.
            head = self.ledger.site_head(parent.checkpoint_id, name) if name else None
            config = ConfigRecord(
                {
                    "run-id": self.run_id,
                    "round": rnd,
                    "attempt": attempt,
                    "parent-checkpoint": parent.checkpoint_id,
                    "parent-sha256": parent.sha256,
                    "base-sha256": self.base_sha256,
                    "prefix-fingerprint": self.prefix,
                    "train-config": cfg.train.model_dump_json(),
                    "steps": cfg.local_steps(),
                    "seed": cfg.seed,
                    "weighting": cfg.weighting,
                    "expected-site": slot.site or "",
                    "shard": shard,
                    "shards": cfg.shards,
                    "head-run": head[0] if head else self.run_id,
                    "head-round": head[1] if head else (0 if name else -1),
                    "head-attempt": head[2] if head else 0,
                    **wire_layout,
                }
            )
            msgs.append(
                Message(
                    RecordDict({ARRAYS: sent, CONFIG: config}),
                    dst_node_id=slot.node_id,
                    message_type=MessageType.TRAIN,
                    ttl=cfg.round_timeout_s + 60.0,
                    group_id=f"{self.run_id}/{rnd}/{attempt}",
                )
            )
        return msgs

    def _exchange(self, msgs: list[Message], timeout: float | None = None) -> dict[int, tuple[Message, float]]:
        """Push, then pull until every node replied or the timeout (default: the round's) passed:
        node -> (reply, seconds)."""
        t0 = time.monotonic()
        self.pushed_at = time.time()
        node_of = {}
        for msg, mid in zip(msgs, self.grid.push_messages(msgs), strict=True):
            if mid:
                node_of[mid] = msg.metadata.dst_node_id
        replies: dict[int, tuple[Message, float]] = {}
        deadline = t0 + (self.cfg.round_timeout_s if timeout is None else timeout)
        while node_of and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(node_of)):
                node = node_of.pop(reply.metadata.reply_to_message_id, None)
                if node is not None:
                    replies[node] = (reply, time.monotonic() - t0)
            if node_of:
                time.sleep(POLL_S)
        return replies

    def _timing(self, m, took: float) -> str:
        """Where a site's reply time went: waiting for Flower to start the ClientApp, its start-up
        (imports), training, and the way back (clocks of one machine, or NTP-synchronised ones)."""
        start, handler = float(m.get("process-start", float("nan"))), float(m.get("handler-start", float("nan")))
        compute = float(m.get("compute-s", float("nan")))
        dispatch, startup = start - self.pushed_at, handler - start
        back = self.pushed_at + took - (handler + compute)
        return (
            f"reply after {took:.1f} s: dispatch {dispatch:.1f} s, start-up {startup:.1f} s, "
            f"compute {compute:.1f} s, return {back:.1f} s"
        )

    def round(
        self, rnd: int, attempt: int, model: MobileFaceNet, parent: CheckpointRow
    ) -> tuple[MobileFaceNet, CheckpointRow] | None:
        """Run one round attempt; the new (model, checkpoint) if committed, None if recorded as failed."""
        cfg = self.cfg
        started = time.time()
        slots, expected = self._wait_for_sites()
        tail = shared_state(model)
        sent, wire_layout = to_record(tail)
        strategy = BackboneFedAvg(weighting=cfg.weighting, expected=tail, min_sites=cfg.min_sites)
        t_send = time.monotonic()
        # Too few sites online: do not ask anyone to train (it would spend their privacy budget on a
        # round that cannot be committed); record the round as failed instead.
        enough = len(slots) >= cfg.min_sites
        replies = self._exchange(self._messages(slots, rnd, attempt, sent, wire_layout, parent)) if enough else {}
        exchange_s = time.monotonic() - t_send

        bytes_down = payload_bytes(sent)
        sites: list[SiteRound] = []
        accepted: list[tuple[str, Accepted, float]] = []
        for slot in slots:
            if not enough:
                sites.append(
                    SiteRound(
                        site=slot.site or f"node-{slot.node_id}",
                        status="missing",
                        node_id=str(slot.node_id),
                        detail="online, not asked: too few sites online",
                    )
                )
                continue
            if slot.node_id not in replies:
                sites.append(
                    SiteRound(
                        site=slot.site or f"node-{slot.node_id}",
                        status="missing",
                        node_id=str(slot.node_id),
                        bytes_down=bytes_down,
                        detail=f"no reply within round_timeout_s={cfg.round_timeout_s:g}",
                    )
                )
                continue
            reply, took = replies[slot.node_id]
            claimed = None
            try:
                acc = strategy.check_reply(reply)
                claimed = str(acc.site.get("name", ""))
                if slot.site is not None and claimed != slot.site:
                    raise ReplyRejected(
                        f"node registered as site {slot.site!r} reports site {claimed!r}; "
                        f"start it with --site {slot.site}"
                    )
                name = slot.site or claimed or f"node-{slot.node_id}"
                if cfg.sites is not None and name not in cfg.sites:
                    continue  # without authentication the name is only known now
                accepted.append((name, acc, took))
            except ReplyRejected as e:
                keys = declared_names(reply)
                # Flower answers for a node that stopped heartbeating (crashed mid-round): it is missing.
                gone = reply.has_error() and reply.error.code in UNREACHABLE
                sites.append(
                    SiteRound(
                        site=slot.site or claimed or f"node-{slot.node_id}",
                        status="missing" if gone else "error" if reply.has_error() else "rejected",
                        node_id=str(slot.node_id),
                        bytes_down=bytes_down,
                        received_keys=keys,
                        detail=str(e),
                    )
                )
        for name, acc, took in accepted:
            m = acc.metrics
            sites.append(
                SiteRound(
                    site=name,
                    status="ok",
                    node_id=str(acc.node_id),
                    weight=acc.weight,
                    people=int(m.get("num-people", 0)),
                    images=int(m.get("num-images", 0)),
                    steps=int(m.get("steps", 0)),
                    loss=float(m.get("loss", float("nan"))),
                    epsilon=float(m.get("epsilon", float("nan"))),
                    delta=float(m.get("delta", float("nan"))),
                    unit=str(acc.site.get("unit", "")),
                    accountant=str(acc.site.get("accountant", "")),
                    compute_s=float(m.get("compute-s", float("nan"))),
                    bytes_down=bytes_down,
                    bytes_up=acc.wire_bytes,
                    received_keys=sorted(acc.tensors),
                    detail=self._timing(m, took),
                )
            )
        seen = {s.site for s in sites}
        for name in expected:
            if name not in seen:
                sites.append(SiteRound(site=name, status="missing", detail="not online when the round started"))
        participants = sorted(s.site for s in sites if s.status == "ok")
        missing = sorted(s.site for s in sites if s.status != "ok")

        common = dict(
            run_id=self.run_id,
            round=rnd,
            attempt=attempt,
            flwr_run_id=self.flwr_run_id,
            started_at=started,
            parent_checkpoint=parent.checkpoint_id,
            parent_sha256=parent.sha256,
            participants=participants,
            missing=missing,
            weighting=cfg.weighting,
            sites=sorted(sites, key=lambda s: s.site),
        )
        if len(accepted) < cfg.min_sites:
            why = (
                f"{len(accepted)} valid repl{'y' if len(accepted) == 1 else 'ies'}, min_sites={cfg.min_sites}"
                f" ({len(slots)} site(s) online)"
            )
            self.ledger.record_failed_round(
                RoundRow(
                    status="failed",
                    ended_at=time.time(),
                    checkpoint_id=None,
                    checkpoint_sha256=None,
                    total_weight=0.0,
                    metrics={"exchange_s": exchange_s},
                    detail=why,
                    **common,
                )
            )
            self.log(f"[facefed] round {rnd} attempt {attempt} FAILED: {why}; missing {missing}")
            return None

        t_agg = time.monotonic()
        new_model = copy.deepcopy(model)
        agg = strategy.aggregate([a for _, a, _ in accepted])
        load_shared_state(new_model, {k: torch.from_numpy(v) for k, v in agg.items()})
        ckpt = self.store.save(
            new_model,
            run_id=self.run_id,
            rnd=rnd,
            parent=parent,
            meta={"participants": participants, "weighting": cfg.weighting},
        )
        commit_s = time.monotonic() - t_agg
        slowest = max(float(a.metrics.get("compute-s", 0.0)) for _, a, _ in accepted)
        metrics: dict[str, float] = {
            "exchange_s": exchange_s,
            "slowest_site_s": slowest,
            "aggregate_s": commit_s,
            "round_s": exchange_s + commit_s,
            "overhead": (exchange_s + commit_s - slowest) / max(exchange_s + commit_s, 1e-9),
            "bytes_down_per_site": float(bytes_down),
        }
        if self.evaluator is not None and (rnd % cfg.evaluate.every == 0 or rnd == cfg.rounds):
            metrics.update(self.evaluator(new_model))
        self.ledger.commit_round(
            RoundRow(
                status="committed",
                ended_at=time.time(),
                checkpoint_id=ckpt.checkpoint_id,
                checkpoint_sha256=ckpt.sha256,
                total_weight=sum(a.weight for _, a, _ in accepted),
                metrics=metrics,
                detail=None,
                **common,
            ),
            ckpt,
        )
        eps = ", ".join(f"{s.site} eps={s.epsilon:.3f}" for s in sites if s.status == "ok")
        acc_txt = f" lfw={metrics['lfw_accuracy']:.4f}" if "lfw_accuracy" in metrics else ""
        self.log(
            f"[facefed] round {rnd}/{cfg.rounds} committed ({ckpt.checkpoint_id}){acc_txt}; {eps}; "
            f"missing {missing or 'none'}; round {metrics['round_s']:.1f}s, slowest site {slowest:.1f}s"
        )
        return new_model, ckpt


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
