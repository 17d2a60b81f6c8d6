"""Data for bench/train.py: LFW training faces and frozen-prefix features, cached under bench-out/.

The frozen prefix of the pretrained model runs once per image and its mirror; its outputs are kept
in bench-out/cache (git-ignored, public LFW data only) keyed by the prefix weights and the image list,
so repeated benchmark runs and hyper-parameter searches skip the expensive part.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch

from client.faces import SiteFaces, faces_from_lfw
from client.trainer import prefix_features
from common.evaluate import EvalCache
from common.lfw import LFW
from common.model import MobileFaceNet, prefix_fingerprint

CACHE = Path(__file__).resolve().parent.parent / "bench-out" / "cache"


def train_people(lfw: LFW, min_images: int = 2) -> list[str]:
    counts = lfw.counts()
    return [n for n in lfw.people("peopleDevTrain.txt") if counts[n] >= min_images]


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


def load_faces(lfw: LFW, names: list[str], model: MobileFaceNet, log=print) -> SiteFaces:
    t = time.perf_counter()
    faces = faces_from_lfw(lfw, names)
    log(f"  decoded {faces.n_images} images of {faces.n_people} people in {time.perf_counter() - t:.0f} s")
    if model.train_from != "conv1":
        key = hashlib.sha256((prefix_fingerprint(model) + "\n".join(faces.image_ids)).encode()).hexdigest()[:24]
        feats = _cached(f"train-{key}", lambda: prefix_features(model, faces.images), "training prefix features", log)
        faces.cache[("prefix", prefix_fingerprint(model))] = feats
    return faces


def load_eval(lfw: LFW, model: MobileFaceNet, pairs_file: str = "pairsDevTest.txt", log=print) -> EvalCache:
    cache = EvalCache(lfw, pairs_file, flip=True)
    if model.train_from != "conv1":
        fp = prefix_fingerprint(model)
        key = hashlib.sha256((fp + pairs_file).encode()).hexdigest()[:24]
        feats = _cached(f"eval-{key}", lambda: cache._features(model), f"{pairs_file} prefix features", log)
        cache._feats = (fp, feats)
    return cache
