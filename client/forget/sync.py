"""The site's answer to the server's `query` message (common/protocol/forget.py): forget requests both ways.

In order:
 1. `settle` every request first (client/forget/erase.py): a site that crashed between erasing and
    reporting, or a head written by a round in flight during an erasure, is put right before
    anything is reported;
 2. keep the receipts the server delivers, once their signature verifies against the server key
    pinned at this site (each moves its request to `model_unlearned`, then `receipt_issued`; an
    unsigned or wrongly signed one, or one naming another request or pseudonym, is not stored);
 3. delete the head files the server says carry a forgotten person's influence (rounds a replay
    replaced: their other rows were trained beside the person);
 4. answer the budget question of an upcoming replay from the site's own accountant;
 5. report the requests whose data is erased and whose model is not yet unlearned.
"""

from __future__ import annotations

import json
from pathlib import Path

from facefed.client.forget.erase import settle
from facefed.client.forget.receipts import KeyPinError, ReceiptError, verify_at_site
from facefed.client.forget.requests import RequestError, RequestLog
from facefed.client.state import SiteState, requests_path
from facefed.client.training.privacy import check_order, open_accountant, policy_of
from facefed.common.config import ConfigError, TrainConfig, validate_config
from facefed.common.protocol.forget import BudgetAnswer, BudgetAsk, DropHeads, PendingRequest, QueryOrder, QueryReply
from facefed.common.protocol.train import SiteRefused


def answer_query(*, site: str, vault_dir: Path, state_dir: Path, order: QueryOrder) -> QueryReply:
    problems: list[str] = []
    for outcome in settle(vault_dir, state_dir):
        problems += outcome.problems
    stored = _keep_receipts(vault_dir, order, problems)
    dropped = sum(_drop_heads(state_dir, d) for d in order.drop_heads)
    budget = _budget(vault_dir, state_dir, order.budget) if order.budget else None
    pending = []
    if requests_path(vault_dir).is_file():
        with RequestLog(vault_dir) as log:
            for r in log.pending_for_server():
                pending.append(
                    PendingRequest(
                        request_id=r.request_id,
                        pseudonym=r.pseudonym,
                        received_at=r.received_at,
                        erased_at=float(r.erased_at or 0.0),  # pending_for_server: erased_at is set
                        shares_destroyed=int(r.shares_destroyed or 0),
                        contributions={s.run_id: sorted(set(s.rounds)) for s in r.contributions},
                    )
                )
    return QueryReply(
        site=site,
        pending=pending,
        stored=stored,
        heads_dropped=dropped,
        budget=budget,
        problems=[p[:1000] for p in problems[:100]],
    )


def _keep_receipts(vault_dir: Path, order: QueryOrder, problems: list[str]) -> list[str]:
    if not order.deliver:
        return []
    stored = []
    with RequestLog(vault_dir) as log:
        for d in order.deliver:
            try:
                req = log.get(d.request_id)
            except RequestError:
                problems.append(f"receipt for unknown request {d.request_id}: not stored")
                continue
            body = d.receipt.get("receipt") if isinstance(d.receipt, dict) else None
            try:  # the signature, against the server key pinned at this site (client/forget/receipts.py)
                verify_at_site(d.receipt, vault_dir)
            except (ReceiptError, KeyPinError) as e:
                problems.append(f"receipt for {d.request_id} not stored: {e}")
                continue
            if (
                not isinstance(body, dict)
                or body.get("request_id") != req.request_id
                or body.get("person_pseudonym") != req.pseudonym
            ):
                problems.append(f"receipt for {d.request_id} names another request or person: not stored")
                continue
            if req.stage == "receipt_issued":
                stored.append(req.request_id)  # a repeated delivery (our earlier reply was lost)
                continue
            if req.unlearned_at is None:
                log.mark_unlearned(
                    req.request_id,
                    run_id=d.run_id,
                    rnd=d.round,
                    checkpoint_id=d.checkpoint_id,
                    checkpoint_sha256=d.checkpoint_sha256,
                )
            log.store_receipt(req.request_id, d.receipt)
            stored.append(req.request_id)
    return stored


def _drop_heads(state_dir: Path, drop: DropHeads) -> int:
    # run_id is validated against a strict pattern (common/protocol/forget.py)
    n = 0
    heads = SiteState(state_dir).round_heads(drop.run_id)
    for path in sorted(p for rnd, _, p in heads if rnd >= drop.from_round):
        path.unlink(missing_ok=True)
        n += 1
    return n


def _budget(vault_dir: Path, state_dir: Path, ask: BudgetAsk) -> BudgetAnswer:
    try:
        cfg = validate_config(json.loads(ask.train_config), TrainConfig, where="server query")
    except (json.JSONDecodeError, ConfigError) as e:
        return BudgetAnswer(
            fits=False,
            unit="?",
            delta=0.0,
            epsilon_now=-1.0,
            epsilon_planned=-1.0,
            max_epsilon=-1.0,
            detail=f"the replay's training config is unusable here: {e}"[:2000],
        )
    if cfg.privacy_unit == "none":
        return BudgetAnswer(
            fits=True,
            unit="none",
            delta=0.0,
            epsilon_now=-1.0,
            epsilon_planned=-1.0,
            max_epsilon=-1.0,
            detail="non-private training: no epsilon is claimed",
        )
    try:  # the vault's own accountant and policy (client/training/privacy.py), as a round would use them
        policy = policy_of(vault_dir)
        check_order(policy, cfg, ask.steps)
        acc = open_accountant(SiteState(state_dir, vault_dir), policy, ask.shard, ask.shards)
        cfg = cfg.model_copy(update={"max_epsilon": min(cfg.max_epsilon, policy.max_epsilon), "delta": policy.delta})
    except SiteRefused as e:
        return BudgetAnswer(
            fits=False,
            unit=cfg.privacy_unit,
            delta=cfg.delta,
            epsilon_now=-1.0,
            epsilon_planned=-1.0,
            max_epsilon=cfg.max_epsilon,
            detail=f"refused ({e.kind}): {e.reason}"[:2000],
        )
    steps = ask.rounds * ask.steps + cfg.probe_steps
    if cfg.noise_multiplier is None:
        return BudgetAnswer(
            fits=False,
            unit=cfg.privacy_unit,
            delta=cfg.delta,
            epsilon_now=acc.epsilon(),
            epsilon_planned=-1.0,
            max_epsilon=cfg.max_epsilon,
            detail="a replay needs train.noise_multiplier (target_epsilon calibrates one call)",
        )
    # As if every head were fresh (a rollback to round 0): the centring release and the probe steps too.
    now, planned = (
        acc.epsilon(),
        acc.projected(cfg.noise_multiplier, cfg.sample_rate, steps, extra=cfg.fresh_head_events()),
    )
    fits = planned <= cfg.max_epsilon
    return BudgetAnswer(
        fits=fits,
        unit=cfg.privacy_unit,
        delta=cfg.delta,
        epsilon_now=now,
        epsilon_planned=planned,
        max_epsilon=cfg.max_epsilon,
        detail=""
        if fits
        else (
            f"{ask.rounds} replayed round(s) would take this site's per-"
            f"{cfg.privacy_unit} epsilon from {now:.3f} to {planned:.3f}, over its "
            f"max_epsilon {cfg.max_epsilon:g} (delta {cfg.delta:g})"
        ),
    )
