"""Local training end to end on a small real LFW vault, and the refusals."""

from __future__ import annotations

import math

import pytest
import torch
from train_support import make_vault, small_faces

from facefed.client.training.faces import faces_from_vault
from facefed.client.training.trainer import train_local
from facefed.client.vault.vault import Vault
from facefed.common.accountant import BudgetExceeded, SiteAccountant
from facefed.common.config import TrainConfig
from facefed.common.model.heads import MarginHead
from facefed.common.model.mobilefacenet import build_embedder, shared_state


@pytest.fixture(scope="module")
def vault_faces(lfw, tmp_path_factory):
    path, names = make_vault(tmp_path_factory.mktemp("site"), lfw, 12, max_per_person=4)
    v = Vault.open(path)
    try:
        faces = faces_from_vault(v)
        pseudonyms = {r.person_id: r.pseudonym for r in v.people()}
    finally:
        v.close()
    assert sorted(faces.person_ids) == sorted(names)
    assert faces.pseudonyms == [pseudonyms[p] for p in faces.person_ids]  # head rows keyed by pseudonym
    return faces


def test_dp_finetune_from_a_vault_moves_the_weights_and_spends_epsilon(vault_faces, pretrained_file, tmp_path):
    faces = vault_faces
    model = build_embedder(pretrained_file)
    before = shared_state(model)
    frozen = model.conv1.conv.weight.detach().clone()
    head = MarginHead(faces.pseudonyms)
    head_before = head.fc.weight.detach().clone()
    cfg = TrainConfig(noise_multiplier=1.0, sample_rate=0.5, steps=6, probe_steps=4, delta=1e-3, max_epsilon=50)
    acc = SiteAccountant(tmp_path / "acc.json", cfg.delta, cfg.max_epsilon, "person")
    seen = []
    report = train_local(model, head, faces, cfg, acc, insecure_seed=1, progress=seen.append)
    assert report.steps == 10 and report.probe_steps == 4 and report.unit == "person" and report.accountant == "rdp"
    assert report.epsilon == pytest.approx(SiteAccountant(tmp_path / "acc.json", 1e-3, 50, "person").epsilon())
    assert 0 < report.epsilon < 50 and report.delta == 1e-3 and math.isfinite(report.loss)
    assert report.people_used and report.people_used <= set(faces.person_ids)
    moved = max((shared_state(model)[k] - v).abs().max().item() for k, v in before.items())
    assert moved > 1e-4 and torch.equal(model.conv1.conv.weight, frozen)  # tail moved, prefix frozen
    assert not torch.allclose(head.fc.weight, head_before) and head.probed
    assert torch.allclose(head.fc.weight.norm(dim=1), torch.ones(len(head)), atol=1e-5)
    assert [p.step for p in seen] == list(range(1, 11)) and seen[-1].epsilon == pytest.approx(report.epsilon)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # Opacus cleaned up
    # A second call continues the same site's accounting (the head is already probed).
    report2 = train_local(model, head, faces, cfg, acc, insecure_seed=2)
    assert report2.steps == 6 and report2.epsilon > report.epsilon


def test_budget_exhausted_refuses_and_changes_nothing(vault_faces, pretrained_file, tmp_path):
    faces = vault_faces
    model = build_embedder(pretrained_file)
    head = MarginHead(faces.pseudonyms)
    cfg = TrainConfig(noise_multiplier=0.8, sample_rate=0.5, steps=200, delta=1e-3, max_epsilon=3.0)
    acc = SiteAccountant(tmp_path / "acc.json", cfg.delta, cfg.max_epsilon, "person")
    acc.record(0.8, 0.5, 2)
    state, weight, file = shared_state(model), head.fc.weight.detach().clone(), (tmp_path / "acc.json").read_bytes()
    with pytest.raises(BudgetExceeded, match=r"remaining \d\.\d{3}"):
        train_local(model, head, faces, cfg, acc, insecure_seed=0)
    assert (tmp_path / "acc.json").read_bytes() == file
    assert all(torch.equal(v, shared_state(model)[k]) for k, v in state.items())
    assert torch.equal(head.fc.weight, weight)


def test_refusals(lfw, pretrained_file, tmp_path):
    faces = small_faces(lfw, 3, max_per_person=2)
    model = build_embedder(pretrained_file)
    head = MarginHead(faces.pseudonyms)
    acc = SiteAccountant(tmp_path / "acc.json", 1e-3, 8.0, "person")
    with pytest.raises(ValueError, match="fewer than min_people=5 needed for one batch"):
        train_local(
            model, head, faces, TrainConfig(noise_multiplier=1.0, delta=1e-3, min_people=5), acc, insecure_seed=0
        )
    with pytest.raises(ValueError, match=r"delta 0.5 must be below 1/min_people"):  # refused by the config itself
        TrainConfig(noise_multiplier=1.0, delta=0.5)
    with pytest.raises(ValueError, match=r"delta 0.4 must be below 1/3"):  # only the site knows it has 3 people
        train_local(model, head, faces, TrainConfig(noise_multiplier=1.0, delta=0.4), acc, insecure_seed=0)
    with pytest.raises(ValueError, match="would void this site's per-person guarantee"):
        train_local(model, head, faces, TrainConfig(privacy_unit="none"), acc, insecure_seed=0)
    with pytest.raises(ValueError, match="config says train_from = `conv_45`"):
        train_local(
            model,
            head,
            faces,
            TrainConfig(noise_multiplier=1.0, delta=1e-3, train_from="conv_45"),
            acc,
            insecure_seed=0,
        )
    assert acc.steps == 0


def test_image_unit_and_target_epsilon(lfw, pretrained_file, tmp_path):
    faces = small_faces(lfw, 8, max_per_person=3)
    model = build_embedder(pretrained_file)
    cfg = TrainConfig(privacy_unit="image", target_epsilon=5.0, max_epsilon=5.0, sample_rate=0.3, steps=5, delta=1e-3)
    acc = SiteAccountant(tmp_path / "acc.json", 1e-3, 5.0, "image")
    report = train_local(model, MarginHead(faces.pseudonyms), faces, cfg, acc, insecure_seed=0)
    assert report.unit == "image" and 4.9 < report.epsilon <= 5.0 and report.noise_multiplier > 0


def test_empty_batch_still_adds_noise_and_bias_tuning_moves_only_biases(lfw, pretrained_file, tmp_path):
    """A Poisson batch can be empty: the step is still taken (noise only) and accounted for."""
    faces = small_faces(lfw, 6, max_per_person=2)
    model = build_embedder(pretrained_file)
    before = shared_state(model)
    # q so small that every batch is empty (probability 1 - (1 - 1e-6)^6 per step to be non-empty)
    cfg = TrainConfig(noise_multiplier=2.0, sample_rate=1e-6, steps=3, delta=1e-3, max_epsilon=8.0, tune="bias", lr=0.1)
    acc = SiteAccountant(tmp_path / "acc.json", 1e-3, 8.0, "person")
    report = train_local(model, MarginHead(faces.pseudonyms), faces, cfg, acc, insecure_seed=0)
    assert report.images == 0 and report.steps == 3 and acc.steps == 3 and not report.people_used
    after = shared_state(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(".bias") for k in changed)  # noise moved the biases, nothing else
    params = dict(model.named_parameters())
    assert all(params[k].requires_grad for k in after)  # weights frozen for the call only
