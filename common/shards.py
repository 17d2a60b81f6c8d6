"""SISA-style shards for cheap exact unlearning: who trains in which shard, and the sharded embedding.

People are split over S shards; each shard is its own federation (own shared tail, own site heads),
trained only on its people. Forgetting a person then means replaying only their shard, from before
the person's first round, without them; the other shards are untouched and already exact.

Assignment is a keyed hash (HMAC-SHA256 of the pseudonym under a federation secret): stable for the
life of the federation, balanced like a random split, and neither predictable nor steerable by
someone without the key (an attacker cannot pick pseudonyms that all land in one shard, to make its
replays expensive or to sit in the shard of a targeted person).

This module imports torch only inside `concat_embeddings`, so the config and CLI paths that need
`shard_of` stay fast to start.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MIN_KEY_BYTES = 16
MAX_SHARDS = 256


def check_shards(shards: int) -> int:
    if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"shards must be an integer in 1..{MAX_SHARDS}, got {shards!r}")
    return shards


def shard_of(key: bytes, pseudonym: str, shards: int) -> int:
    """The shard (0..shards-1) of a person, from their pseudonym and the federation's shard key."""
    check_shards(shards)
    if not isinstance(key, (bytes, bytearray)) or len(key) < MIN_KEY_BYTES:
        raise ValueError(
            f"the shard key must be at least {MIN_KEY_BYTES} random bytes (a short or guessable key "
            "lets outsiders predict or steer the assignment)"
        )
    if not isinstance(pseudonym, str) or not pseudonym:
        raise ValueError(f"pseudonym must be a non-empty string, got {pseudonym!r}")
    digest = hmac.new(bytes(key), pseudonym.encode(), hashlib.sha256).digest()
    # 64 bits mod S: the bias (at most S / 2^64) is far below any measurable imbalance.
    return int.from_bytes(digest[:8], "big") % shards


def assign(key: bytes, pseudonyms: Iterable[str], shards: int) -> list[list[str]]:
    """Pseudonyms grouped by shard (each group in the order given)."""
    out: list[list[str]] = [[] for _ in range(check_shards(shards))]
    for p in pseudonyms:
        out[shard_of(key, p, shards)].append(p)
    return out


def concat_embeddings(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N, S*d) unit embeddings from S shard models' (N, d) embeddings: each part L2-normalised, the
    parts concatenated and scaled by 1/sqrt(S). The cosine of two such embeddings is exactly the mean
    of the S shard cosines: a score-level ensemble.

    Why not the mean of the shard vectors: each shard model is trained apart (its own tail, its own
    heads, on its own people), so the shard models drift apart and their coordinates are not aligned;
    averaging vectors would add unrelated coordinates and cancel signal, while averaging cosines only
    needs each shard's own geometry to be meaningful.
    """
    import torch
    import torch.nn.functional as F

    if not parts:
        raise ValueError("concat_embeddings needs the embeddings of at least one shard model")
    shapes = {tuple(p.shape) for p in parts}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"every shard's embeddings must be (N, d) with the same N and d, got {sorted(shapes)}")
    joined: torch.Tensor = torch.cat([F.normalize(p, dim=1) for p in parts], 1) / len(parts) ** 0.5
    return joined
