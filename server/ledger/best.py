"""Which checkpoint a run serves: the best one on the validation pairs, never on the test pairs.

Each evaluated round (and the base model, round 0, when it is evaluated) is scored on LFW
`pairsDevTrain` (people disjoint from the test pairs; the pass that picks the decision threshold,
common/calibration.py `validate`) and the scores go into the round's metrics: `val_accuracy`,
`val_accuracy_std`, `val_auc`, `val_pairs`. The test pairs' numbers (`lfw_*`) are reported, never
used to choose.

The score is (`val_auc`, `val_accuracy`), compared in that order. Near LFW's ceiling the 10-fold CV
accuracy of the validation subset (up to 1,000 pairs: steps of 0.1 %) moves by single pairs and by
each fold's threshold choice: in the demo a DP round that raised the test pairs' accuracy by 0.24
points and both AUCs (test 0.9979 -> 0.9985, validation 0.9988 -> 0.9995) lowered the validation
accuracy by 3 pairs. The AUC is threshold-free and uses every pair's score, so it ranks models the way
the test pairs do; the accuracy breaks AUC ties. An exact tie goes to the newer checkpoint: the served
model moves on with training unless validation says the new round is worse.

Candidates are the live (not deleted) checkpoints on the run's lineage that were scored: its
evaluated rounds, its base model if evaluated, and for an unlearning replay the rollback checkpoint
and its ancestors (a replay's lineage never holds a tainted checkpoint). Rounds that were not
evaluated are not candidates; when no checkpoint on the lineage was scored (evaluation off, or a
ledger from before validation scores), the best is the latest. The ledger keeps the result in
`runs.best_checkpoint` (server/ledger/db.py) and `current` serves it (server/ledger/models.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

VAL_ACCURACY, VAL_AUC = "val_accuracy", "val_auc"
Score = tuple[float, float]


def score(metrics: dict[str, Any] | None) -> Score | None:
    """The validation score of a round's (or a base model's) metrics; None if it was not scored."""
    if not metrics or metrics.get(VAL_ACCURACY) is None:
        return None
    auc = metrics.get(VAL_AUC)
    # Rounded to what the operator reads (4 AUC decimals and 0.01 %): a difference nobody can see is a
    # tie, which goes to the newer checkpoint, never a "made the model worse" line with equal numbers.
    return round(float(auc), 4) if auc is not None and auc == auc else 0.0, round(float(metrics[VAL_ACCURACY]), 4)


def score_text(s: Score) -> str:
    """`AUC 0.9988, 98.80 %`: a score as the operator reads it."""
    return f"AUC {s[0]:.4f}, {100 * s[1]:.2f} %"


@dataclass(frozen=True)
class Worse:
    """A committed round whose validation score is below the best checkpoint before it."""

    round: int
    score: Score
    best_checkpoint: str
    best_score: Score

    def line(self) -> str:
        """`round 3 made the model worse on validation (AUC 0.9990, 98.40 % -> AUC 0.9981, 98.10 %); the
        served model stays X`."""
        change = f"{score_text(self.best_score)} -> {score_text(self.score)}"
        return (
            f"round {self.round} made the model worse on validation ({change}); "
            f"the served model stays {self.best_checkpoint}"
        )
