"""Backbone-only FedAvg on Flower's Message API.

The server sends each site the shared tail of the embedder (`common.model.shared_state`), packed as
one flat vector with its layout (`common.wire`), and averages what comes back, weighted by the
people or images each site trained on. It accepts from a site exactly the tensors it sent: same
names, same shapes, same order, finite float32 values. Anything else (a head row block, a
num-people-sized tensor, a renamed key) rejects that site's reply for the round, so a site's private
margin head cannot reach the aggregate even by mistake.

Averaging is done in float64 and cast back, so the result does not depend on the order replies
arrive in beyond float64 rounding.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from facefed.common.protocol.tail import NAMES, SHAPES, TAIL, LayoutError, compare, layout, pack, unpack

ARRAYS = "backbone"  # ArrayRecord key both ways (holding one flat array, `common.wire.TAIL`)
CONFIG = "config"  # ConfigRecord key server -> site (the order, with the layout)
METRICS = "metrics"  # MetricRecord key site -> server
SITE = "site"  # ConfigRecord key site -> server (name, privacy unit, accountant, the layout)
WEIGHT_KEYS = {"people": "num-people", "images": "num-images"}


class ReplyRejected(ValueError):
    """A site's reply that must not be aggregated; the message says what was wrong."""


@dataclass(frozen=True)
class Accepted:
    node_id: int
    weight: float
    tensors: dict[str, np.ndarray]
    metrics: MetricRecord
    site: ConfigRecord
    wire_bytes: int


def declared_names(msg: Message) -> list[str] | None:
    """The tensor names a reply says it carries (what the server 'received'), if it says."""
    if msg.has_error() or SITE not in msg.content.config_records:
        return None
    names = msg.content.config_records[SITE].get(NAMES)
    return [str(n) for n in names] if isinstance(names, list) else None


def to_record(state: Mapping[str, object]) -> tuple[ArrayRecord, dict[str, list[str]]]:
    """The wire form of a tail: ArrayRecord with one flat array, and the layout for the ConfigRecord."""
    flat, names, shapes = pack(state)
    return ArrayRecord({TAIL: Array(flat)}), {NAMES: names, SHAPES: shapes}


class BackboneFedAvg(FedAvg):
    def __init__(self, *, weighting: str, expected: Mapping[str, object], min_sites: int):
        if weighting not in WEIGHT_KEYS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHT_KEYS)}, got {weighting!r}")
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=min_sites,
            min_available_nodes=min_sites,
            weighted_by_key=WEIGHT_KEYS[weighting],
            arrayrecord_key=ARRAYS,
            configrecord_key=CONFIG,
        )
        self.weighting = weighting
        self.layout = layout(expected)
        self.node_ids: list[int] = []

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One train message per chosen site (the app chooses them: registered, online, not revoked)."""
        config["server-round"] = server_round
        record = RecordDict({ARRAYS: arrays, CONFIG: config})
        return [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=n) for n in self.node_ids]

    def check_reply(self, msg: Message) -> Accepted:
        """Accept a reply or raise ReplyRejected saying why (error, other tensors, shapes, values, weight)."""
        if msg.has_error():
            raise ReplyRejected(f"the site's ClientApp failed: {msg.error.reason}")
        content = msg.content
        if set(content.array_records.keys()) != {ARRAYS}:
            raise ReplyRejected(f"expected one ArrayRecord {ARRAYS!r}, got {sorted(content.array_records.keys())}")
        if METRICS not in content.metric_records or SITE not in content.config_records:
            raise ReplyRejected(f"reply lacks the {METRICS!r} metrics or the {SITE!r} record")
        record, site = content.array_records[ARRAYS], content.config_records[SITE]
        if set(record.keys()) != {TAIL}:
            raise ReplyRejected(f"expected one flat array {TAIL!r}, got arrays {sorted(record.keys())[:5]}")
        names, shapes = site.get(NAMES), site.get(SHAPES)
        if not isinstance(names, list) or not isinstance(shapes, list):
            raise ReplyRejected("reply does not declare the layout of its tensors")
        names, shapes = [str(n) for n in names], [str(s) for s in shapes]
        if len(names) != len(shapes):
            raise ReplyRejected("reply's layout names and shapes do not pair up")
        why = compare(self.layout, (names, shapes))
        if why:
            raise ReplyRejected(why)
        flat = record[TAIL]
        if flat.dtype != "float32":
            raise ReplyRejected(f"tail has dtype {flat.dtype}, expected float32")
        values = flat.numpy()
        try:
            tensors = unpack(values, names, shapes)
        except LayoutError as e:
            raise ReplyRejected(str(e)) from None
        if not np.isfinite(values).all():
            bad = next(k for k, v in tensors.items() if not np.isfinite(v).all())
            raise ReplyRejected(f"`{bad}` holds NaN or inf")
        metrics = content.metric_records[METRICS]
        weight = metrics.get(self.weighted_by_key)
        if not isinstance(weight, (int, float)) or not weight > 0:
            raise ReplyRejected(
                f"weight `{self.weighted_by_key}` is {weight!r}; a site that trained on no one cannot contribute"
            )
        return Accepted(msg.metadata.src_node_id, float(weight), tensors, metrics, site, payload_bytes(record))

    def aggregate(self, accepted: Sequence[Accepted]) -> dict[str, np.ndarray]:
        """Weighted mean of the accepted tails (float64 accumulation), name -> float32 array."""
        if not accepted:
            raise ValueError("nothing to aggregate")
        total = sum(a.weight for a in accepted)
        out: dict[str, np.ndarray] = {}
        for a in accepted:
            w = a.weight / total
            for k, arr in a.tensors.items():
                v = arr.astype(np.float64) * w
                out[k] = v if k not in out else out[k] + v
        return {k: np.ascontiguousarray(out[k].astype(np.float32)) for k in self.layout[0]}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        """FedAvg's hook, for Flower's own `start` loop: reject bad replies, average the rest."""
        accepted = []
        for msg in replies:
            try:
                accepted.append(self.check_reply(msg))
            except ReplyRejected:
                continue
        if not accepted:
            return None, None
        record, _ = to_record(self.aggregate(accepted))
        return record, MetricRecord({self.weighted_by_key: sum(a.weight for a in accepted)})


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of array data in a record (what dominates a message on the wire)."""
    return sum(len(a.data) for a in record.values())
