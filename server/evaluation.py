"""LFW verification of the global model (pairs disjoint from every site's people), per round and for
a sharded job's ensemble, and its validation score on pairsDevTrain (the decision threshold's pairs,
without the test pairs' people), by which the ledger picks the best checkpoint
(server/ledger/best.py). The archive is read and the images decoded once per ServerApp process;
each evaluation then runs only the trainable tail.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from facefed.common.durable import atomic_write_bytes
from facefed.common.fedconfig import FederationConfig
from facefed.common.model.mobilefacenet import MobileFaceNet
from facefed.server.ledger.best import VAL_ACCURACY, VAL_AUC
from facefed.server.ledger.checkpoints import CheckpointStore
from facefed.server.ledger.db import Ledger

if TYPE_CHECKING:
    from facefed.common.calibration import Threshold
    from facefed.common.lfw import LFW

EvalFn = Callable[[MobileFaceNet], dict[str, float]]
ValidateFn = Callable[[MobileFaceNet], tuple["Threshold", dict[str, float]]]
PROTOCOL_FLIP = True  # the protocol of `facefed-server evaluate`: one number per model, wherever shown


class Evaluator:
    """LFW verification of the global model. The archive is read and the evaluation images decoded once
    per ServerApp process (`EvalCache`); each round then runs only the trainable tail.

    `validate` picks the checkpoint's decision threshold at FAR 1e-3 on pairsDevTrain without the
    pairs holding a person of the test pairs (common/calibration.py; pairsDevTest's people are apart
    already, View 2's unseen pairs share 671 people with it: 905 of its 1,000 pairs stay; all of View 2
    would leave too few, so then they are kept and the label says so), flip-averaged as `facefed.load` embeds, and
    from the same embeddings its validation score (`val_accuracy`, `val_auc`, ...: the metrics the
    best checkpoint is chosen by). It uses VALIDATION_MAX_PAIRS of them (500 impostor pairs), or
    `max_pairs` (smoke runs) if fewer; the stored threshold says how many it rests on.
    Its images are aligned once per process (and their landmarks cached across processes)."""

    def __init__(self, lfw_path: str | None, pairs: str, max_pairs: int | None = None, unseen: bool = False):
        self.lfw_path, self.pairs, self.max_pairs, self.unseen = lfw_path, pairs, max_pairs, unseen
        self._cache: Any = None
        self._validation: Any = None
        self.last_roc: dict[str, Any] | None = None  # the last evaluation's ROC (saved beside the checkpoint)

    def validate(self, model: MobileFaceNet) -> tuple[Threshold, dict[str, float]]:
        from facefed.common.calibration import VALIDATION_MAX_PAIRS, VALIDATION_PAIRS, validate
        from facefed.common.evaluate import EvalCache
        from facefed.common.lfw import LFW

        t = time.monotonic()
        if self._validation is None:
            lfw = LFW(self.lfw_path)
            n = min(VALIDATION_MAX_PAIRS, self.max_pairs or VALIDATION_MAX_PAIRS)
            drop, shared = validation_apart(lfw, self.pairs, unseen=self.unseen, max_pairs=self.max_pairs)
            self._validation = EvalCache(lfw, VALIDATION_PAIRS, flip=PROTOCOL_FLIP, max_pairs=n, without=drop)
            if shared and not drop:
                self._validation.label += f", sharing {shared} people with the test pairs"
        threshold, res = validate(model, self._validation)
        return threshold, {
            VAL_ACCURACY: float(res.accuracy_mean),
            "val_accuracy_std": float(res.accuracy_std),
            VAL_AUC: float(res.auc),
            "val_pairs": float(res.n_pairs),
            "val_s": time.monotonic() - t,
        }

    def __call__(self, model: MobileFaceNet) -> dict[str, float]:
        from facefed.common.evaluate import (
            EvalCache,  # heavy imports only when evaluating
            metrics_from_scores,
            roc_curve,
        )
        from facefed.common.lfw import LFW

        t = time.monotonic()
        if self._cache is None:
            self._cache = EvalCache(
                LFW(self.lfw_path), self.pairs, flip=PROTOCOL_FLIP, max_pairs=self.max_pairs, unseen=self.unseen
            )
        c = self._cache
        scores = c.scores(c.embeddings(model))
        res = metrics_from_scores(scores, c.same, c.folds, pairs_file=c.pairs_file, flip=c.flip)
        self.last_roc = {
            "pairs": c.label,
            "n_pairs": res.n_pairs,
            "flip": c.flip,
            "accuracy": res.accuracy_mean,
            "auc": res.auc,
            "roc": roc_curve(scores, c.same),
        }
        return {
            "lfw_accuracy": float(res.accuracy_mean),
            "lfw_accuracy_std": float(res.accuracy_std),
            "lfw_auc": float(res.auc),
            "lfw_pairs": float(res.n_pairs),
            "eval_s": time.monotonic() - t,
        }


def validation_apart(lfw: LFW, pairs: str, *, unseen: bool, max_pairs: int | None) -> tuple[set[str], int]:
    """The test pairs' people to drop from the validation pairs, and how many people the two share. None
    are dropped when fewer than VALIDATION_MIN_IMPOSTORS impostor pairs would stay (all of View 2 holds
    nearly every LFW person): the validation then says how many people it shares with the test."""
    from facefed.common.calibration import VALIDATION_MIN_IMPOSTORS, VALIDATION_PAIRS
    from facefed.common.evaluate import people_of, select_pairs

    test_people = people_of(select_pairs(lfw, pairs, unseen=unseen, max_pairs=max_pairs))
    shared = len(test_people & people_of(lfw.pairs(VALIDATION_PAIRS)))
    apart = select_pairs(lfw, VALIDATION_PAIRS, without=test_people)
    if sum(not p.same for fold in apart for p in fold) < VALIDATION_MIN_IMPOSTORS:
        return set(), shared
    return test_people, shared


class Evaluators:
    """The evaluator a run's configuration asks for (None: no evaluation), one per evaluation setting
    per process, so the replays of a process share the decoded images. `injected` (tests) wins."""

    def __init__(self, lfw: str | None, injected: EvalFn | None = None):
        self.lfw, self.injected = lfw, injected
        self._made: dict[tuple[str, int | None, bool], Evaluator] = {}

    def for_config(self, cfg: FederationConfig) -> EvalFn | None:
        if self.injected is not None:
            return self.injected
        ev = cfg.evaluate
        if not ev.every:
            return None
        key = (ev.pairs, ev.max_pairs, ev.unseen)
        if key not in self._made:
            self._made[key] = Evaluator(self.lfw, ev.pairs, ev.max_pairs, ev.unseen)
        return self._made[key]

    def validator_for(self, cfg: FederationConfig) -> ValidateFn | None:
        """The validation (decision threshold and validation score) that goes with the run's evaluation
        (None: no evaluation, or an injected evaluator that cannot validate)."""
        evaluator = self.for_config(cfg)
        validate = getattr(evaluator, "validate", None)
        return validate if callable(validate) else None

    def due(self, cfg: FederationConfig, rnd: int) -> bool:
        """Whether round `rnd` is evaluated (every N rounds, always the last; round 0 = the base model)."""
        every = cfg.evaluate.every
        return every > 0 and (rnd % every == 0 or rnd == cfg.rounds)


def save_roc(evaluator: object, checkpoint_path: str) -> None:
    """The ROC of the evaluation just made, beside its checkpoint (`r0003.roc.json`), for `report`."""
    roc = getattr(evaluator, "last_roc", None)
    if roc is None:
        return
    atomic_write_bytes(roc_path(checkpoint_path), json.dumps(roc).encode())


def roc_path(checkpoint_path: str) -> Path:
    return Path(checkpoint_path).with_suffix(".roc.json")


def evaluate_ensemble(
    ledger: Ledger,
    store: CheckpointStore,
    evaluators: Evaluators,
    cfg: FederationConfig,
    family: str,
    log: Callable[[str], None] = print,
) -> None:
    """A sharded job's ensemble (the mean of its shard models' embeddings), recorded in the ledger,
    once every shard has committed a round. The shard models are each shard's best checkpoint on the
    validation pairs: what `current` serves (server/ledger/models.py)."""
    runs = [ledger.live_run(family, k) for k in range(cfg.shards)]
    if evaluators.for_config(cfg) is None:
        return
    live = [r for r in runs if r is not None and ledger.head(r.run_id)[0] != 0]
    if len(live) != len(runs):
        return
    from facefed.common.evaluate import EvalCache
    from facefed.common.lfw import LFW

    heads = [ledger.best(r.run_id) or ledger.head(r.run_id)[1] for r in live]
    ev = cfg.evaluate
    cache = EvalCache(LFW(evaluators.lfw), ev.pairs, flip=PROTOCOL_FLIP, max_pairs=ev.max_pairs, unseen=ev.unseen)
    res = cache.evaluate_ensemble([store.load(h)[0] for h in heads])
    metrics = {
        "lfw_accuracy": float(res.accuracy_mean),
        "lfw_accuracy_std": float(res.accuracy_std),
        "lfw_auc": float(res.auc),
        "lfw_pairs": float(res.n_pairs),
    }
    ledger.record_ensemble(family, [h.checkpoint_id for h in heads], metrics)
    log(f"[facefed] {len(heads)}-shard ensemble of {family}: LFW accuracy {metrics['lfw_accuracy']:.4f}")
