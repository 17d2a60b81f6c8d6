"""The ClientApp: the site's side of a federated round (Flower Message API).

Flower runs it in a fresh process per message. It stays thin on purpose (Flower and numpy only):
the round itself, i.e. opening the vault, decoding faces in memory, DP training with the site's
private head, saving the head and the contribution log, is `client/site/round.py`'s `run_round`,
executed by the site's warm worker (`client/site/worker.py`, started by `facefed-client start`) or,
when there is none (simulation, or the worker is down), in this process.

`query` messages carry right-to-be-forgotten state both ways (client/forget/sync.py): the site
reports its erased-but-not-yet-unlearned requests and keeps the receipts the server delivers.

Reply to `train`: the shared tail only (ArrayRecord "backbone"), the metrics (people, images, steps, loss,
epsilon, delta, timings) and a small record with the site's name, privacy unit and accountant.
The head never leaves the site. A round that does not happen (the site's policy refuses the order, its
configuration or data is unusable, the budget would be exceeded, or anything crashed) is answered with
a `TrainRefusal` record (`refusal`) naming the kind and the reason in one line, so the server's
operator reads why in `facefed-server train`/`status` and the ledger (client/site/refusal.py).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from facefed.client.site import worker
from facefed.client.site.refusal import kind_of, one_line, reason_of
from facefed.common.errors import FacefedError
from facefed.common.protocol.forget import ORDER_KEY, REPLY_KEY, QueryOrder, QueryReply
from facefed.common.protocol.tail import NAMES, SHAPES, TAIL, pack, unpack
from facefed.common.protocol.train import (
    ARRAYS,
    CONFIG,
    METRICS,
    REFUSAL,
    SITE,
    SiteInfo,
    SiteRefused,
    TrainMetrics,
    TrainRefusal,
    TrainReply,
)

app = ClientApp()


class SiteRoundError(FacefedError, RuntimeError):
    """The round failed at the site; the message is what the server records for it."""


def process_started_at() -> float:
    """Wall-clock start of this process (Linux /proc), so the server can tell process start-up (Flower
    launching `flwr-clientapp`, imports) apart from training time; NaN elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return float("nan")


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
    nc = dict(context.node_config)
    try:
        return _train(msg, context)
    except Exception as e:  # noqa: BLE001 - every failure goes back to the server as one line
        return refused(msg, site_name(nc), e)


def _train(msg: Message, context: Context) -> Message:
    t0, started_at = time.perf_counter(), time.time()
    config = dict(msg.content[CONFIG])
    # The tail arrives as one flat vector with its layout (common/protocol/tail.py).
    names, shapes = config.get(NAMES), config.get(SHAPES)
    if not isinstance(names, list) or not isinstance(shapes, list):
        raise SiteRefused("config", "malformed train order: the tail's names and shapes must be lists")
    received = unpack(
        msg.content.array_records[ARRAYS][TAIL].numpy(), [str(n) for n in names], [str(x) for x in shapes]
    )
    nc, rc = dict(context.node_config), dict(context.run_config)

    res = worker.call(Path(str(nc["state"])), {"config": config, "arrays": received}) if "state" in nc else None
    if res is None:
        from facefed.client.site.round import order_of, run_round, site_of  # the training stack, in this process

        r = run_round(site_of(nc, rc), order_of(config), received)
        res = {"ok": True, "arrays": r.arrays, "metrics": r.metrics, "info": {**r.info, "worker": "in-process"}}
    elif res.get("ok"):
        res["info"] = {**res["info"], "worker": "warm"}
    if not res.get("ok"):
        kind = res.get("kind", "crash")
        raise SiteRefused(
            kind if kind in ("policy", "config", "budget", "data", "crash") else "crash",
            one_line(res.get("error", "the site's training worker failed")),
        )

    flat, names, shapes = pack(res["arrays"])  # the shared tail only: the head stays at the site
    reply = TrainReply(
        metrics=TrainMetrics.model_validate(
            {
                **res["metrics"],
                "compute-s": time.perf_counter() - t0,
                "handler-start": started_at,
                "process-start": process_started_at(),
            }
        ),
        site=SiteInfo.model_validate({**res["info"], NAMES: names, SHAPES: shapes}),
    )
    metrics, info = reply.to_records()
    arrays = ArrayRecord({TAIL: Array(np.ascontiguousarray(flat))})
    return Message(RecordDict({ARRAYS: arrays, METRICS: metrics, SITE: info}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Forget requests: settle them, keep delivered receipts, drop tainted heads, report the pending."""
    from pydantic import ValidationError

    nc = dict(context.node_config)
    try:
        order = QueryOrder.model_validate_json(str(msg.content[CONFIG][ORDER_KEY]))
    except (KeyError, ValidationError) as e:
        raise SiteRoundError(f"malformed query from the server: {str(e)[:500]}") from None
    if "vault" not in nc:  # a simulated site has no vault, hence no requests
        answer = QueryReply(site=f"sim-{int(nc.get('partition-id', 0)):03d}").model_dump_json()
    else:
        # The warm worker answers without this process importing torch (a query between every round).
        res = worker.call(Path(str(nc["state"])), {"query": order.model_dump_json()}) if "state" in nc else None
        if res is not None and res.get("ok"):
            answer = res["reply"]
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
