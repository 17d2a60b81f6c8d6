"""Data for bench/train.py: LFW training faces and frozen-prefix features, cached under bench-out/.

The frozen prefix of the pretrained model runs once per image and its mirror; its outputs are kept
in bench-out/cache (git-ignored, public LFW data only) keyed by the prefix weights and the image list,
so repeated benchmark runs and hyper-parameter searches skip the expensive part. Training images are
detected and aligned into the vault's canonical crop (`faces_from_lfw`; images with no detected face
are skipped and counted), and evaluation is aligned (common/evaluate.py), so the cache keys name the
preprocessing.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch

from facefed.client.training.faces import SiteFaces, faces_from_lfw
from facefed.client.training.trainer import prefix_features
from facefed.common.evaluate import EvalCache
from facefed.common.lfw import LFW
from facefed.common.model.mobilefacenet import STAGES, MobileFaceNet, build_embedder, prefix_fingerprint

CACHE = Path(__file__).resolve().parent.parent / "bench-out" / "cache"
PREPROCESS = "aligned:dlib-canonical"  # part of the cache keys: fixed-crop features must never be reused


def _cached(key: str, compute, what: str, log=print):
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{key}.pt"
    if path.exists():
        return torch.load(path, weights_only=True).float()
    t = time.perf_counter()
    value = compute()
    tmp = path.with_suffix(".tmp")
    torch.save(value.half(), tmp)  # fp16 halves the disk and RAM; relative error ~1e-3
    tmp.rename(path)
    log(f"  computed {what} in {time.perf_counter() - t:.0f} s (cached in {path.name})")
    return value.half().float()


@torch.no_grad()
def derive(model: MobileFaceNet, feats: torch.Tensor, stage: str) -> torch.Tensor:
    """Features entering `stage`, from features entering `model.train_from` (an earlier stage)."""
    first, last = STAGES.index(model.train_from), STAGES.index(stage)
    flat, out = feats.flatten(0, 1), []
    for i in range(0, len(flat), 1024):
        x = flat[i : i + 1024]
        for name in STAGES[first:last]:
            x = model._run_stage(name, x)
        out.append(x)
    return torch.cat(out).view(*feats.shape[:2], *out[0].shape[1:])


def load_faces(lfw: LFW, names: list[str], pretrained, stages=("conv_5", "features"), log=print) -> SiteFaces:
    """Faces of `names` with frozen-prefix features for each `train_from` in `stages` (the first is
    computed once and cached on disk, the later ones derived from it in memory)."""
    t = time.perf_counter()
    faces = faces_from_lfw(lfw, names)
    log(
        f"  aligned {faces.n_images} images of {faces.n_people} people in {time.perf_counter() - t:.0f} s; "
        f"{len(faces.skipped)} image(s) with no detected face skipped"
    )
    model = build_embedder(pretrained, train_from=stages[0])
    key = "\n".join([PREPROCESS, prefix_fingerprint(model), *faces.image_ids])
    key = hashlib.sha256(key.encode()).hexdigest()[:24]
    feats = _cached(f"train-{key}", lambda: prefix_features(model, faces.images), "training prefix features", log)
    for stage in stages:
        faces.cache[("prefix", prefix_fingerprint(build_embedder(pretrained, train_from=stage)))] = (
            feats if stage == stages[0] else derive(model, feats, stage)
        )
    return faces


class MultiEvalCache(EvalCache):
    """An EvalCache holding prefix features for several `train_from` stages of the same pretrained model."""

    def _features(self, model: MobileFaceNet, batch_size: int = 64):
        fp = prefix_fingerprint(model)
        if fp in self.by_prefix:
            return self.by_prefix[fp]
        return super()._features(model, batch_size)


def load_eval(
    lfw: LFW,
    pretrained,
    pairs_file: str = "pairsDevTest.txt",
    stages=("conv_5", "features"),
    log=print,
    *,
    unseen: bool = False,
) -> EvalCache:
    """`unseen`: only the pairs with no training person (EvalCache)."""
    cache = MultiEvalCache(lfw, pairs_file, flip=True, unseen=unseen)
    cache.by_prefix = {}
    model = build_embedder(pretrained, train_from=stages[0])
    key = "\n".join([PREPROCESS, prefix_fingerprint(model), cache.label])
    key = hashlib.sha256(key.encode()).hexdigest()[:24]
    feats = _cached(f"eval-{key}", lambda: cache._features(model), f"{cache.label} prefix features", log)
    if unseen:
        log(f"  {cache.label}: {len(cache.pairs)} pairs with no training person in them")
    if cache.fallbacks:
        log(f"  {cache.label}: {len(cache.fallbacks)} image(s) with no detected face scored through the fixed crop")
    cache.by_prefix = {
        prefix_fingerprint(build_embedder(pretrained, train_from=s)): feats
        if s == stages[0]
        else derive(model, feats, s)
        for s in stages
    }
    return cache
