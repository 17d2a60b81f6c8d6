"""The site's worker socket (client/site/worker.py), typed: what the ClientApp asks its warm worker and
what comes back.

One call is two byte messages each way over the authenticated Unix socket: a JSON header (one of the
strict models below, at most `MAX_HEADER` bytes) and the tail as raw little-endian float32 (at most
`MAX_TAIL` bytes; empty for a query), laid out as the header's order or reply says
(common/protocol/tail.py). No pickle: the bytes are read with a size limit and validated at both
ends, so neither side can be made to unpickle objects or read an unbounded message.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from facefed.common.protocol.forget import QueryOrder, QueryReply
from facefed.common.protocol.train import RefusalKind, TrainOrder, TrainReply

MAX_HEADER = 4 << 20  # bytes: a query reply lists at most 10,000 requests
MAX_TAIL = 256 << 20  # bytes: the shared tail is a few MB


class _Msg(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class TrainCall(_Msg):
    kind: Literal["train"] = "train"
    order: TrainOrder  # the tail follows as raw float32, in the order's layout


class QueryCall(_Msg):
    kind: Literal["query"] = "query"
    order: QueryOrder


class WorkerCall(_Msg):
    call: Annotated[TrainCall | QueryCall, Field(discriminator="kind")]


class TrainDone(_Msg):
    kind: Literal["train"] = "train"
    reply: TrainReply  # the tail follows as raw float32, in the reply's layout


class QueryDone(_Msg):
    kind: Literal["query"] = "query"
    reply: QueryReply


class Refused(_Msg):
    """The round was refused or failed at the site: SiteRefused(kind, reason) at the ClientApp."""

    kind: Literal["refused"] = "refused"
    refusal: RefusalKind
    reason: Annotated[str, StringConstraints(max_length=1000)]


class WorkerAnswer(_Msg):
    answer: Annotated[TrainDone | QueryDone | Refused, Field(discriminator="kind")]
