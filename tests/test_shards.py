"""Shard assignment over real LFW people, and the sharded embedding on real embeddings."""

from __future__ import annotations

import math

import pytest
import torch

from facefed.client.training.faces import lfw_pseudonym
from facefed.common.model.mobilefacenet import build_embedder, shared_state
from facefed.common.preprocess import decode_faces, to_input
from facefed.common.shards import assign, concat_embeddings, shard_of

KEY = b"test shard key, 32 bytes long!!!"
OTHER_KEY = b"another shard key, 32 bytes too!"


@pytest.fixture(scope="module")
def pseudonyms(lfw) -> list[str]:
    return [lfw_pseudonym(n) for n in lfw.people("peopleDevTrain.txt")]


def test_assignment_is_stable_and_balanced_over_lfw_people(pseudonyms):
    n = len(pseudonyms)
    assert n > 1000
    for shards in (1, 4, 7):
        groups = assign(KEY, pseudonyms, shards)
        assert sorted(p for g in groups for p in g) == sorted(pseudonyms)  # a partition
        # stable: the same person lands in the same shard one at a time, in any order
        assert all(shard_of(KEY, p, shards) == s for s, g in enumerate(groups) for p in g)
        assert assign(KEY, list(reversed(pseudonyms)), shards) == [list(reversed(g)) for g in groups]
        expected, sd = n / shards, math.sqrt(n * (1 / shards) * (1 - 1 / shards))
        assert all(abs(len(g) - expected) <= 5 * sd + 1e-9 for g in groups), [len(g) for g in groups]


def test_another_key_gives_another_assignment(pseudonyms):
    a = [shard_of(KEY, p, 4) for p in pseudonyms]
    b = [shard_of(OTHER_KEY, p, 4) for p in pseudonyms]
    moved = sum(x != y for x, y in zip(a, b)) / len(a)
    assert 0.65 < moved < 0.85  # independent assignments: 3/4 of people change shard


def test_bad_keys_and_shard_counts_are_refused():
    with pytest.raises(ValueError, match="at least 16"):
        shard_of(b"short", "lfw-0123", 4)
    with pytest.raises(ValueError, match="shards"):
        shard_of(KEY, "lfw-0123", 0)
    with pytest.raises(ValueError, match="shards"):
        shard_of(KEY, "lfw-0123", True)
    with pytest.raises(ValueError, match="pseudonym"):
        shard_of(KEY, "", 4)


@pytest.fixture(scope="module")
def real_embeddings(lfw, pretrained_file) -> list[torch.Tensor]:
    """Embeddings of 12 LFW images under two 'shard models': the pretrained embedder and a copy whose
    trainable tail drifted (seeded noise on every tail tensor), as two independently trained shards do."""
    counts = lfw.counts()
    names = [n for n in lfw.people("peopleDevTrain.txt") if counts[n] >= 3][:4]
    keys = [k for n in names for k in lfw.keys(n)[:3]]
    data = lfw.load_images(keys)
    x = to_input(decode_faces([data[k] for k in keys]))
    a, b = build_embedder(pretrained_file), build_embedder(pretrained_file)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        params = dict(b.named_parameters())
        for name, t in shared_state(b).items():
            params[name].add_(0.5 * t.std() * torch.randn(t.shape, generator=g))
        return [a(x), b(x)]


def _cos(e: torch.Tensor) -> torch.Tensor:
    e = torch.nn.functional.normalize(e, dim=1)
    return e @ e.T


def test_concat_cosine_is_the_mean_of_shard_cosines(real_embeddings):
    a, b = real_embeddings
    assert not torch.allclose(_cos(a), _cos(b), atol=1e-3)  # the two shard models really differ
    e = concat_embeddings([a, b])
    assert e.shape == (len(a), 2 * a.shape[1])
    assert torch.allclose(e.norm(dim=1), torch.ones(len(e)), atol=1e-5)
    assert torch.allclose(e @ e.T, (_cos(a) + _cos(b)) / 2, atol=1e-5)
    # one shard: the model's own cosines
    assert torch.allclose(concat_embeddings([a]) @ concat_embeddings([a]).T, _cos(a), atol=1e-5)
    # the mean of the raw vectors is not that ensemble (unaligned coordinates do not average)
    m = torch.nn.functional.normalize((a + b) / 2, dim=1)
    assert not torch.allclose(m @ m.T, (_cos(a) + _cos(b)) / 2, atol=1e-3)


def test_concat_refuses_mismatched_parts(real_embeddings):
    a, b = real_embeddings
    with pytest.raises(ValueError, match="same N"):
        concat_embeddings([a, b[:-1]])
    with pytest.raises(ValueError, match="at least one"):
        concat_embeddings([])
