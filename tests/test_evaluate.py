"""The LFW protocol against independent computations from the same real embeddings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from facefed.common.evaluate import EvalCache, cv_accuracy, evaluate_lfw, folds_of, metrics_from_scores
from facefed.common.model.mobilefacenet import build_embedder, load_shared_state, shared_state
from facefed.common.preprocess import to_input


@pytest.fixture(scope="module")
def cache(lfw):
    return EvalCache(lfw, "pairsDevTest.txt", max_pairs=120)


@pytest.fixture(scope="module")
def model(pretrained_file):
    return build_embedder(pretrained_file)


def _independent_cv(scores: np.ndarray, same: np.ndarray, folds: np.ndarray) -> list[float]:
    """Brute force: every candidate threshold (the midpoints between adjacent training scores and both
    ends, accept >, the lowest on ties: the protocol's choice) on the 9 training folds."""
    accs = []
    for f in np.unique(folds):
        tr, te = folds != f, folds == f
        srt = np.sort(scores[tr])
        cands = np.concatenate([[srt[0] - 1e-6], (srt[1:] + srt[:-1]) / 2, [srt[-1] + 1e-6]])
        best = max(cands, key=lambda t: (((scores[tr] > t) == same[tr]).mean(), -t))
        accs.append(((scores[te] > best) == same[te]).mean())
    return accs


def test_metrics_match_independent_computation(cache, model):
    emb = cache.embeddings(model)
    scores, same = cache.scores(emb), cache.same
    s, y = scores.numpy().astype(np.float64), same.numpy()
    result = metrics_from_scores(scores, same, cache.folds, pairs_file="pairsDevTest.txt", flip=True)
    assert result.n_pairs == 120 and sum(y) == 60
    assert result.auc == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    fpr, tpr, _ = roc_curve(y, s)
    for far, t in result.tar_at_far.items():
        assert t.n_impostor == 60 and t.impostors_accepted <= far * 60
        assert t.tar == pytest.approx(tpr[fpr <= far].max(), abs=1e-9)
    indep = _independent_cv(s, y, np.array(cache.folds))
    assert result.fold_accuracies == pytest.approx(indep, abs=1e-9)
    assert result.accuracy_mean == pytest.approx(np.mean(indep)) and result.accuracy_std == pytest.approx(np.std(indep))
    assert result.accuracy_mean > 0.85 and result.auc > 0.9  # the pretrained model does verify faces


def test_cached_tail_path_equals_the_full_forward(cache, model, pretrained_file):
    x = to_input(cache.images[:6])
    with torch.no_grad():
        direct = torch.nn.functional.normalize(model(x) + model(x.flip(3)), dim=1)
    assert torch.allclose(cache.embeddings(model)[:6], direct, atol=1e-5)
    # Another model with the same frozen prefix reuses the features; its tail is what changes.
    other = build_embedder(pretrained_file)
    g = torch.Generator().manual_seed(0)  # (not a pure rescaling: the L2 normalisation would undo that)
    load_shared_state(other, {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in shared_state(other).items()})
    with torch.no_grad():
        direct = torch.nn.functional.normalize(other(x) + other(x.flip(3)), dim=1)
    assert torch.allclose(cache.embeddings(other)[:6], direct, atol=1e-5)
    assert not torch.allclose(cache.embeddings(other)[:6], cache.embeddings(model)[:6], atol=1e-3)
    assert evaluate_lfw(other, None, cache=cache).n_pairs == 120


def test_folds(lfw):
    view2 = lfw.pairs("pairs.txt")
    assert folds_of(view2) == [f for f in range(10) for _ in range(600)]  # the official folds
    dev = lfw.pairs("pairsDevTest.txt")
    folds = folds_of(dev)
    for f in range(10):  # stratified: 50 matched + 50 mismatched in each
        members = [p for p, k in zip(dev[0], folds) if k == f]
        assert len(members) == 100 and sum(p.same for p in members) == 50
    # perfectly separable scores -> 100 % in every fold
    same = torch.tensor([p.same for p in dev[0]])
    assert cv_accuracy(same.double() + 0.01 * torch.rand(1000), same, folds) == [1.0] * 10


def test_cli_evaluate_json(pretrained_file, lfw_file):
    env = {**os.environ, "FACEFED_LFW": str(lfw_file)}
    cmd = [
        sys.executable,
        "-m",
        "facefed.server.cli.main",
        "evaluate",
        "--model",
        str(pretrained_file),
        "--json",
        "--max-pairs",
        "40",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["n_pairs"] == 40 and data["flip"] is True and 0.7 < data["accuracy_mean"] <= 1.0
    assert set(data["tar_at_far"]) == {"0.01", "0.001"} and data["tar_at_far"]["0.01"]["n_impostor"] == 20
    bad = subprocess.run(cmd[:-3] + ["--pairs", "pairsDevTrain.txt"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "training people" in bad.stderr


def test_unseen_view2_pairs_hold_no_person_a_site_trains_on(lfw, model):
    """`unseen`: View 2's pairs.txt without every pair that holds a trainable person (peopleDevTrain
    with >= 2 images), each remaining pair in its official fold; the protocol runs on what is left."""
    trainable = set(lfw.trainable_people())
    counts = lfw.counts()
    assert trainable and all(counts[n] >= 2 for n in trainable)
    assert trainable <= set(lfw.people("peopleDevTrain.txt"))
    official = lfw.pairs("pairs.txt")
    cache = EvalCache(lfw, "pairs.txt", unseen=True, max_pairs=40)
    assert cache.label == "pairs.txt, unseen people" and len(cache.pairs) == 40
    assert all(p.a.name not in trainable and p.b.name not in trainable for p in cache.pairs)
    fold_of = {(p.a, p.b, p.same): f for f, fold in enumerate(official) for p in fold}
    assert [fold_of[(p.a, p.b, p.same)] for p in cache.pairs] == cache.folds and set(cache.folds) == set(range(10))
    # Without `unseen`, the same subset is full of training people: the filter is what removes them.
    plain = EvalCache(lfw, "pairs.txt", max_pairs=40)
    assert any(p.a.name in trainable or p.b.name in trainable for p in plain.pairs)
    result = cache.evaluate(model)
    assert result.pairs_file == "pairs.txt, unseen people" and result.n_pairs == 40 and result.auc > 0.9


def test_the_server_evaluates_the_configured_unseen_pairs(lfw_file, model):
    """`[evaluate] unseen = true` reaches the server's per-round evaluation and its ROC file's name."""
    from facefed.common.fedconfig import FederationConfig
    from facefed.server.evaluation import Evaluators

    evaluate_cfg = {"pairs": "pairs.txt", "unseen": True, "max_pairs": 40}
    cfg = FederationConfig.model_validate({"train": {"noise_multiplier": 1.0}, "evaluate": evaluate_cfg})
    evaluate = Evaluators(str(lfw_file)).for_config(cfg)
    assert evaluate is not None and cfg.evaluate.label == "pairs.txt, unseen people"
    metrics = evaluate(model)
    assert metrics["lfw_pairs"] == 40 and metrics["lfw_auc"] > 0.9
    assert evaluate.last_roc["pairs"] == "pairs.txt, unseen people"  # type: ignore[attr-defined]


def test_validation_pairs_hold_no_person_of_the_test_pairs(lfw):
    """The server's validation pairs (threshold and best checkpoint) are kept apart from the people of
    the configured test pairs: pairsDevTest's are apart already, View 2's unseen pairs share 671 people
    with pairsDevTrain (single-image people), all of View 2 leaves too few apart and says so."""
    from facefed.common.calibration import VALIDATION_MAX_PAIRS, VALIDATION_PAIRS
    from facefed.common.evaluate import people_of, select_pairs
    from facefed.server.evaluation import validation_apart

    validation = select_pairs(lfw, VALIDATION_PAIRS, max_pairs=VALIDATION_MAX_PAIRS)
    for pairs, unseen, shared in (("pairsDevTest.txt", False, 0), ("pairs.txt", True, 671)):
        test = people_of(select_pairs(lfw, pairs, unseen=unseen))
        assert len(test & people_of(lfw.pairs(VALIDATION_PAIRS))) == shared  # the overlap as LFW ships it
        drop, n = validation_apart(lfw, pairs, unseen=unseen, max_pairs=None)
        assert n == shared and drop == test
        kept = select_pairs(lfw, VALIDATION_PAIRS, without=drop, max_pairs=VALIDATION_MAX_PAIRS)
        assert not people_of(kept) & test
        genuine = sum(p.same for fold in kept for p in fold)
        impostor = sum(not p.same for fold in kept for p in fold)
        assert (genuine, impostor) == ((500, 500) if shared == 0 else (500, 405))
    assert people_of(validation) & people_of(select_pairs(lfw, "pairs.txt", unseen=True))  # what is dropped
    drop, n = validation_apart(lfw, "pairs.txt", unseen=False, max_pairs=None)
    assert drop == set() and n > 1000
