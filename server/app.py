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

Site identity: with node authentication, a node is the site whose registered key fingerprint matches
the node's public key (from the ledger), and a reply that claims another name is rejected. Without
authentication (local tests, simulation) the name the node reports is used.
"""

from __future__ import annotations

import copy
import fcntl
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from common.model import (MobileFaceNet, build_embedder, load_shared_state, prefix_fingerprint, sha256_file,
                          shared_state)
from common.nodekeys import fingerprint_pem
from server.checkpoints import CheckpointStore
from server.ledger import CheckpointRow, Ledger, RoundRow, SiteRound
from server.statedir import StatePaths
from server.strategy import (ARRAYS, CONFIG, Accepted, BackboneFedAvg, ReplyRejected, declared_names,
                             payload_bytes, to_record)
from server.submission import Submission, read_submission

POLL_S = 0.25  # how often to pull replies (Flower's own send_and_receive sleeps 3 s)
UNREACHABLE = {ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE}
app = ServerApp()


class RunFailed(RuntimeError):
    """The run cannot go on (a round failed max_round_attempts times, or no sites); the ledger says why."""


@contextmanager
def run_lock(paths: StatePaths, run_id: str):
    """One ServerApp per ledger run: a second `train` of the same run fails fast instead of interleaving."""
    lock_dir = paths.root / "locks"
    lock_dir.mkdir(exist_ok=True)
    with open(lock_dir / f"{run_id}.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFailed(f"run {run_id} is already being trained by another ServerApp") from None
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
        from common.evaluate import EvalCache  # heavy imports only when evaluating
        from common.lfw import LFW

        t = time.monotonic()
        if self._cache is None:
            self._cache = EvalCache(LFW(self.lfw_path), self.pairs, flip=self.flip, max_pairs=self.max_pairs)
        res = self._cache.evaluate(model)
        return {"lfw_accuracy": float(res.accuracy_mean), "lfw_accuracy_std": float(res.accuracy_std),
                "lfw_auc": float(res.auc), "lfw_pairs": float(res.n_pairs), "eval_s": time.monotonic() - t}


class Coordinator:
    def __init__(self, grid: Grid, paths: StatePaths, sub: Submission, *,
                 evaluator: Callable[[MobileFaceNet], dict[str, float]] | None = None,
                 log: Callable[[str], None] = print):
        self.grid, self.paths, self.sub, self.cfg = grid, paths, sub, sub.config
        self.ledger = Ledger(paths.ledger)
        self.store = CheckpointStore(paths.checkpoints)
        self.run_id = sub.run_id
        self.flwr_run_id = str(grid.run.run_id)
        self.log = log
        ev = self.cfg.evaluate
        self.evaluator = evaluator if evaluator is not None else (
            Evaluator(sub.lfw, ev.pairs, ev.flip, ev.max_pairs) if ev.every else None)
        self.base_sha256 = sha256_file(sub.pretrained)

    # -- run ------------------------------------------------------------------------------------
    def run(self) -> None:
        with run_lock(self.paths, self.run_id):
            self._open_run()
            self.ledger.add_attempt(self.run_id, self.flwr_run_id)
            try:
                self._rounds()
            except (KeyboardInterrupt, SystemExit) as e:
                # The SuperLink is going away (Ctrl-C, SIGTERM, or its death noticed by Flower's parent
                # monitor): the run is resumable from its last committed round.
                self.ledger.set_run_status(self.run_id, "stopped", f"interrupted ({type(e).__name__}); "
                                           f"`facefed-server train` with the same config resumes it")
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

    def _open_run(self) -> None:
        known = {r.run_id: r for r in self.ledger.runs()}
        if self.run_id in known:
            if not self.sub.resume:
                raise RunFailed(f"run {self.run_id} already exists in the ledger")
            run = known[self.run_id]
            if run.config_sha256 != self.cfg.sha256():
                raise RunFailed(f"run {self.run_id} was started with another configuration "
                                f"(sha256 {run.config_sha256[:12]}..); resume it with the same config")
            self.ledger.set_run_status(self.run_id, "running")
            done, _ = self.ledger.head(self.run_id)
            self.log(f"[facefed] resuming run {self.run_id} after round {done}")
            return
        model = build_embedder(self.sub.pretrained, train_from=self.cfg.train.train_from)
        base = self.store.save(model, run_id=self.run_id, rnd=0, parent=None,
                               meta={"source": "pretrained", "pretrained_sha256": self.base_sha256})
        self.ledger.create_run(self.run_id, config_json=self.cfg.frozen_json(), config_sha256=self.cfg.sha256(),
                               rounds=self.cfg.rounds, base=base)
        self.log(f"[facefed] new run {self.run_id}: {self.cfg.rounds} rounds, base {base.checkpoint_id}")
        if self.evaluator is not None:
            metrics = self.evaluator(model)
            self.ledger.set_base_metrics(self.run_id, metrics)
            self.log(f"[facefed] base model: LFW accuracy {metrics['lfw_accuracy']:.4f}")

    def _rounds(self) -> None:
        done, parent = self.ledger.head(self.run_id)
        model, _ = self.store.load(parent)
        model.train_from = self.cfg.train.train_from
        self.prefix = prefix_fingerprint(model)  # sites check their frozen layers against it
        for rnd in range(done + 1, self.cfg.rounds + 1):
            # Attempts are numbered across restarts (ledger) but limited per `train` invocation, so a run
            # that failed for lack of sites can be resumed once they are back.
            for _ in range(self.cfg.max_round_attempts):
                result = self.round(rnd, self.ledger.next_attempt(self.run_id, rnd), model, parent)
                if result is not None:
                    model, parent = result
                    break
            else:
                raise RunFailed(f"round {rnd} failed {self.cfg.max_round_attempts} time(s) in a row; see "
                                f"`facefed-server status --run {self.run_id}`")

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
            if self.cfg.sites is not None and site is not None and site not in self.cfg.sites:
                continue
            slots.append(SiteSlot(n.node_id, site))
        expected = list(self.cfg.sites) if self.cfg.sites is not None else sorted(registered.values())
        return slots, expected

    def _wait_for_sites(self) -> tuple[list[SiteSlot], list[str]]:
        deadline = time.monotonic() + self.cfg.wait_for_sites_s
        while True:
            slots, expected = self._choose()
            if len(slots) >= self.cfg.min_sites or time.monotonic() >= deadline:
                return slots, expected
            time.sleep(1.0)

    def _messages(self, slots: list[SiteSlot], rnd: int, attempt: int, sent: ArrayRecord, wire_layout: dict,
                  parent: CheckpointRow) -> list[Message]:
        cfg = self.cfg
        msgs = []
        for slot in slots:
            head = self.ledger.last_site_commit(self.run_id, slot.site) if slot.site else None
            config = ConfigRecord({
                "run-id": self.run_id, "round": rnd, "attempt": attempt,
                "parent-checkpoint": parent.checkpoint_id, "parent-sha256": parent.sha256,
                "base-sha256": self.base_sha256, "prefix-fingerprint": self.prefix, "train-config": cfg.train.model_dump_json(),
                "steps": cfg.local_steps(), "seed": cfg.seed, "weighting": cfg.weighting,
                "expected-site": slot.site or "",
                # Which of the site's stored heads to continue: its last committed round in this run
                # (0 = a fresh head; -1 = unknown site without authentication: its latest head).
                "head-round": head[0] if head else (0 if slot.site else -1), "head-attempt": head[1] if head else 0,
                **wire_layout,
            })
            msgs.append(Message(RecordDict({ARRAYS: sent, CONFIG: config}), dst_node_id=slot.node_id,
                                message_type=MessageType.TRAIN, ttl=cfg.round_timeout_s + 60.0,
                                group_id=f"{self.run_id}/{rnd}/{attempt}"))
        return msgs

    def _exchange(self, msgs: list[Message]) -> dict[int, tuple[Message, float]]:
        """Push, then pull until every node replied or the round timeout passed: node -> (reply, seconds)."""
        t0 = time.monotonic()
        self.pushed_at = time.time()
        node_of = {}
        for msg, mid in zip(msgs, self.grid.push_messages(msgs), strict=True):
            if mid:
                node_of[mid] = msg.metadata.dst_node_id
        replies: dict[int, tuple[Message, float]] = {}
        deadline = t0 + self.cfg.round_timeout_s
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
        return (f"reply after {took:.1f} s: dispatch {dispatch:.1f} s, start-up {startup:.1f} s, "
                f"compute {compute:.1f} s, return {back:.1f} s")

    def round(self, rnd: int, attempt: int, model: MobileFaceNet,
              parent: CheckpointRow) -> tuple[MobileFaceNet, CheckpointRow] | None:
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
                sites.append(SiteRound(site=slot.site or f"node-{slot.node_id}", status="missing",
                                       node_id=str(slot.node_id), detail="online, not asked: too few sites online"))
                continue
            if slot.node_id not in replies:
                sites.append(SiteRound(site=slot.site or f"node-{slot.node_id}", status="missing",
                                       node_id=str(slot.node_id), bytes_down=bytes_down,
                                       detail=f"no reply within round_timeout_s={cfg.round_timeout_s:g}"))
                continue
            reply, took = replies[slot.node_id]
            claimed = None
            try:
                acc = strategy.check_reply(reply)
                claimed = str(acc.site.get("name", ""))
                if slot.site is not None and claimed != slot.site:
                    raise ReplyRejected(f"node registered as site {slot.site!r} reports site {claimed!r}; "
                                        f"start it with --site {slot.site}")
                name = slot.site or claimed or f"node-{slot.node_id}"
                if cfg.sites is not None and name not in cfg.sites:
                    continue  # without authentication the name is only known now
                accepted.append((name, acc, took))
            except ReplyRejected as e:
                keys = declared_names(reply)
                # Flower answers for a node that stopped heartbeating (crashed mid-round): it is missing.
                gone = reply.has_error() and reply.error.code in UNREACHABLE
                sites.append(SiteRound(site=slot.site or claimed or f"node-{slot.node_id}",
                                       status="missing" if gone else "error" if reply.has_error() else "rejected",
                                       node_id=str(slot.node_id), bytes_down=bytes_down, received_keys=keys,
                                       detail=str(e)))
        for name, acc, took in accepted:
            m = acc.metrics
            sites.append(SiteRound(
                site=name, status="ok", node_id=str(acc.node_id), weight=acc.weight,
                people=int(m.get("num-people", 0)), images=int(m.get("num-images", 0)), steps=int(m.get("steps", 0)),
                loss=float(m.get("loss", float("nan"))), epsilon=float(m.get("epsilon", float("nan"))),
                delta=float(m.get("delta", float("nan"))), unit=str(acc.site.get("unit", "")),
                accountant=str(acc.site.get("accountant", "")), compute_s=float(m.get("compute-s", float("nan"))),
                bytes_down=bytes_down, bytes_up=acc.wire_bytes, received_keys=sorted(acc.tensors),
                detail=self._timing(m, took)))
        seen = {s.site for s in sites}
        for name in expected:
            if name not in seen:
                sites.append(SiteRound(site=name, status="missing", detail="not online when the round started"))
        participants = sorted(s.site for s in sites if s.status == "ok")
        missing = sorted(s.site for s in sites if s.status != "ok")

        common = dict(run_id=self.run_id, round=rnd, attempt=attempt, flwr_run_id=self.flwr_run_id,
                      started_at=started, parent_checkpoint=parent.checkpoint_id, parent_sha256=parent.sha256,
                      participants=participants, missing=missing, weighting=cfg.weighting,
                      sites=sorted(sites, key=lambda s: s.site))
        if len(accepted) < cfg.min_sites:
            why = (f"{len(accepted)} valid repl{'y' if len(accepted) == 1 else 'ies'}, min_sites={cfg.min_sites}"
                   f" ({len(slots)} site(s) online)")
            self.ledger.record_failed_round(RoundRow(
                status="failed", ended_at=time.time(), checkpoint_id=None, checkpoint_sha256=None, total_weight=0.0,
                metrics={"exchange_s": exchange_s}, detail=why, **common))
            self.log(f"[facefed] round {rnd} attempt {attempt} FAILED: {why}; missing {missing}")
            return None

        t_agg = time.monotonic()
        new_model = copy.deepcopy(model)
        agg = strategy.aggregate([a for _, a, _ in accepted])
        load_shared_state(new_model, {k: torch.from_numpy(v) for k, v in agg.items()})
        ckpt = self.store.save(new_model, run_id=self.run_id, rnd=rnd, parent=parent,
                               meta={"participants": participants, "weighting": cfg.weighting})
        commit_s = time.monotonic() - t_agg
        slowest = max(float(a.metrics.get("compute-s", 0.0)) for _, a, _ in accepted)
        metrics: dict[str, float] = {"exchange_s": exchange_s, "slowest_site_s": slowest,
                                     "aggregate_s": commit_s, "round_s": exchange_s + commit_s,
                                     "overhead": (exchange_s + commit_s - slowest) / max(exchange_s + commit_s, 1e-9),
                                     "bytes_down_per_site": float(bytes_down)}
        if self.evaluator is not None and (rnd % cfg.evaluate.every == 0 or rnd == cfg.rounds):
            metrics.update(self.evaluator(new_model))
        self.ledger.commit_round(RoundRow(
            status="committed", ended_at=time.time(), checkpoint_id=ckpt.checkpoint_id,
            checkpoint_sha256=ckpt.sha256, total_weight=sum(a.weight for _, a, _ in accepted), metrics=metrics,
            detail=None, **common), ckpt)
        eps = ", ".join(f"{s.site} eps={s.epsilon:.3f}" for s in sites if s.status == "ok")
        acc_txt = f" lfw={metrics['lfw_accuracy']:.4f}" if "lfw_accuracy" in metrics else ""
        self.log(f"[facefed] round {rnd}/{cfg.rounds} committed ({ckpt.checkpoint_id}){acc_txt}; {eps}; "
                 f"missing {missing or 'none'}; round {metrics['round_s']:.1f}s, slowest site {slowest:.1f}s")
        return new_model, ckpt


@app.main()
def main(grid: Grid, context: Context) -> None:
    state_dir = str(context.run_config.get("state-dir", ""))
    submission = str(context.run_config.get("submission", ""))
    if not state_dir or not Path(state_dir).is_absolute():
        raise ValueError("run config `state-dir` must be the server's absolute state directory; "
                         "submit runs with `facefed-server train --state DIR --config FILE`")
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    paths = StatePaths.at(state_dir)
    Coordinator(grid, paths, read_submission(paths, submission)).run()
