"""The `train` message both ways, typed: the server's order and the site's reply.

The server sends one ConfigRecord (`CONFIG`) holding a `TrainOrder` and the tail (`ARRAYS`, see
common/protocol/tail.py); a site answers with the tail, a MetricRecord (`METRICS`) and a ConfigRecord
(`SITE`) that `TrainReply` reads. Both are strict pydantic models (no coercion, no unknown keys, bounded
sizes), so a key renamed or added at one end is refused at the other instead of silently ignored.
Wire keys are the models' field names with `-` for `_`. No torch here: the ClientApp imports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from flwr.app import ConfigRecord, MetricRecord
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from facefed.common.errors import FacefedError
from facefed.common.protocol.tail import NAMES, SHAPES

ARRAYS = "backbone"  # ArrayRecord key both ways (one flat array, common/protocol/tail.py `TAIL`)
CONFIG = "config"  # ConfigRecord key server -> site: the TrainOrder (and the forget query's order)
METRICS = "metrics"  # MetricRecord key site -> server: TrainReply.metrics
SITE = "site"  # ConfigRecord key site -> server: TrainReply.site (name, privacy unit, accountant, layout)

RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,80}$"
MAX_TENSORS = 1024  # the shared tail is two dozen tensors

Str = Annotated[str, StringConstraints(max_length=256)]
RunId = Annotated[str, StringConstraints(pattern=RUN_ID_PATTERN)]
Name = Annotated[str, StringConstraints(max_length=512)]
Shape = Annotated[str, StringConstraints(max_length=64, pattern=r"^[0-9,]*$")]


def _dashed(name: str) -> str:
    return name.replace("_", "-")


class _Wire(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, alias_generator=_dashed, populate_by_name=True)

    def wire(self) -> dict[str, Any]:
        """The record's content: wire keys, without the optional values left unset."""
        return self.model_dump(by_alias=True, exclude_none=True)


class TrainOrder(_Wire):
    """What the server asks a site to do in one round attempt (validated at the site: it comes over the network)."""

    run_id: RunId
    round: int = Field(ge=1)
    attempt: int = Field(ge=1)
    parent_checkpoint: Str
    parent_sha256: Str
    base_sha256: Str
    prefix_fingerprint: Str
    train_config: Annotated[str, StringConstraints(max_length=65536)]  # common.config.TrainConfig as JSON
    steps: int = Field(ge=0)
    seed: int
    weighting: Str
    expected_site: Str = ""  # "" without authentication: the site says who it is
    shard: int = Field(default=0, ge=0)
    shards: int = Field(default=1, ge=1, le=256)
    head_run: Annotated[str, StringConstraints(pattern=r"^$|" + RUN_ID_PATTERN)] = ""  # "" = run_id
    head_round: int = Field(ge=-1)  # 0: a fresh head; -1: unknown site, its latest head of this run
    head_attempt: int = Field(ge=0)
    layout_names: list[Name] = Field(max_length=MAX_TENSORS)  # wire key NAMES
    layout_shapes: list[Shape] = Field(max_length=MAX_TENSORS)  # wire key SHAPES

    def to_config(self) -> ConfigRecord:
        return ConfigRecord(self.wire())

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TrainOrder:
        """From a ConfigRecord (or its dict); raises pydantic's ValidationError (a ValueError)."""
        return cls.model_validate(dict(config))


class TrainMetrics(_Wire):
    """The site's numbers for the round (MetricRecord `METRICS`): DP outputs and public facts only.

    Nothing here is computed from the site's data beyond what the DP release covers: the steps are
    the order's (probe steps: those of a fresh head, which the server ordered), epsilon and delta are
    functions of public parameters (sigma, q, steps: the site's whole history of them) and of the
    site's policy, and `num_people` (the averaging weight) is the enrolment count that the DP analysis
    treats as public, sent only if the site's policy says so (`publish_people`; else 1). Loss, image
    counts, who or how many were sampled, and timings stay in the site's own log (issue 11)."""

    num_people: int = Field(ge=0)
    steps: int | None = Field(default=None, ge=0)
    probe_steps: int | None = Field(default=None, ge=0)
    epsilon: float | None = None  # -1 when infinite
    delta: float | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None


class SiteInfo(_Wire):
    """Who answered and how it accounts (ConfigRecord `SITE`), with the layout of its tail."""

    name: Str
    unit: Str | None = None
    accountant: Str | None = None
    head_from: Str | None = None
    worker: Str | None = None
    layout_names: list[Name] = Field(max_length=MAX_TENSORS)  # wire key NAMES
    layout_shapes: list[Shape] = Field(max_length=MAX_TENSORS)  # wire key SHAPES


class TrainReply(_Wire):
    """A site's answer to a `train` order, besides the tail itself."""

    metrics: TrainMetrics
    site: SiteInfo

    @classmethod
    def from_records(cls, metrics: Mapping[str, Any], site: Mapping[str, Any]) -> TrainReply:
        """From the reply's MetricRecord and ConfigRecord; raises pydantic's ValidationError."""
        return cls(metrics=TrainMetrics.model_validate(dict(metrics)), site=SiteInfo.model_validate(dict(site)))

    def to_records(self) -> tuple[MetricRecord, ConfigRecord]:
        return MetricRecord(self.metrics.wire()), ConfigRecord(self.site.wire())


def problems(e: ValidationError, limit: int = 3) -> str:
    """A ValidationError in one line that names the wire keys: "`round`: Input should be ...; ..."."""
    errs = e.errors()
    out = "; ".join(f"`{'.'.join(str(p) for p in x['loc']) or '-'}`: {x['msg']}" for x in errs[:limit])
    return out + (f" (and {len(errs) - limit} more)" if len(errs) > limit else "")


if (_dashed("layout_names"), _dashed("layout_shapes")) != (NAMES, SHAPES):  # the layout fields above
    raise ImportError("common/protocol/tail.py's layout keys no longer match TrainOrder/SiteInfo")


REFUSAL = "refusal"  # ConfigRecord key site -> server, instead of a tail: why this site did not train
RefusalKind = Literal["policy", "config", "budget", "data", "crash"]


class SiteRefused(FacefedError):
    """A site declines an order, or its round failed, for a reason the server operator must see.

    kind: policy (the order asks for less privacy than the site's policy allows), config (the
    order or the node's configuration is unusable), budget (the release would exceed the site's
    epsilon budget), data (missing or unreadable vault, weights, accountant), crash (anything else).
    """

    def __init__(self, kind: RefusalKind, reason: str) -> None:
        super().__init__(reason)
        self.kind: RefusalKind = kind
        self.reason = reason


class TrainRefusal(_Wire):
    """The site's one-line answer when it does not train: the server prints `site NAME refused (KIND): REASON`."""

    site: Str
    kind: RefusalKind
    reason: Annotated[str, StringConstraints(max_length=1000)]
