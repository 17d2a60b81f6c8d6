"""The ClientApp: the site's side of a federated round (Flower Message API).

Flower runs it in a fresh process per message. It stays thin on purpose (Flower and numpy only):
the round itself, i.e. opening the vault, decoding faces in memory, DP training with the site's
private head, saving the head and the contribution log, is `client/site/round.py`'s `run_round`,
executed by the site's warm worker (`client/site/worker.py`, started by `facefed-client start`) or,
when there is none (simulation, or the worker is down), in this process.

`query` messages carry right-to-be-forgotten state both ways (client/forget/sync.py): the site
reports its erased-but-not-yet-unlearned requests and keeps the receipts the server delivers.

Reply to `train`: the shared tail only (ArrayRecord "backbone"), the metrics (DP outputs and public
facts: steps, epsilon, delta, noise, rate, the published people count; common/protocol/train.py) and
a small record with the site's name, privacy unit and accountant. Loss, image counts and timings stay
in the site's log. The head never leaves the site. A round that does not happen (the site's policy
refuses the order, its configuration or data is unusable, the budget would be exceeded, or anything
crashed) is answered with a `TrainRefusal` record (`refusal`) naming the kind and the reason in one
line, so the server's operator reads why in `facefed-server train`/`status` and the ledger
(client/site/refusal.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from pydantic import ValidationError

from facefed.client.site import worker
from facefed.client.site.refusal import kind_of, reason_of
from facefed.common.errors import FacefedError
from facefed.common.protocol.forget import MAX_MESSAGE, ORDER_KEY, REPLY_KEY, QueryOrder, QueryReply
from facefed.common.protocol.tail import TAIL, unpack
from facefed.common.protocol.train import (
    ARRAYS,
    CONFIG,
    METRICS,
    REFUSAL,
    SITE,
    SiteRefused,
    TrainOrder,
    TrainRefusal,
    problems,
)
from facefed.common.protocol.worker import QueryCall, QueryDone, Refused, TrainCall, TrainDone, WorkerCall

app = ClientApp()
NO_WORKER = (
    "the site's training worker is not answering; this node is privilege-separated (its ClientApp cannot "
    "open the vault), so nothing was trained: see the worker's log in the site's state directory"
)


class SiteRoundError(FacefedError, RuntimeError):
    """The round failed at the site; the message is what the server records for it."""


def site_name(nc: dict) -> str:
    """Who this node is, for a refusal (a simulated node has a partition instead of a name)."""
    if str(nc.get("site", "")):
        return str(nc["site"])[:256]
    return f"sim-{int(nc.get('partition-id', 0)):03d}" if "partition-id" in nc else "unknown"


def refused(msg: Message, site: str, e: BaseException) -> Message:
    """The one-line answer instead of a tail: kind and reason, no traceback."""
    record = TrainRefusal(site=site, kind=kind_of(e), reason=reason_of(e)[:1000])
    return Message(RecordDict({REFUSAL: ConfigRecord(record.wire())}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    try:
        return _train(msg, context)
    except Exception as e:  # noqa: BLE001 - every failure goes back to the server as one line
        return refused(msg, site_name(dict(context.node_config)), e)


def _train(msg: Message, context: Context) -> Message:
    config = dict(msg.content[CONFIG])
    try:  # validated here and again by the worker (common/protocol/train.py, worker.py)
        order = TrainOrder.from_config(config)
    except ValidationError as e:
        raise SiteRefused(
            "config", f"the server's order is malformed ({problems(e)}); server and site facefed versions differ?"
        ) from None
    flat = np.ascontiguousarray(msg.content.array_records[ARRAYS][TAIL].numpy(), dtype="<f4")
    nc, rc = dict(context.node_config), dict(context.run_config)

    got = (
        worker.call(worker.link_of(nc), WorkerCall(call=TrainCall(order=order)), flat.tobytes())
        if "state" in nc
        else None
    )
    if got is None and nc.get("privsep"):
        raise SiteRefused("crash", NO_WORKER)
    if got is None:
        from facefed.client.site.round import order_of, run_round, site_of  # the training stack, in this process

        received = unpack(flat, list(order.layout_names), list(order.layout_shapes))
        got = worker.reply_of(run_round(site_of(nc, rc), order_of(config), received), "in-process")
    answer, tail = got
    if isinstance(answer.answer, Refused):
        raise SiteRefused(answer.answer.refusal, answer.answer.reason)
    if not isinstance(answer.answer, TrainDone):
        raise SiteRoundError("the site's training worker answered a train call with something else")
    metrics, info = answer.answer.reply.to_records()
    arrays = ArrayRecord({TAIL: Array(np.frombuffer(tail, dtype="<f4").copy())})
    return Message(RecordDict({ARRAYS: arrays, METRICS: metrics, SITE: info}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Forget requests: settle them, keep delivered receipts, drop tainted heads, report the pending."""
    nc = dict(context.node_config)
    try:
        raw = str(msg.content[CONFIG][ORDER_KEY])
        if len(raw) > MAX_MESSAGE:
            raise SiteRoundError(f"query from the server over {MAX_MESSAGE} characters: refused unread")
        order = QueryOrder.model_validate_json(raw)
    except (KeyError, ValidationError) as e:
        raise SiteRoundError(f"malformed query from the server: {str(e)[:500]}") from None
    if "vault" not in nc:  # a simulated site has no vault, hence no requests
        answer = QueryReply(site=f"sim-{int(nc.get('partition-id', 0)):03d}").model_dump_json()
    else:
        # The warm worker answers without this process importing torch (a query between every round).
        got = worker.call(worker.link_of(nc), WorkerCall(call=QueryCall(order=order))) if "state" in nc else None
        if got is not None and isinstance(got[0].answer, QueryDone):
            answer = got[0].answer.reply.model_dump_json()
        elif nc.get("privsep"):
            raise SiteRoundError(NO_WORKER)
        else:  # no worker, or one that cannot answer (e.g. an older one still running): answer here
            from facefed.client.forget.sync import answer_query
            from facefed.common.nodekeys import check_site_name

            answer = answer_query(
                site=check_site_name(str(nc["site"])),
                vault_dir=Path(str(nc["vault"])),
                state_dir=Path(str(nc["state"])),
                order=order,
            ).model_dump_json()
    return Message(RecordDict({CONFIG: ConfigRecord({REPLY_KEY: answer})}), reply_to=msg)
