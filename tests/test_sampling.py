"""Per-person Poisson sampling: at most one image per person per step, at rate q."""

from __future__ import annotations

import torch
from train_support import small_faces

import facefed.client.training.trainer as trainer
from facefed.client.training.dprandom import DPRandom
from facefed.client.training.sampling import ImageSampler, PersonSampler
from facefed.common.config import TrainConfig
from facefed.common.model.heads import MarginHead
from facefed.common.model.mobilefacenet import build_embedder


def test_person_sampler_takes_one_image_per_sampled_person():
    counts = torch.tensor([1, 5, 2, 9, 3])
    s = PersonSampler(counts, 0.4, rng=DPRandom.insecure_for_tests(1))
    starts = torch.cumsum(counts, 0) - counts
    hits, picked = torch.zeros(5), set()
    for _ in range(2000):
        b = s.sample()
        assert len(set(b.labels.tolist())) == len(b)  # no person twice
        assert ((b.rows >= starts[b.labels]) & (b.rows < starts[b.labels] + counts[b.labels])).all()
        hits[b.labels] += 1
        picked.update(b.rows.tolist())
    assert torch.allclose(hits / 2000, torch.full((5,), 0.4), atol=0.05)  # q per person, whatever its count
    assert picked == set(range(int(counts.sum())))  # every image gets its turn


def test_image_sampler_rate():
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    s = ImageSampler(labels, 0.25, rng=DPRandom.insecure_for_tests(2))
    sizes = [len(s.sample()) for _ in range(2000)]
    assert abs(sum(sizes) / 2000 - 1.5) < 0.1


def test_training_batches_hold_one_image_per_person(lfw, pretrained_file, tmp_path, monkeypatch):
    """Inspect the batches the trainer actually uses (a recording sampler around the real one)."""
    seen = []

    class Recording(PersonSampler):
        def sample(self):
            b = super().sample()
            seen.append(b)
            return b

    monkeypatch.setattr(trainer, "PersonSampler", Recording)
    faces = small_faces(lfw, 10)
    model = build_embedder(pretrained_file)
    cfg = TrainConfig(privacy_unit="none", sample_rate=0.5, steps=15, probe_steps=5)
    trainer.train_local(model, MarginHead(faces.pseudonyms), faces, cfg, None, insecure_seed=3)
    assert len(seen) == 20 and sum(len(b) for b in seen) > 0
    for b in seen:
        people = faces.labels[b.rows]
        assert torch.equal(people, b.labels) and len(set(people.tolist())) == len(people)
