"""Federation configuration (`configs/federation*.toml`): rounds, sites, timeouts, evaluation, and the
sites' local training (`[train]`, the trainer's own TrainConfig, sent to every site each round).

Loaded with `common.config.load_config(path, FederationConfig)`: unknown keys and out-of-range values
are errors that name the key. `facefed-server train` freezes the validated config (with resolved
data paths) as JSON in the server state; the ServerApp reads that frozen copy, and its sha256 goes in
the ledger so a resumed run provably continues with the same settings.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from facefed.common.config import TrainConfig

PAIRS_FILES = ("pairsDevTest.txt", "pairsDevTrain.txt", "pairs.txt")


class EvalConfig(BaseModel):
    """Evaluation of the global model at the server after each round: the LFW verification protocol of
    `facefed-server evaluate` (10-fold CV thresholds, flip averaging), so a model has one number wherever
    it is shown."""

    model_config = ConfigDict(extra="forbid")

    pairs: Literal["pairsDevTest.txt", "pairsDevTrain.txt", "pairs.txt"] = Field(
        "pairsDevTest.txt", description="pairsDevTest's people are disjoint from peopleDevTrain (the sites)"
    )
    every: int = Field(1, ge=0, description="evaluate every N rounds (and always after the last); 0 = never")
    unseen: bool = Field(
        False,
        description="score only the pairs with no person LFW-built sites train on (peopleDevTrain's people "
        "with >= 2 images), in their official folds: for pairs.txt, whose people overlap the sites'",
    )
    max_pairs: int | None = Field(
        None,
        ge=20,
        description="a balanced subset of the pairs, for smoke tests only "
        "(not the protocol; leave unset for reported figures)",
    )

    @property
    def label(self) -> str:
        """The test set as output names it (EvalCache.label)."""
        return f"{self.pairs}, unseen people" if self.unseen else self.pairs


def _default_eval() -> EvalConfig:
    return EvalConfig.model_validate({})


class FederationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        "facefed",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="prefix of the run ids",
    )
    rounds: int = Field(3, ge=1, le=10_000, description="federated rounds of a run")
    min_sites: int = Field(2, ge=1, description="a round needs this many valid replies, else it fails")
    sites: list[str] | None = Field(None, description="train with these registered sites only (default: all)")
    round_timeout_s: float = Field(900.0, gt=0, description="wait this long for the sites' replies")
    wait_for_sites_s: float = Field(300.0, ge=0, description="wait this long for min_sites sites to be online")
    max_round_attempts: int = Field(2, ge=1, description="a round that fails is retried this many times in all")
    weighting: Literal["people"] = Field(
        "people", description="FedAvg weight of a site's update: the people count it publishes (no image counts)"
    )
    local_epochs: float | None = Field(
        None,
        gt=0,
        description="if set, local steps = ceil(local_epochs / train.sample_rate) (an expected pass "
        "over every person under Poisson sampling), overriding train.steps",
    )
    seed: int = Field(
        0,
        ge=0,
        description="seeds the random rows of the sites' fresh heads (data-independent); "
        "the DP randomness at the sites is fresh OS entropy, never derived from it",
    )
    shards: int = Field(
        1,
        ge=1,
        le=16,
        description="SISA-style shards: S shard runs, each on the people a keyed "
        "hash puts in it at every site; the embedding is the normalised concatenation of the shard "
        "embeddings, and forgetting a person replays only their shard",
    )
    lfw: str | None = Field(
        None, description="LFW archive for evaluation (default $FACEFED_LFW); recorded in the state by `train`"
    )
    pretrained: str | None = Field(None, description="base model (default train.pretrained, then $FACEFED_PRETRAINED)")
    evaluate: EvalConfig = Field(default_factory=_default_eval)
    train: TrainConfig

    @model_validator(mode="after")
    def _check(self) -> FederationConfig:
        if self.sites is not None:
            if len(set(self.sites)) != len(self.sites):
                raise ValueError("sites: a site is listed twice")
            if len(self.sites) < self.min_sites:
                raise ValueError(f"sites lists {len(self.sites)} site(s), fewer than min_sites={self.min_sites}")
        if self.train.target_epsilon is not None and self.rounds > 1:
            raise ValueError(
                "train.target_epsilon calibrates one call; in a federation use train.noise_multiplier "
                "(epsilon then grows round by round, bounded by train.max_epsilon)"
            )
        return self

    def local_steps(self) -> int:
        if self.local_epochs is None:
            return self.train.steps
        return math.ceil(self.local_epochs / self.train.sample_rate)

    def frozen_json(self) -> str:
        """Canonical JSON: the same settings always give the same text (and sha256)."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def sha256(self) -> str:
        return hashlib.sha256(self.frozen_json().encode()).hexdigest()
