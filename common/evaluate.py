"""The LFW verification protocol: accuracy with 10-fold cross-validated thresholds, ROC AUC, TAR@FAR.

- `pairs.txt` (View 2): its 10 official folds; for each fold the threshold is the one that maximises
  accuracy on the other 9 folds; we report mean and std of the 10 held-out accuracies.
- `pairsDevTest.txt` (View 1 test, people disjoint from `peopleDevTrain`): one list of 500 matched +
  500 mismatched pairs, split into 10 stratified folds (every 10th matched and every 10th mismatched
  pair) and treated the same way. Thresholds never come from `pairsDevTrain`, whose people train.
- ROC AUC over all pairs (Mann-Whitney statistic, ties count one half).
- TAR at FAR 1e-2 and 1e-3 over all pairs: the threshold is the smallest that accepts at most
  floor(FAR x impostors) impostor pairs; `n_impostor` says how many impostor pairs stand behind each
  figure (with 500 impostors, FAR 1e-3 means "no impostor accepted").
Scores are cosine similarities of unit embeddings; with `flip`, an image's embedding is the
normalised sum of the embeddings of the image and its mirror.

Preprocessing (`preprocess`): "aligned" (the default, as the field reports LFW) detects the face
nearest the centre of each 250x250 image and aligns it onto the ArcFace template
(`facefed.common.faces`); an image without a detection falls back to the fixed crop and is listed
in `EvalResult.fallbacks`. "fixed-crop" is the pre-alignment baseline (box 65, 60, 185, 190 of the
deep-funneled frame), kept for comparison. Development numbers come from pairsDevTest, the final
figure from View 2 `pairs.txt`.

`EvalCache` decodes the evaluation images once and runs the model's frozen prefix on them once, so
per-round evaluation in the federation runs only the trainable tail.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from facefed.common.faces.layouts import FIXED_CROP_FALLBACK
from facefed.common.lfw import LFW, ImageKey, Pair
from facefed.common.model.mobilefacenet import INPUT_SIZE, MobileFaceNet, prefix_fingerprint
from facefed.common.model.stages import STAGES
from facefed.common.preprocess import decode_faces, to_input

FARS = (1e-2, 1e-3)
PAIR_FILES = ("pairsDevTest.txt", "pairs.txt", "pairsDevTrain.txt")
PREPROCESS = ("aligned", "fixed-crop")


@dataclass(frozen=True)
class TarAtFar:
    far: float
    tar: float
    threshold: float
    n_impostor: int
    n_genuine: int
    impostors_accepted: int


@dataclass
class EvalResult:
    pairs_file: str
    n_pairs: int
    flip: bool
    accuracy_mean: float
    accuracy_std: float
    fold_accuracies: list[float]
    auc: float
    tar_at_far: dict[float, TarAtFar] = field(default_factory=dict)
    preprocess: str = "aligned"
    fallbacks: list[str] = field(default_factory=list)  # images that fell back to the fixed crop

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tar_at_far"] = {f"{far:g}": asdict(t) for far, t in self.tar_at_far.items()}
        return d

    def summary(self) -> str:
        tars = ", ".join(
            f"TAR@FAR={t.far:g} {100 * t.tar:.1f}% ({t.n_impostor} impostors)" for t in self.tar_at_far.values()
        )
        fell = f", {len(self.fallbacks)} image(s) with no face: fixed-crop fallback" if self.fallbacks else ""
        return (
            f"{self.pairs_file} ({self.preprocess}{fell}): accuracy {100 * self.accuracy_mean:.2f} ± "
            f"{100 * self.accuracy_std:.2f} % (10-fold CV), AUC {self.auc:.4f}, {tars}"
        )


# -- metrics from scores (pure functions, tested against scikit-learn) -----------------------------
def folds_of(pairs_folds: list[list[Pair]], n_folds: int = 10) -> list[int]:
    """Fold index of every pair (flattened): official folds if there are several, else stratified."""
    if len(pairs_folds) > 1:
        return [f for f, fold in enumerate(pairs_folds) for _ in fold]
    pairs = pairs_folds[0]
    out, seen = [], {True: 0, False: 0}
    for p in pairs:
        out.append(seen[p.same] % n_folds)
        seen[p.same] += 1
    return out


def best_threshold(scores: torch.Tensor, same: torch.Tensor) -> float:
    """Threshold (accept if score > t) that maximises accuracy; midpoint between adjacent scores."""
    s, order = torch.sort(scores.double())
    y = same[order].long()
    n = len(s)
    # accepting everything above position i: correct = impostors at or below i + genuines above i
    neg_below = torch.cumsum(1 - y, 0)
    pos_above = y.sum() - torch.cumsum(y, 0)
    correct = torch.cat([torch.tensor([int(y.sum())]), neg_below + pos_above])  # index 0: accept all
    i = int(torch.argmax(correct))
    if i == 0:
        return float(s[0]) - 1e-6
    if i == n:
        return float(s[-1]) + 1e-6
    return float((s[i - 1] + s[i]) / 2)


def cv_accuracy(scores: torch.Tensor, same: torch.Tensor, folds: list[int]) -> list[float]:
    folds_t = torch.tensor(folds)
    accs = []
    for f in sorted(set(folds)):
        test = folds_t == f
        t = best_threshold(scores[~test], same[~test])
        accs.append(float(((scores[test] > t) == same[test]).double().mean()))
    return accs


def roc_auc(scores: torch.Tensor, same: torch.Tensor) -> float:
    """P(score of a genuine pair > score of an impostor pair), ties 1/2 (average ranks)."""
    s = scores.double()
    order = torch.argsort(s)
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.float64)
    # average ranks over ties
    uniq, inv = torch.unique(s, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, ranks)
    cnts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, torch.ones_like(ranks))
    ranks = (sums / cnts)[inv]
    pos = same.bool()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def tar_at_far(scores: torch.Tensor, same: torch.Tensor, far: float) -> TarAtFar:
    pos, neg = scores[same.bool()].double(), scores[~same.bool()].double()
    allowed = int(math.floor(far * len(neg)))
    neg_sorted = torch.sort(neg, descending=True).values
    # accept score > threshold: at most `allowed` impostors are strictly above neg_sorted[allowed]
    threshold = float(neg_sorted[allowed]) if allowed < len(neg) else -math.inf
    accepted = int((neg > threshold).sum())
    return TarAtFar(far, float((pos > threshold).double().mean()), threshold, len(neg), len(pos), accepted)


def roc_curve(scores: torch.Tensor, same: torch.Tensor) -> list[tuple[float, float]]:
    """(FAR, TAR) at every distinct score threshold, from (0, 0) to (1, 1): the ROC the report plots."""
    order = torch.argsort(scores.double(), descending=True)
    s, y = scores.double()[order], same.bool()[order]
    tp = torch.cumsum(y.double(), 0)
    fp = torch.cumsum((~y).double(), 0)
    last = torch.ones(len(s), dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]  # one point per distinct threshold
    n_pos, n_neg = max(1.0, float(tp[-1])), max(1.0, float(fp[-1]))
    pts = [(0.0, 0.0)] + [(float(f) / n_neg, float(t) / n_pos) for f, t in zip(fp[last], tp[last], strict=True)]
    return pts


def metrics_from_scores(
    scores: torch.Tensor, same: torch.Tensor, folds: list[int], *, pairs_file: str, flip: bool
) -> EvalResult:
    accs = cv_accuracy(scores, same, folds)
    mean = sum(accs) / len(accs)
    std = math.sqrt(sum((a - mean) ** 2 for a in accs) / len(accs))
    return EvalResult(
        pairs_file,
        len(scores),
        flip,
        mean,
        std,
        accs,
        roc_auc(scores, same),
        {far: tar_at_far(scores, same, far) for far in FARS},
    )


# -- which pairs -------------------------------------------------------------------------------
def select_pairs(
    lfw: LFW,
    pairs_file: str,
    *,
    unseen: bool = False,
    without: Collection[str] = (),
    max_pairs: int | None = None,
) -> list[list[Pair]]:
    """The pairs an evaluation uses, in their official folds. `unseen` keeps only the pairs with no
    person LFW-built sites train on (`LFW.trainable_people`): the honest test of a model fine-tuned on
    them with View 2's `pairs.txt` (pairsDevTest's people are disjoint already). `without` drops the
    pairs holding any of these people (validation pairs kept apart from the test pairs' people).
    `max_pairs` then keeps a balanced subset (first matched and mismatched of each fold): a quick look
    for tests and smoke runs, not the protocol."""
    drop = set(without) | (set(lfw.trainable_people()) if unseen else set())
    folds = [[p for p in fold if p.a.name not in drop and p.b.name not in drop] for fold in lfw.pairs(pairs_file)]
    if max_pairs is not None:
        if max_pairs < 20:
            raise ValueError(f"max_pairs must be >= 20 (10 folds of a matched and a mismatched pair), got {max_pairs}")
        k = max_pairs // (2 * len(folds))
        folds = [[p for p in fold if p.same][:k] + [p for p in fold if not p.same][:k] for fold in folds]
    return folds


def people_of(folds: list[list[Pair]]) -> set[str]:
    return {name for fold in folds for p in fold for name in (p.a.name, p.b.name)}


def pairs_label(pairs_file: str, *, unseen: bool = False, without_test_people: bool = False) -> str:
    """How results name their pairs, e.g. "pairs.txt, unseen people"."""
    unseen_text = ", unseen people" if unseen else ""
    return pairs_file + unseen_text + (", without the test pairs' people" if without_test_people else "")


# -- embeddings --------------------------------------------------------------------------------
class EvalCache:
    """Decoded evaluation images and frozen-prefix features, computed once, reused per evaluation.

    Memory: 2 x 25 KB per image with `train_from = conv_5` (about 80 MB for pairsDevTest's 1,549
    images); when everything trains, only the uint8 images (37 KB each) are kept.
    """

    def __init__(
        self,
        lfw: LFW,
        pairs_file: str = "pairsDevTest.txt",
        *,
        flip: bool = True,
        threads: int = 2,
        max_pairs: int | None = None,
        preprocess: str = "aligned",
        device: str | torch.device = "cpu",
        backend: str | None = None,
        unseen: bool = False,
        without: Collection[str] = (),
    ):
        """The pairs are `select_pairs(lfw, pairs_file, unseen=, without=, max_pairs=)`.
        `preprocess`: "aligned" or "fixed-crop";
        `backend`: the face detector for "aligned" (default $FACEFED_ALIGNER or dlib).
        `device` runs the model there (auto: cuda when available); images and features stay on the CPU."""
        from facefed.common.device import resolve_device

        self.device = resolve_device(device)
        if pairs_file not in PAIR_FILES:
            raise ValueError(f"pairs file must be one of {', '.join(PAIR_FILES)}, got {pairs_file!r}")
        if preprocess not in PREPROCESS:
            raise ValueError(f"preprocess must be one of {', '.join(PREPROCESS)}, got {preprocess!r}")
        self.pairs_file, self.flip, self.preprocess, self.unseen = pairs_file, flip, preprocess, unseen
        self.pair_folds = select_pairs(lfw, pairs_file, unseen=unseen, without=without, max_pairs=max_pairs)
        self.label = pairs_label(pairs_file, unseen=unseen, without_test_people=bool(without))
        self.pairs = [p for fold in self.pair_folds for p in fold]
        self.keys: list[ImageKey] = sorted({k for p in self.pairs for k in (p.a, p.b)})
        self.index = {k: i for i, k in enumerate(self.keys)}
        data = lfw.load_images(self.keys)
        self.fallbacks: list[str] = []
        if preprocess == "fixed-crop":
            self.images = decode_faces([data[k] for k in self.keys], threads=threads, crop=FIXED_CROP_FALLBACK)
        else:
            self.images = self._aligned(data, backend)
        self.folds = folds_of(self.pair_folds)
        self.same = torch.tensor([p.same for p in self.pairs])
        self.ia = torch.tensor([self.index[p.a] for p in self.pairs])
        self.ib = torch.tensor([self.index[p.b] for p in self.pairs])
        self._feats: tuple[str, torch.Tensor] | None = None

    def _aligned(self, data: dict[ImageKey, bytes], backend: str | None) -> torch.Tensor:
        from facefed.common.faces.lfw import align_public

        out = torch.empty((len(self.keys), 3, INPUT_SIZE, INPUT_SIZE), dtype=torch.uint8)
        for key, image, face in align_public(((k, data[k]) for k in self.keys), backend=backend):
            if face is None:  # no detection: the fixed crop of the deep-funneled frame, reported
                face = image.crop(FIXED_CROP_FALLBACK).resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR)
                self.fallbacks.append(key.relpath)
            out[self.index[key]] = torch.from_numpy(np.asarray(face, np.uint8).copy()).permute(2, 0, 1)
        return out

    @torch.no_grad()
    def _features(self, model: MobileFaceNet, batch_size: int = 64) -> torch.Tensor | None:
        if model.train_from == STAGES[0]:
            return None
        key = prefix_fingerprint(model)
        if self._feats is None or self._feats[0] != key:
            self._feats = None
            views = 2 if self.flip else 1
            out: torch.Tensor | None = None
            model.to(self.device)
            for i in range(0, len(self.images), batch_size):
                x = to_input(self.images[i : i + batch_size]).to(self.device)
                both = [model.forward_prefix(x)] + ([model.forward_prefix(x.flip(3))] if self.flip else [])
                f = torch.stack(both, 1).cpu()
                if out is None:
                    out = torch.empty((len(self.images), views, *f.shape[2:]))
                out[i : i + len(f)] = f
            if out is None:  # no images
                return None
            self._feats = (key, out)
        return self._feats[1]

    @torch.no_grad()
    def embeddings(self, model: MobileFaceNet, batch_size: int = 128) -> torch.Tensor:
        """(N, 128) unit embeddings of the evaluation images (flip-averaged if `flip`)."""
        was_training = model.training
        model.eval().to(self.device)
        feats = self._features(model)
        out = []
        for i in range(0, len(self.images), batch_size):
            if feats is not None:
                f = feats[i : i + batch_size].to(self.device)
                e = model.forward_tail(f.flatten(0, 1)).view(len(f), f.shape[1], -1).sum(1)
            else:
                x = to_input(self.images[i : i + batch_size]).to(self.device)
                e = model(x) + (model(x.flip(3)) if self.flip else 0)
            out.append(F.normalize(e, dim=1).cpu())
        model.train(was_training)
        return torch.cat(out)

    def scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        return (embeddings[self.ia] * embeddings[self.ib]).sum(1)

    def _result(self, scores: torch.Tensor) -> EvalResult:
        r = metrics_from_scores(scores, self.same, self.folds, pairs_file=self.label, flip=self.flip)
        r.preprocess, r.fallbacks = self.preprocess, list(self.fallbacks)
        return r

    def evaluate(self, model: MobileFaceNet) -> EvalResult:
        return self._result(self.scores(self.embeddings(model)))

    def evaluate_ensemble(self, models: list[MobileFaceNet]) -> EvalResult:
        """SISA shard models as one embedder: the normalised concatenation of their embeddings, whose
        cosine is the mean of the shard cosines (common/shards.py)."""
        from facefed.common.shards import concat_embeddings

        emb = concat_embeddings([self.embeddings(m) for m in models])
        return self._result(self.scores(emb))


def evaluate_lfw(
    model: MobileFaceNet,
    lfw: LFW,
    pairs_file: str = "pairsDevTest.txt",
    flip: bool = True,
    *,
    cache: EvalCache | None = None,
    preprocess: str = "aligned",
) -> EvalResult:
    """Run the LFW protocol on `pairs_file` (use an EvalCache to evaluate several models cheaply)."""
    if cache is None:
        cache = EvalCache(lfw, pairs_file, flip=flip, preprocess=preprocess)
    elif cache.pairs_file != pairs_file or cache.flip != flip or cache.preprocess != preprocess:
        raise ValueError(
            f"the cache holds {cache.pairs_file} (flip={cache.flip}, {cache.preprocess}), "
            f"not {pairs_file} (flip={flip}, {preprocess})"
        )
    return cache.evaluate(model)
