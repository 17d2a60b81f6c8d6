"""The forget `query` to every online site (common/protocol/forget.py), and what its replies mean.

One exchange delivers the signed receipts and the head deletions the sites are owed, collects the
forget requests they erased (recorded in the ledger) and, when asked, each site's answer whether its
privacy budget allows a replay.
"""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from facefed.common.fedconfig import FederationConfig
from facefed.common.protocol.forget import ORDER_KEY, REPLY_KEY, BudgetAsk, Delivery, DropHeads, QueryOrder, QueryReply
from facefed.common.protocol.train import CONFIG
from facefed.server.ledger.db import ForgetRow
from facefed.server.rounds import RoundRunner, exchange

QUERY_TIMEOUT_S = 120.0  # a site's query answer (settling requests) is quick; do not hold a round up longer


def sync(runner: RoundRunner, cfg: FederationConfig | None, budget: BudgetAsk | None = None) -> dict[str, QueryReply]:
    """One `query` exchange with every online site (chosen as `cfg` says; None: all registered):
    deliver receipts and head deletions, collect requests (recorded in the ledger) and, with `budget`,
    each site's answer for a replay. Site name -> its reply, for the sites that answered usably."""
    ledger, sites, log = runner.ledger, runner.sites, runner.log
    slots, _ = sites.choose(cfg)
    if not slots:
        return {}
    drops = [
        DropHeads(run_id=r.parent_run_id, from_round=r.start_round + 1)
        for r in ledger.runs()
        if r.kind == "replay" and r.parent_run_id
    ]
    deliver: dict[str, list[Delivery]] = {}
    for r in ledger.requests("unlearned"):
        if r.delivered_at is None and r.receipt is not None and r.model_checkpoint is not None:
            m = ledger.checkpoint(r.model_checkpoint)
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
        name = sites.name_of(slot)
        order = QueryOrder(deliver=deliver.get(name, []) if name else [], drop_heads=drops, budget=budget)
        msgs.append(
            Message(
                RecordDict({CONFIG: ConfigRecord({ORDER_KEY: order.model_dump_json()})}),
                dst_node_id=slot.node_id,
                message_type=MessageType.QUERY,
                ttl=QUERY_TIMEOUT_S + 60.0,
                group_id=f"query/{runner.flwr_run_id}/{time.time():.3f}",
            )
        )
    wait = QUERY_TIMEOUT_S if cfg is None else min(QUERY_TIMEOUT_S, cfg.round_timeout_s)
    replies = exchange(runner.grid, msgs, wait).replies
    out: dict[str, QueryReply] = {}
    for slot in slots:
        who = sites.name_of(slot) or f"node-{slot.node_id}"
        if slot.node_id not in replies:
            log(f"[facefed] query: no answer from {who} within {wait:g} s; its requests wait for the next query")
            ledger.record_query(who, False, detail=f"no answer within {wait:g} s")
            continue
        msg = replies[slot.node_id][0]
        try:
            if msg.has_error():
                raise ValueError(f"error {msg.error.code}: {msg.error.reason}")
            qr = QueryReply.model_validate_json(str(msg.content[CONFIG][REPLY_KEY]))
        except (ValueError, KeyError) as e:  # pydantic's ValidationError is a ValueError
            log(f"[facefed] query: unusable answer from {who}: {str(e)[:300]}")
            ledger.record_query(who, False, detail=f"unusable answer: {str(e)[:300]}")
            continue
        if slot.site is not None and qr.site != slot.site:
            log(f"[facefed] query: node registered as {slot.site!r} answers as {qr.site!r}; ignored")
            ledger.record_query(who, False, detail=f"answered as site {qr.site!r}")
            continue
        name = slot.site or qr.site
        sites.node_site[slot.node_id] = name
        for p in qr.pending:
            _, new = ledger.report_request(
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
                log(
                    f"[facefed] forget request {p.request_id} from site {name} (pseudonym {p.pseudonym[:8]}..): "
                    f"present in {', '.join(f'{k} rounds {v}' for k, v in p.contributions.items()) or 'no round'}"
                )
        mine = {d.request_id for d in deliver.get(name, [])}
        if qr.stored:
            ledger.mark_delivered([rid for rid in qr.stored if rid in mine])
            log(f"[facefed] site {name} stored receipt(s) {', '.join(qr.stored)}")
        for problem in qr.problems:
            log(f"[facefed] site {name}: {problem}")
        ledger.record_query(name, True, len(qr.pending), "; ".join(qr.problems)[:1000] or None)
        out[name] = qr
    return out
