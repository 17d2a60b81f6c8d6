"""One federated round of a run, and the loop of rounds (see docs/server-rounds.md).

A round attempt: choose the online sites, send each a `TrainOrder` with the current shared tail,
collect replies until all are in or `round_timeout_s` passes, accept the replies that are exactly a
backbone (server/strategy.py), average them, then evaluate the new model (test pairs for the record,
validation pairs for its threshold and its rank: server/ledger/best.py), write the checkpoint and commit
the round to the ledger, in that order. Too few valid replies: the attempt is recorded as failed.

A site that does not train answers with a `TrainRefusal` (kind and one-line reason); it is recorded
per site (status `error`, detail `refused (KIND): REASON`) and printed as `site NAME refused (KIND):
REASON`. When the sites that refused leave fewer than `min_sites` that could still answer, retrying
cannot help: the run fails at once with those lines.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from pydantic import ValidationError

from facefed.common.model.mobilefacenet import MobileFaceNet, load_shared_state, prefix_fingerprint, shared_state
from facefed.common.protocol.train import ARRAYS, CONFIG, REFUSAL, TrainOrder, TrainRefusal, problems
from facefed.server.evaluation import Evaluators, save_roc
from facefed.server.ledger.checkpoints import CheckpointStore
from facefed.server.ledger.db import CheckpointRow, Ledger, RoundRow, SiteRound, refusal_line
from facefed.server.runs import RunContext, RunFailed
from facefed.server.sites import Sites, SiteSlot
from facefed.server.strategy import Accepted, BackboneAverage, ReplyRejected, declared_names, payload_bytes, to_record

POLL_S = 0.25  # how often to pull replies (Flower's own send_and_receive sleeps 3 s)
UNREACHABLE = {ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE}


@dataclass(frozen=True)
class Exchanged:
    """Replies by node id: (reply, seconds after the push); `pushed_at` is the push's wall clock."""

    replies: dict[int, tuple[Message, float]]
    pushed_at: float


def exchange(
    grid: Grid, msgs: list[Message], timeout: float, phase: Callable[[str], None] = lambda _t: None
) -> Exchanged:
    """Push, then pull until every node replied or `timeout` passed (`phase`: k of n replies in)."""
    t0 = time.monotonic()
    pushed_at = time.time()
    node_of = {}
    for msg, mid in zip(msgs, grid.push_messages(msgs), strict=True):
        if mid:
            node_of[mid] = msg.metadata.dst_node_id
    replies: dict[int, tuple[Message, float]] = {}
    deadline = t0 + timeout
    while node_of and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(node_of)):
            node = node_of.pop(reply.metadata.reply_to_message_id, None)
            if node is not None:
                replies[node] = (reply, time.monotonic() - t0)
        if node_of:
            phase(f"{len(replies)} of {len(replies) + len(node_of)} replies in after {time.monotonic() - t0:.0f} s")
            time.sleep(POLL_S)
    return Exchanged(replies, pushed_at)


def timing(took: float) -> str:
    """The reply time as the server measured it. A site's own timings stay in its log (issue 11):
    a reply carries DP outputs and public facts only."""
    return f"reply after {took:.1f} s"


def refusal_of(reply: Message) -> TrainRefusal | None:
    """The site's refusal, if the reply is one (a malformed one is reported as a crash of the site)."""
    if reply.has_error() or REFUSAL not in reply.content.config_records:
        return None
    try:
        return TrainRefusal.model_validate(dict(reply.content.config_records[REFUSAL]))
    except ValidationError as e:
        return TrainRefusal(site="?", kind="crash", reason=f"malformed refusal record: {problems(e)}"[:1000])


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


class RoundRunner:
    """Runs the rounds of whichever run it is handed (`RunContext`): a training run or a replay."""

    def __init__(
        self,
        grid: Grid,
        ledger: Ledger,
        store: CheckpointStore,
        sites: Sites,
        evaluators: Evaluators,
        *,
        base_sha256: str,
        log: Callable[[str], None] = print,
        phase: Callable[[str], None] = lambda _text: None,
    ):
        self.grid, self.ledger, self.store, self.sites, self.evaluators = grid, ledger, store, sites, evaluators
        self.phase = phase
        self.base_sha256 = base_sha256
        self.flwr_run_id = str(grid.run.run_id)
        self.log = log

    def rounds(
        self,
        ctx: RunContext,
        until: int | None = None,
        between: Callable[[RunContext], RunContext] | None = None,
    ) -> RunContext:
        """Rounds of `ctx`'s run up to `until` (default: all planned). After each round but the last,
        `between` (the forget query) may hand back another run to go on with: the current run's
        replay. Returns the run the loop ended on."""
        cfg = ctx.config
        while True:
            done, parent = self.ledger.head(ctx.run_id)
            last = cfg.rounds if until is None else until
            if done >= last:
                return ctx
            model, _ = self.store.load(parent)
            model.train_from = cfg.train.train_from
            prefix = prefix_fingerprint(model)  # sites check their frozen layers against it
            rnd = done + 1
            # Attempts are numbered across restarts (ledger) but limited per `train` invocation, so a run
            # that failed for lack of sites can be resumed once they are back.
            for _ in range(cfg.max_round_attempts):
                if self.round(ctx, rnd, self.ledger.next_attempt(ctx.run_id, rnd), model, parent, prefix) is not None:
                    break
            else:
                raise RunFailed(
                    f"round {rnd} failed {cfg.max_round_attempts} time(s) in a row (run "
                    f"{ctx.run_id}); see `facefed-server status --run {ctx.run_id}`"
                )
            if between is not None and rnd < last:
                ctx = between(ctx)

    def orders(
        self,
        ctx: RunContext,
        slots: list[SiteSlot],
        rnd: int,
        attempt: int,
        sent: ArrayRecord,
        wire_layout: dict[str, list[str]],
        parent: CheckpointRow,
        prefix: str,
    ) -> list[Message]:
        cfg = ctx.config
        shard = self.ledger.run(ctx.run_id).shard
        msgs = []
        for slot in slots:
            name = self.sites.name_of(slot)
            # The site's head continues along the model's lineage (a replay: the replaced run's heads
            # before the rollback); 0 = a fresh head; -1 = unknown site: its latest head of this run.
            head = self.ledger.site_head(parent.checkpoint_id, name) if name else None
            order = TrainOrder.model_validate(
                {
                    "run-id": ctx.run_id,
                    "round": rnd,
                    "attempt": attempt,
                    "parent-checkpoint": parent.checkpoint_id,
                    "parent-sha256": parent.sha256,
                    "base-sha256": self.base_sha256,
                    "prefix-fingerprint": prefix,
                    "train-config": cfg.train.model_dump_json(),
                    "steps": cfg.local_steps(),
                    "seed": cfg.seed,
                    "weighting": cfg.weighting,
                    "expected-site": slot.site or "",
                    "shard": shard,
                    "shards": cfg.shards,
                    "head-run": head[0] if head else ctx.run_id,
                    "head-round": head[1] if head else (0 if name else -1),
                    "head-attempt": head[2] if head else 0,
                    **wire_layout,
                }
            )
            msgs.append(
                Message(
                    RecordDict({ARRAYS: sent, CONFIG: order.to_config()}),
                    dst_node_id=slot.node_id,
                    message_type=MessageType.TRAIN,
                    ttl=cfg.round_timeout_s + 60.0,
                    group_id=f"{ctx.run_id}/{rnd}/{attempt}",
                )
            )
        return msgs

    def round(
        self, ctx: RunContext, rnd: int, attempt: int, model: MobileFaceNet, parent: CheckpointRow, prefix: str
    ) -> tuple[MobileFaceNet, CheckpointRow] | None:
        """Run one round attempt; the new (model, checkpoint) if committed, None if recorded as failed."""
        cfg = ctx.config
        started = time.time()
        slots, expected = self.sites.wait(cfg)
        tail = shared_state(model)
        sent, wire_layout = to_record(tail)
        average = BackboneAverage(weighting=cfg.weighting, expected=tail)
        t_send = time.monotonic()
        # Too few sites online: do not ask anyone to train (it would spend their privacy budget on a
        # round that cannot be committed); record the round as failed instead.
        enough = len(slots) >= cfg.min_sites
        where = f"round {rnd}/{cfg.rounds} attempt {attempt} of run {ctx.run_id}"
        self.phase(f"{where}: training at {len(slots)} site(s)")
        got = (
            exchange(
                self.grid,
                self.orders(ctx, slots, rnd, attempt, sent, wire_layout, parent, prefix),
                cfg.round_timeout_s,
                lambda text: self.phase(f"{where}: training at the sites, {text}"),
            )
            if enough
            else Exchanged({}, time.time())
        )
        exchange_s = time.monotonic() - t_send

        bytes_down = payload_bytes(sent)
        sites: list[SiteRound] = []
        accepted: list[tuple[str, Accepted, float]] = []
        refusals: list[str] = []
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
            if slot.node_id not in got.replies:
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
            reply, took = got.replies[slot.node_id]
            no = refusal_of(reply)
            if no is not None:
                who = slot.site or self.sites.name_of(slot) or no.site
                if slot.site is None and cfg.sites is not None and who not in cfg.sites:
                    continue
                detail = f"refused ({no.kind}): {no.reason}"
                sites.append(
                    SiteRound(
                        site=who,
                        status="error",
                        node_id=str(slot.node_id),
                        bytes_down=bytes_down,
                        detail=detail,
                    )
                )
                refusals.append(f"site {who} {detail}")
                self.log(f"[facefed] round {rnd} attempt {attempt}: site {who} {detail}")
                continue
            claimed = None
            try:
                acc = average.check_reply(reply)
                claimed = acc.reply.site.name
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
        nan = float("nan")
        for name, acc, took in accepted:
            m, info = acc.reply.metrics, acc.reply.site
            sites.append(
                SiteRound(
                    site=name,
                    status="ok",
                    node_id=str(acc.node_id),
                    weight=acc.weight,
                    people=m.num_people,
                    images=None,  # kept column, no longer filled: a site's image count stays at the site (issue 11)
                    steps=_or(m.steps, 0),
                    loss=None,  # idem: the loss is computed from the site's data without noise
                    epsilon=_or(m.epsilon, nan),
                    delta=_or(m.delta, nan),
                    unit=_or(info.unit, ""),
                    accountant=_or(info.accountant, ""),
                    compute_s=None,  # idem: timings stay in the site's log
                    bytes_down=bytes_down,
                    bytes_up=acc.wire_bytes,
                    received_keys=sorted(acc.tensors),
                    detail=timing(took),
                )
            )
        seen = {s.site for s in sites}
        for name in expected:
            if name not in seen:
                sites.append(SiteRound(site=name, status="missing", detail="not online when the round started"))
        participants = sorted(s.site for s in sites if s.status == "ok")
        missing = sorted(s.site for s in sites if s.status != "ok")

        common: dict[str, Any] = dict(
            run_id=ctx.run_id,
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
            refusing = {s.site for s in sites if refusal_line(s.site, s.detail)}
            could = ({self.sites.name_of(s) or f"node-{s.node_id}" for s in slots} | set(expected)) - refusing
            if refusals and len(could) < cfg.min_sites:
                raise RunFailed(
                    f"round {rnd} cannot succeed: {'; '.join(refusals)} "
                    f"(min_sites={cfg.min_sites}, {len(could)} other site(s))"
                )
            return None

        self.phase(f"{where}: averaging {len(accepted)} replies, writing the checkpoint")
        t_agg = time.monotonic()
        new_model = copy.deepcopy(model)
        agg = average.aggregate([a for _, a, _ in accepted])
        load_shared_state(new_model, {k: torch.from_numpy(v) for k, v in agg.items()})
        aggregate_s = time.monotonic() - t_agg
        # Evaluate before writing the checkpoint: it carries the decision threshold picked on the
        # validation pairs (common/calibration.py), whose score also ranks it (server/ledger/best.py).
        # The ledger commit still comes last.
        due = self.evaluators.due(cfg, rnd)
        evaluator = self.evaluators.for_config(cfg)
        validator = self.evaluators.validator_for(cfg)
        eval_metrics: dict[str, float] = {}
        if evaluator is not None and due:
            self.phase(f"{where}: evaluating the new model on LFW {cfg.evaluate.label}")
            eval_metrics = evaluator(new_model)
        meta: dict[str, Any] = {"participants": participants, "weighting": cfg.weighting}
        if validator is not None and due:
            self.phase(f"{where}: scoring the new model and choosing its threshold on the validation pairs")
            threshold, val_metrics = validator(new_model)
            meta["threshold"] = threshold.to_dict()
            eval_metrics |= val_metrics
        t_save = time.monotonic()
        ckpt = self.store.save(
            new_model,
            run_id=ctx.run_id,
            rnd=rnd,
            parent=parent,
            meta=meta,
            base_sha256=self.base_sha256,
            sites={
                s.site: {"epsilon": s.epsilon, "delta": s.delta, "unit": s.unit}
                for s in sites
                if s.status == "ok" and s.epsilon is not None and math.isfinite(s.epsilon)
            },
        )
        commit_s = aggregate_s + time.monotonic() - t_save  # evaluation is timed on its own
        slowest = max(took for _, _, took in accepted)  # sites send no timings: the exchange's own clock
        metrics: dict[str, float] = {
            "exchange_s": exchange_s,
            "slowest_site_s": slowest,
            "aggregate_s": commit_s,
            "round_s": exchange_s + commit_s,
            "overhead": (exchange_s + commit_s - slowest) / max(exchange_s + commit_s, 1e-9),
            "bytes_down_per_site": float(bytes_down),
            **eval_metrics,
        }
        if "threshold" in meta:
            metrics["threshold"] = float(meta["threshold"]["threshold"])
        if eval_metrics:
            save_roc(evaluator, ckpt.path)
        committed = RoundRow(
            status="committed",
            ended_at=time.time(),
            checkpoint_id=ckpt.checkpoint_id,
            checkpoint_sha256=ckpt.sha256,
            total_weight=sum(a.weight for _, a, _ in accepted),
            metrics=metrics,
            detail=None,
            **common,
        )
        self.ledger.commit_round(committed, ckpt)
        eps = ", ".join(f"{s.site} eps={s.epsilon:.3f}" for s in sites if s.status == "ok")
        acc_txt = f" lfw={metrics['lfw_accuracy']:.4f}" if "lfw_accuracy" in metrics else ""
        acc_txt += f" val={metrics['val_accuracy']:.4f}" if "val_accuracy" in metrics else ""
        self.log(
            f"[facefed] round {rnd}/{cfg.rounds} committed ({ckpt.checkpoint_id}){acc_txt}; {eps}; "
            f"missing {missing or 'none'}; round {metrics['round_s']:.1f}s, slowest site {slowest:.1f}s"
        )
        worse = self.ledger.worse_than(committed)
        if worse is not None:
            self.log(f"[facefed] {worse.line()}")
        return new_model, ckpt
