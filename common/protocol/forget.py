"""The `query` exchange between server and site that carries right-to-be-forgotten state both ways.

Server -> site (`QueryOrder`): receipts for the site's requests that were unlearned, the head files
the site must delete because they carry a forgotten person's influence (rounds a replay replaced),
and, before a replay, the training the replay will ask of the site, so the site can say whether its
privacy budget allows it.

Site -> server (`QueryReply`): the site's name, its requests whose data is erased but whose model is
not yet unlearned (pseudonym only, never the person id, with the runs and rounds the person was
present in), the receipts it stored, and its budget answer.

Both travel as one JSON string in a ConfigRecord and are validated here on arrival (they come over
the network): unknown keys, out-of-range values and oversized lists are refused.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

ORDER_KEY, REPLY_KEY = "facefed-query", "facefed-reply"
MAX_ITEMS = 10_000
MAX_MESSAGE = 16 << 20  # characters of one query order or reply on the wire, checked before parsing
MAX_RECEIPT = 64 * 1024  # bytes of one signed receipt (a few hundred in practice)

RunId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,80}$")]
RequestId = Annotated[str, Field(pattern=r"^fr-[0-9a-f]{16}$")]
Pseudonym = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class _Strict(BaseModel):
    """Strict (no coercion), closed (no unknown keys), frozen, every list and string bounded."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Delivery(_Strict):
    """A request of this site that the federation unlearned, with the signed receipt to keep."""

    request_id: RequestId
    run_id: RunId  # the replay run
    round: Annotated[int, Field(ge=0)]
    checkpoint_id: Annotated[str, Field(min_length=1, max_length=128)]
    checkpoint_sha256: Hex64
    receipt: dict[str, Any]  # the signed document, stored as received (the server's signature covers it)

    @field_validator("receipt")
    @classmethod
    def _bounded(cls, v: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(v)) > MAX_RECEIPT:
            raise ValueError(f"a receipt is at most {MAX_RECEIPT} bytes")
        return v


class DropHeads(_Strict):
    """Head files of `run_id` from round `from_round` on carry a forgotten person's influence."""

    run_id: RunId
    from_round: Annotated[int, Field(ge=1)]


class BudgetAsk(_Strict):
    """The training a replay will ask of the site: `rounds` rounds of `steps` steps (+ probe steps)."""

    train_config: Annotated[str, Field(max_length=20_000)]  # TrainConfig JSON, as in a train order
    rounds: Annotated[int, Field(ge=0, le=100_000)]
    steps: Annotated[int, Field(ge=0, le=10_000_000)]
    shard: Annotated[int, Field(ge=0, le=255)] = 0  # the replayed run's shard (its own accountant at the site)
    shards: Annotated[int, Field(ge=1, le=256)] = 1


class QueryOrder(_Strict):
    deliver: Annotated[list[Delivery], Field(max_length=MAX_ITEMS)] = []
    drop_heads: Annotated[list[DropHeads], Field(max_length=MAX_ITEMS)] = []
    budget: BudgetAsk | None = None


class PendingRequest(_Strict):
    request_id: RequestId
    pseudonym: Pseudonym
    received_at: float
    erased_at: float
    shares_destroyed: Annotated[int, Field(ge=0)]
    contributions: Annotated[
        dict[RunId, Annotated[list[Annotated[int, Field(ge=1)]], Field(max_length=100_000)]],
        Field(max_length=MAX_ITEMS),
    ]


class BudgetAnswer(_Strict):
    fits: bool
    unit: Annotated[str, Field(max_length=16)]
    delta: float
    epsilon_now: float
    epsilon_planned: float  # after the asked-for training (an upper bound: probe steps counted once)
    max_epsilon: float
    detail: Annotated[str, Field(max_length=2000)] = ""


class QueryReply(_Strict):
    site: Annotated[str, Field(min_length=1, max_length=64)]
    pending: Annotated[list[PendingRequest], Field(max_length=MAX_ITEMS)] = []
    stored: Annotated[list[RequestId], Field(max_length=MAX_ITEMS)] = []  # receipts kept at the site
    heads_dropped: Annotated[int, Field(ge=0)] = 0
    budget: BudgetAnswer | None = None
    problems: Annotated[list[Annotated[str, Field(max_length=1000)]], Field(max_length=100)] = []
