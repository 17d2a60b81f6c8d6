"""DP mean centring (client/training/centering.py): the mechanism's sensitivity and noise scale, its accounting
as one Gaussian release per fresh head, the refusal where it would be mostly noise; and the trainer's
DP randomness, fresh unless a seed fixes it."""

from __future__ import annotations

import copy

import pytest
import torch
from train_support import small_faces

from facefed.client.training.centering import dp_center, unit_means
from facefed.client.training.dprandom import DPRandom
from facefed.client.training.trainer import cached_prefix, train_local
from facefed.common.accountant import SiteAccountant, epsilon_of
from facefed.common.config import TrainConfig
from facefed.common.model.heads import MarginHead
from facefed.common.model.mobilefacenet import build_embedder, shared_state


@pytest.fixture(scope="module")
def faces(lfw):
    return small_faces(lfw, 12, max_per_person=4)


def _bias_shift(model, faces, feats, **kw) -> torch.Tensor:
    m = copy.deepcopy(model)
    before = m.features.bias.detach().clone()
    dp_center(m, faces, feats, **kw)
    return before - m.features.bias.detach()


def test_one_person_moves_the_noiseless_sum_by_at_most_the_clip(faces, pretrained_file):
    model = build_embedder(pretrained_file)
    feats = cached_prefix(model, faces).clone()
    k = 3  # give one person embeddings far out: their clipped contribution is still C at most
    rows = slice(int(faces.starts[k]), int(faces.starts[k] + faces.counts[k]))
    feats[rows] *= 50.0
    means = unit_means(model, faces, feats, "person")
    assert means[k].norm() > 20 * means[0].norm()
    clip = 4.0
    full = (
        _bias_shift(
            model, faces, feats, unit="person", clip=clip, noise_multiplier=0.0, rng=DPRandom.insecure_for_tests(0)
        )
        * faces.n_people
    )
    others = [p for i, p in enumerate(faces.person_ids) if i != k]
    sub = faces.subset(others)
    without = (
        _bias_shift(
            model,
            sub,
            feats[
                torch.cat(
                    [
                        torch.arange(int(faces.starts[i]), int(faces.starts[i] + faces.counts[i]))
                        for i in range(faces.n_people)
                        if i != k
                    ]
                )
            ],
            unit="person",
            clip=clip,
            noise_multiplier=0.0,
            rng=DPRandom.insecure_for_tests(0),
        )
        * sub.n_people
    )
    assert (full - without).norm() == pytest.approx(clip, rel=1e-4)  # exactly C: that person was clipped
    # And a person's mean is the mean over their images and mirrors (checked against a direct loop).
    direct = torch.stack(
        [
            torch.stack([model.forward_tail(feats[i, v : v + 1], normalize=False)[0] for v in range(2)]).mean(0)
            for i in range(int(faces.starts[0]), int(faces.starts[0] + faces.counts[0]))
        ]
    ).mean(0)
    assert torch.allclose(means[0], direct, atol=1e-4)


def test_noise_has_the_calibrated_scale(faces, pretrained_file):
    model = build_embedder(pretrained_file)
    feats = cached_prefix(model, faces)
    clip, sigma = 5.0, 3.0
    exact = _bias_shift(
        model, faces, feats, unit="person", clip=clip, noise_multiplier=0.0, rng=DPRandom.insecure_for_tests(0)
    )
    residuals = torch.cat(
        [
            (
                _bias_shift(
                    model,
                    faces,
                    feats,
                    unit="person",
                    clip=clip,
                    noise_multiplier=sigma,
                    rng=DPRandom.insecure_for_tests(s),
                )
                - exact
            )
            * faces.n_people
            for s in range(8)
        ]
    )
    # 8 x 128 draws of N(0, (sigma C)^2): their sd is within a few percent of sigma C
    assert residuals.std().item() == pytest.approx(sigma * clip, rel=0.1)
    assert abs(residuals.mean().item()) < 0.1 * sigma * clip


def test_centring_is_one_gaussian_release_per_fresh_head(faces, pretrained_file, tmp_path):
    model = build_embedder(pretrained_file)
    head = MarginHead(faces.pseudonyms)
    cfg = TrainConfig(
        noise_multiplier=1.0,
        sample_rate=0.5,
        steps=2,
        probe_steps=2,
        delta=1e-3,
        max_epsilon=50,
        center_noise=0.5,
        center_clip=5.0,
    )
    acc = SiteAccountant(tmp_path / "acc.json", cfg.delta, cfg.max_epsilon, "person")
    bias = model.features.bias.detach().clone()
    report = train_local(model, head, faces, cfg, acc, insecure_seed=0)
    assert report.center_shift is not None and report.center_shift > 0 and head.probed
    assert sorted(acc.history()) == sorted([(0.5, 1.0, 1), (1.0, 0.5, 4)])
    assert report.epsilon == pytest.approx(epsilon_of([(0.5, 1.0, 1), (1.0, 0.5, 4)], 1e-3))
    assert not torch.equal(model.features.bias, bias)
    again = train_local(model, head, faces, cfg, acc, insecure_seed=1)  # the head is no longer fresh: no second release
    assert again.center_shift is None and sorted(acc.history()) == sorted([(0.5, 1.0, 1), (1.0, 0.5, 4), (1.0, 0.5, 2)])


def test_budget_counts_the_centring_before_anything_runs(faces, pretrained_file, tmp_path):
    model = build_embedder(pretrained_file)
    cfg = TrainConfig(
        noise_multiplier=5.0, sample_rate=0.1, steps=1, delta=1e-3, max_epsilon=1.0, center_noise=1.0, center_clip=5.0
    )
    acc = SiteAccountant(tmp_path / "acc.json", cfg.delta, cfg.max_epsilon, "person")
    assert acc.projected(5.0, 0.1, 1) < 1.0 < acc.projected(5.0, 0.1, 1, extra=cfg.fresh_head_events())
    state = shared_state(model)
    with pytest.raises(Exception, match="privacy budget exceeded"):
        train_local(model, MarginHead(faces.pseudonyms), faces, cfg, acc, insecure_seed=0)
    assert acc.steps == 0 and all(torch.equal(v, shared_state(model)[k]) for k, v in state.items())
    # With a target epsilon, the DP-SGD noise is calibrated for what is left after the centring.
    cfg2 = TrainConfig(target_epsilon=6.0, max_epsilon=6.0, sample_rate=0.5, steps=3, delta=1e-3, center_noise=1.0)
    acc2 = SiteAccountant(tmp_path / "acc2.json", cfg2.delta, cfg2.max_epsilon, "person")
    report = train_local(model, MarginHead(faces.pseudonyms), faces, cfg2, acc2, insecure_seed=0)
    assert 5.9 < report.epsilon <= 6.0 and (1.0, 1.0, 1) in acc2.history()


def test_too_few_people_for_centring_is_refused():
    cfg = TrainConfig(noise_multiplier=1.0, center_noise=5.0, delta=1e-5)
    with pytest.raises(ValueError, match="mostly noise.*at least 57 persons"):
        cfg.check_people(40)
    cfg.check_people(100)
    with pytest.raises(ValueError, match="voids the guarantee"):
        TrainConfig(noise_multiplier=1.0, center_noise=0.0)


def test_dp_randomness_is_fresh_unless_a_seed_fixes_it(faces, pretrained_file, tmp_path):
    cfg = TrainConfig(
        noise_multiplier=1.0, sample_rate=0.5, steps=3, probe_steps=1, delta=1e-3, max_epsilon=1e9, tune="bias", lr=0.1
    )
    base = build_embedder(pretrained_file)

    def trained(seed):
        m = copy.deepcopy(base)
        train_local(
            m,
            MarginHead(faces.pseudonyms),
            faces,
            cfg,
            SiteAccountant(tmp_path / f"acc-{len(list(tmp_path.iterdir()))}.json", 1e-3, 1e9, "person"),
            insecure_seed=seed,
        )
        return shared_state(m)["features.bias"]

    assert torch.equal(trained(7), trained(7))  # a fixed seed reproduces (benchmarks, tests)
    assert not torch.equal(trained(None), trained(None))  # by default, nobody can regenerate the noise
