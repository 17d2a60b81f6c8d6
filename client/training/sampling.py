"""Poisson sampling of training batches, per person or per image.

Per person: every person is in the batch independently with probability q, and a sampled person
contributes exactly one image (drawn uniformly from theirs) and its flip bit. So one person's data
enters a step through at most one per-sample gradient, which DP-SGD clips to C: the subsampled
Gaussian mechanism's sensitivity is then per person, and the RDP accountant bounds the whole person.
Per image: every image is in the batch independently with probability q (standard DP-SGD).
Batch sizes vary, and an empty batch is a real step (the noise is still added).
Every choice comes from the release's `DPRandom` (client/training/dprandom.py: AES-256-CTR under a
fresh OS-random key), never from a seedable generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from facefed.client.training.dprandom import DPRandom


@dataclass(frozen=True)
class Batch:
    rows: torch.Tensor  # long (B,): image rows in SiteFaces
    labels: torch.Tensor  # long (B,): person index of each row
    flips: torch.Tensor  # bool (B,): mirror this image

    def __len__(self) -> int:
        return len(self.rows)


class PersonSampler:
    def __init__(self, counts: torch.Tensor, sample_rate: float, *, flip: bool = True, rng: DPRandom | None = None):
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if (counts <= 0).any():
            raise ValueError("every person needs at least one image")
        self.counts = counts.long()
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        self.q, self.flip = float(sample_rate), flip
        self.rng = rng if rng is not None else DPRandom()

    @property
    def expected_batch_size(self) -> float:
        return self.q * len(self.counts)

    def sample(self) -> Batch:
        people = torch.nonzero(self.rng.bernoulli(len(self.counts), self.q)).flatten()
        pick = self.rng.below(self.counts[people])
        flips = self.rng.bernoulli(len(people), 0.5) if self.flip else torch.zeros(len(people), dtype=torch.bool)
        return Batch(self.starts[people] + pick, people, flips)


class ImageSampler:
    def __init__(self, labels: torch.Tensor, sample_rate: float, *, flip: bool = True, rng: DPRandom | None = None):
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.labels = labels.long()
        self.q, self.flip = float(sample_rate), flip
        self.rng = rng if rng is not None else DPRandom()

    @property
    def expected_batch_size(self) -> float:
        return self.q * len(self.labels)

    def sample(self) -> Batch:
        rows = torch.nonzero(self.rng.bernoulli(len(self.labels), self.q)).flatten()
        flips = self.rng.bernoulli(len(rows), 0.5) if self.flip else torch.zeros(len(rows), dtype=torch.bool)
        return Batch(rows, self.labels[rows], flips)
