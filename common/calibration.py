"""What a checkpoint says about how to use it: its decision threshold, its preprocessing, its provenance.

- Threshold: the cosine above which two faces are declared the same person, chosen at a stated false
  accept rate (FAR 1e-3) on validation pairs DISJOINT from the test pairs: LFW `pairsDevTrain.txt`,
  whose people are disjoint from `pairsDevTest.txt`'s (the test figures stay unbiased). It is the
  smallest threshold that accepts at most floor(FAR x impostors) impostor pairs (common/evaluate.py
  `tar_at_far`); `n_impostor` says how many impostor pairs it rests on (with fewer than 1/FAR
  impostors it only means "no validation impostor accepted"). Caveat: in the LFW simulation the
  sites enrol peopleDevTrain, so the validation people may be training people; the threshold is then
  on the strict side for them, not for strangers. Stored under `meta["threshold"]`.
- Validation score: the same pass over the validation pairs gives their 10-fold CV accuracy and AUC
  (`validate`), by which the server picks each run's best checkpoint (server/ledger/best.py); the
  test pairs never choose a model.
- Preprocessing: the layout the model expects (an aligned 112 face, the centre of the 224 canonical
  crop), the aligner backend, the input scaling, flip averaging. Stored under `meta["preprocessing"]`.
- Provenance: run id, round, parent and base sha256, sites with their epsilon/delta, facefed version.
  Stored under `meta["provenance"]`.

Only `calibrate` and `validate` need torch; the records and `preprocessing()` are plain data.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from facefed.common.errors import FacefedError

if TYPE_CHECKING:
    from facefed.common.evaluate import EvalCache, EvalResult
    from facefed.common.model.mobilefacenet import MobileFaceNet

# People disjoint from pairsDevTest's; the server drops the pairs holding people of other test pairs.
VALIDATION_PAIRS = "pairsDevTrain.txt"
VALIDATION_MIN_IMPOSTORS = 300  # fewer impostor pairs apart from the test pairs' people: keep them all, labelled
DEFAULT_FAR = 1e-3
# The server calibrates on a balanced subset of pairsDevTrain's 2,200 pairs: 500 genuine + 500 impostor
# (about 1,600 images to align once per process instead of 3,443). At FAR 1e-3 that means "no
# validation impostor of 500 accepted"; every stored threshold names its pair and impostor counts.
VALIDATION_MAX_PAIRS = 1000
LAYOUT = "aligned-112 from canonical-224"
NORMALISATION = "RGB x/127.5 - 1 (== (x/255 - 0.5) / 0.5)"


class NoThreshold(FacefedError, ValueError):
    """A model without a decision threshold was asked to decide same / different."""


@dataclass(frozen=True)
class Threshold:
    """A decision threshold (accept when cosine > threshold) and what it rests on."""

    threshold: float
    far: float | None  # None: given by hand, not calibrated
    n_impostor: int = 0
    impostors_accepted: int = 0
    n_genuine: int = 0
    tar: float | None = None  # genuine pairs accepted at this threshold (validation)
    validation: str = "given"  # e.g. "lfw/pairsDevTrain.txt (aligned, flip, 2200 pairs)"
    n_pairs: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Threshold:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)

    @classmethod
    def given(cls, value: float) -> Threshold:
        if not math.isfinite(value) or not -1.0 <= value <= 1.0:
            raise NoThreshold(f"threshold must be a cosine in [-1, 1], got {value}")
        return cls(float(value), None)

    def describe(self) -> str:
        if self.far is None:
            return f"{self.threshold:.4f} (given)"
        return (
            f"{self.threshold:.4f} at FAR {self.far:g} on {self.validation} "
            f"({self.n_impostor} impostor pairs, {self.impostors_accepted} accepted)"
        )


def preprocessing(backend: str | None = None, *, flip: bool = True) -> dict[str, Any]:
    """The preprocessing this code applies (what a checkpoint's embeddings assume)."""
    import os

    from facefed.common.faces.detect import BACKENDS, DEFAULT_BACKEND

    name = backend or os.environ.get("FACEFED_ALIGNER") or DEFAULT_BACKEND
    factory = BACKENDS.get(name)
    return {
        "layout": LAYOUT,
        "aligner": str(getattr(factory, "name", name)),
        "input": "RGB 112x112",
        "normalisation": NORMALISATION,
        "flip_average": flip,
    }


def provenance(
    *,
    run_id: str | None = None,
    round: int | None = None,
    parent_sha256: str | None = None,
    base_sha256: str | None = None,
    sites: dict[str, dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Where a checkpoint comes from; `sites`: name -> {"epsilon", "delta"} where known."""
    from facefed import __version__

    return {
        "run_id": run_id,
        "round": round,
        "parent_sha256": parent_sha256,
        "base_sha256": base_sha256,
        "sites": dict(sorted((sites or {}).items())),
        "facefed_version": __version__,
    }


def calibrate(model: MobileFaceNet, cache: EvalCache, far: float = DEFAULT_FAR) -> Threshold:
    """The threshold at `far` on the validation pairs `cache` holds (flip-averaged as the cache says)."""
    return validate(model, cache, far)[0]


def validate(model: MobileFaceNet, cache: EvalCache, far: float = DEFAULT_FAR) -> tuple[Threshold, EvalResult]:
    """One pass over the validation pairs: the decision threshold at `far` and the validation result
    (10-fold CV accuracy, AUC) that the server selects its best checkpoint by (never the test pairs)."""
    from facefed.common.evaluate import metrics_from_scores, tar_at_far

    if cache.pairs_file != VALIDATION_PAIRS:
        raise ValueError(f"calibrate on {VALIDATION_PAIRS} (apart from the test pairs), not {cache.pairs_file}")
    scores = cache.scores(cache.embeddings(model))
    t = tar_at_far(scores, cache.same, far)
    name = f"lfw/{cache.label} ({cache.preprocess}{', flip' if cache.flip else ''}, {len(scores)} pairs)"
    threshold = Threshold(
        threshold=t.threshold,
        far=far,
        n_impostor=t.n_impostor,
        impostors_accepted=t.impostors_accepted,
        n_genuine=t.n_genuine,
        tar=t.tar,
        validation=name,
        n_pairs=len(scores),
    )
    return threshold, metrics_from_scores(scores, cache.same, cache.folds, pairs_file=cache.label, flip=cache.flip)


def stored_threshold(meta: dict[str, Any]) -> Threshold | None:
    """The checkpoint's threshold, if it has one."""
    d = meta.get("threshold")
    return Threshold.from_dict(d) if isinstance(d, dict) and "threshold" in d else None
