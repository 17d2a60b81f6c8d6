"""Backbone-only federated averaging: check each site's reply, then average the accepted ones.

The server sends each site the shared tail of the embedder (`common.model.shared_state`), packed as
one flat vector with its layout (common/protocol/tail.py), and averages what comes back, weighted by
the number of people each site publishes (its enrolment count, or 1 if its policy keeps it). It accepts from a site exactly the tensors it sent: same
names, same shapes, same order, finite float32 values, with a well-formed `TrainReply`. Anything else
(a head row block, a num-people-sized tensor, a renamed key) rejects that site's reply for the round,
so a site's private margin head cannot reach the aggregate even by mistake.

Averaging is done in float64 and cast back, so the result does not depend on the order replies
arrive in beyond float64 rounding. (A plain averager: the round loop is server/rounds.py, not
Flower's strategy hooks.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from pydantic import ValidationError

from facefed.common.errors import FacefedError
from facefed.common.protocol.tail import NAMES, SHAPES, TAIL, LayoutError, compare, layout, pack, unpack
from facefed.common.protocol.train import ARRAYS, METRICS, SITE, TrainReply, problems

WEIGHT_KEYS = {"people": "num-people"}  # a site's image count is not sent (issue 11)


class ReplyRejected(FacefedError, ValueError):
    """A site's reply that must not be aggregated; the message says what was wrong."""


@dataclass(frozen=True)
class Accepted:
    node_id: int
    weight: float
    tensors: dict[str, np.ndarray]
    reply: TrainReply
    wire_bytes: int


def declared_names(msg: Message) -> list[str] | None:
    """The tensor names a reply says it carries (what the server 'received'), if it says."""
    if msg.has_error() or SITE not in msg.content.config_records:
        return None
    names = msg.content.config_records[SITE].get(NAMES)
    return [str(n) for n in names] if isinstance(names, list) else None


def to_record(state: Mapping[str, object]) -> tuple[ArrayRecord, dict[str, list[str]]]:
    """The wire form of a tail: ArrayRecord with one flat array, and the layout for the order."""
    flat, names, shapes = pack(state)
    return ArrayRecord({TAIL: Array(flat)}), {NAMES: names, SHAPES: shapes}


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of array data in a record (what dominates a message on the wire)."""
    return sum(len(a.data) for a in record.values())


class BackboneAverage:
    """Checks replies against the tail that was sent and averages the accepted ones."""

    def __init__(self, *, weighting: str, expected: Mapping[str, object]):
        if weighting not in WEIGHT_KEYS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHT_KEYS)}, got {weighting!r}")
        self.weighting = weighting
        self.weight_key = WEIGHT_KEYS[weighting]
        self.layout = layout(expected)

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
        try:
            reply = TrainReply.from_records(content.metric_records[METRICS], site)
        except ValidationError as e:
            raise ReplyRejected(f"malformed reply record: {problems(e)}") from None
        weight = reply.metrics.num_people
        if weight is None or not weight > 0:
            raise ReplyRejected(
                f"weight `{self.weight_key}` is {weight!r}; a site that trained on no one cannot contribute"
            )
        return Accepted(msg.metadata.src_node_id, float(weight), tensors, reply, payload_bytes(record))

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
