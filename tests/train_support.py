"""Helpers for the training tests: a few real LFW people, as SiteFaces or in a real vault."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from facefed.client.training.faces import SiteFaces, faces_from_lfw
from facefed.common.faces.lfw import canonical_public
from facefed.common.lfw import LFW


@lru_cache(maxsize=8)
def train_names(lfw: LFW, n_people: int, min_images: int = 2) -> tuple[str, ...]:
    """The first `n_people` peopleDevTrain people (alphabetical, early in the archive) with enough images."""
    counts = lfw.counts()
    names = sorted(n for n in lfw.people("peopleDevTrain.txt") if counts[n] >= min_images)
    return tuple(names[:n_people])


def small_faces(lfw: LFW, n_people: int = 12, max_per_person: int = 4) -> SiteFaces:
    return faces_from_lfw(lfw, list(train_names(lfw, n_people)), max_per_person=max_per_person)


def make_vault(root: Path, lfw: LFW, n_people: int, max_per_person: int = 4):
    """A real vault (3 local stores, threshold 2) holding real LFW faces; returns (vault path, names)."""
    from facefed.client.vault.vault import Vault

    names = list(train_names(lfw, n_people))
    stores = []
    for i in range(3):
        d = root / f"store{i}"
        d.mkdir(parents=True)
        stores.append(str(d))
    vault = Vault.create(root / "vault", stores, 2)
    keys = [k for n in names for k in lfw.keys(n)[:max_per_person]]
    data = lfw.load_images(keys)
    # As `vault import --lfw` stores them: detected, aligned, canonical 224x224 crops.
    crops = [(k, c) for k, c in canonical_public((k, data[k]) for k in keys) if c is not None]
    vault.put_many([(k.name, c, k.relpath) for k, c in crops])
    vault.close()
    return root / "vault", names
