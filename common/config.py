"""Configuration files: TOML validated by pydantic models that forbid unknown keys.

`load_config(path, Model)` is generic (the federation reuses it for its own model): it reads TOML and
turns every validation error into one line `config FILE: key `a.b`: problem`, so a typo or an
out-of-range value names the key instead of dumping a pydantic trace.
"""

from __future__ import annotations

import math
import os
import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from facefed.common.errors import FacefedError
from facefed.common.model.stages import EMBEDDING_DIM, STAGES

M = TypeVar("M", bound=BaseModel)


class ConfigError(FacefedError, ValueError):
    """A config file that cannot be read or does not validate; the message names file and key."""


def format_validation_error(e: ValidationError, where: str) -> str:
    lines = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; docs/configuration.md lists every accepted key)"
        lines.append(f"config {where}: key `{key}`: {msg}")
    return "\n".join(lines)


def validate_config(data: dict[str, Any], model_cls: type[M], *, where: str = "<dict>") -> M:
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, where)) from None


def load_config(path: str | os.PathLike[str], model_cls: type[M]) -> M:
    """Read a TOML file into `model_cls`; ConfigError names the file and the first offending key(s)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"config {path}: cannot read ({e.strerror or e})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {path}: not valid TOML ({e})") from None
    return validate_config(data, model_cls, where=str(path))


class TrainConfig(BaseModel):
    """Local training of one site (one `train_local` call = `probe_steps` + `steps` DP-SGD steps).

    Privacy: `privacy_unit = "person"` samples people (Poisson, rate `sample_rate`) and one image of
    each; `"image"` samples images; `"none"` is non-private (no clipping, no noise), for baselines only.
    Noise: give `noise_multiplier`, or `target_epsilon` (the site's total epsilon after this call;
    the noise is calibrated to land on it).
    """

    model_config = ConfigDict(extra="forbid")

    privacy_unit: Literal["person", "image", "none"] = Field(
        "person", description="what epsilon protects: a whole person, one image, or nothing (baselines only)"
    )
    delta: float = Field(
        1e-5, gt=0, lt=1, description="DP delta; fixed per site for good by its accountant; below 1/people"
    )
    max_epsilon: float = Field(8.0, gt=0, description="site budget; training past it is refused")
    noise_multiplier: float | None = Field(None, ge=0, description="DP-SGD noise std / clip norm (sigma)")
    target_epsilon: float | None = Field(
        None, gt=0, description="calibrate the noise so this call ends at this epsilon (one-call training only)"
    )
    max_grad_norm: float = Field(1.0, gt=0, description="per-sample (per-person) gradient clip norm C")
    clipping: Literal["ghost", "hooks"] = Field(
        "ghost",
        description="Opacus per-sample clipping: ghost (norms only, two backward passes) or hooks (materialised)",
    )
    sample_rate: float = Field(0.1, gt=0, le=1, description="q: Poisson rate per person (or image)")
    steps: int = Field(100, ge=0, description="fine-tuning steps per call")
    probe_steps: int = Field(0, ge=0, description="head-only DP steps on frozen features, once per fresh head")
    lr: float = Field(0.05, gt=0, description="learning rate of the shared tail")
    head_lr: float = Field(1.0, gt=0, description="learning rate of the site-private margin head")
    probe_lr: float = Field(2.0, gt=0, description="learning rate of the probe steps (head only)")
    center_noise: float | None = Field(
        None,
        ge=0,
        description="DP mean centring of the embedding (client/training/centering.py), "
        "once per fresh head: noise multiplier of its Gaussian mechanism; unset = off",
    )
    center_clip: float = Field(
        5.0,
        gt=0,
        description="centring: clip norm of each unit's mean embedding before "
        "normalisation (the CASIA embedder's are about 3-5)",
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(0.0, ge=0, description="SGD weight decay")
    prox: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="per step, pull the tail this fraction of the way back "
        "to the weights the call started from (data-independent)",
    )
    train_from: str = Field("features", description=f"first trainable stage: one of {', '.join(STAGES)}")
    tune: Literal["all", "bias"] = Field(
        "all",
        description="fine-tune all tail parameters, or only their "
        "biases (DP-BiTFiT: far fewer dimensions for the noise)",
    )
    flip: bool = Field(True, description="train on a random horizontal flip of each sampled image")
    margin: float = Field(0.35, ge=0, lt=1, description="additive cosine margin of the head (CosFace)")
    scale: float = Field(32.0, gt=0, description="logit scale of the head")
    min_people: int = Field(2, ge=1, description="refuse sites with fewer people than this")
    pretrained: str | None = Field(None, description="base model file (default $FACEFED_PRETRAINED)")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.train_from not in STAGES:
            raise ValueError(f"train_from must be one of {', '.join(STAGES)}; got {self.train_from!r}")
        if self.privacy_unit != "none":
            if self.delta >= 1.0 / self.min_people:
                raise ValueError(
                    f"delta {self.delta:g} must be below 1/min_people = 1/{self.min_people} (every site has at "
                    "least min_people people, and delta must be below one over their number); "
                    "use a delta well below 1/people, e.g. 1e-5"
                )
            if (self.noise_multiplier is None) == (self.target_epsilon is None):
                raise ValueError("give exactly one of noise_multiplier and target_epsilon for DP training")
            if self.target_epsilon is not None and self.target_epsilon > self.max_epsilon:
                raise ValueError(f"target_epsilon {self.target_epsilon} is over max_epsilon {self.max_epsilon}")
            if self.center_noise == 0:
                raise ValueError(
                    "center_noise = 0 releases the mean without noise, which voids the guarantee; "
                    "give a noise multiplier > 0 or leave it unset"
                )
        return self

    def fresh_head_events(self) -> list[tuple[float, float, int]]:
        """Releases a call makes only for a fresh head, besides its DP-SGD steps, as accountant events
        (noise multiplier, sample rate, steps): the centring, one Gaussian release at rate 1 (the
        probe steps are DP-SGD steps at the call's noise and rate)."""
        if self.center_noise is None or self.privacy_unit == "none":
            return []
        return [(self.center_noise, 1.0, 1)]

    def check_people(self, n_people: int, n_images: int | None = None) -> None:
        """Checks that need the site's data: delta must be below 1/N for the unit, enough people."""
        if n_people < self.min_people:
            raise ValueError(
                f"the site has {n_people} people, fewer than min_people={self.min_people} "
                "needed for one batch; enrol more people or lower min_people"
            )
        n_units = n_images if self.privacy_unit == "image" and n_images is not None else n_people
        if self.center_noise is not None and self.privacy_unit != "none":
            # The released mean's noise has expected norm sigma * C * sqrt(d) / N; the true mean is at
            # most C. Past that the shift is mostly noise and would only hurt the model.
            noise = self.center_noise * self.center_clip * EMBEDDING_DIM**0.5 / max(1, n_units)
            if noise > self.center_clip:
                raise ValueError(
                    f"centring on {n_units} {self.privacy_unit}s would be mostly noise (expected noise "
                    f"norm {noise:.2f} > center_clip {self.center_clip:g}); it needs at least "
                    f"{math.ceil(self.center_noise * EMBEDDING_DIM**0.5)} {self.privacy_unit}s at "
                    f"center_noise {self.center_noise:g}: leave center_noise unset (for a federation, in the server's [train] table)"
                )
        if self.privacy_unit != "none" and self.delta >= 1.0 / n_units:
            raise ValueError(
                f"delta {self.delta:g} must be below 1/{n_units} (one over the number of "
                f"{self.privacy_unit}s at the site); lower delta"
            )
