"""A site's faces in memory, ready for training: decoded, cropped uint8 tensors grouped by person.

Training reads the vault once per call into memory (`faces_from_vault`); nothing decoded is ever
written to disk. `faces_from_lfw` builds the same thing straight from LFW bytes, for benchmarks,
simulated sites and tests that do not need a vault: each image detected and aligned into the
canonical crop the vault would store (common/faces/lfw.py `canonical_public`); an image with no
detected face is skipped and listed in `SiteFaces.skipped`, never fed through the fixed crop.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from facefed.common.lfw import ImageKey
from facefed.common.preprocess import decode_faces


@dataclass
class SiteFaces:
    """Images grouped by person: person k owns images `starts[k] : starts[k] + counts[k]`.

    `person_ids` are the operator's ids (for the contribution log); `pseudonyms` key the head rows
    (random, never derived from the person's data).
    """

    person_ids: list[str]
    pseudonyms: list[str]
    images: torch.Tensor  # uint8 (N, 3, 112, 112)
    labels: torch.Tensor  # long (N,): index into person_ids
    image_ids: list[str]
    cache: dict = field(default_factory=dict, repr=False)  # derived tensors (frozen-prefix features)
    skipped: list[str] = field(default_factory=list)  # images left out: no face detected (LFW only)

    def __post_init__(self) -> None:
        if len(self.person_ids) != len(self.pseudonyms) or len(set(self.person_ids)) != len(self.person_ids):
            raise ValueError("person_ids and pseudonyms must be parallel lists of unique ids")
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or len(self.images) != len(self.labels):
            raise ValueError("images must be uint8 (N, 3, H, W) with one label each")
        if len(self.labels) and (
            bool((self.labels[1:] < self.labels[:-1]).any()) or int(self.labels.max()) >= len(self.person_ids)
        ):
            raise ValueError("labels must be sorted (images grouped by person) and index person_ids")
        self.counts = torch.bincount(self.labels, minlength=len(self.person_ids))
        self.starts = torch.cumsum(self.counts, 0) - self.counts

    @property
    def n_people(self) -> int:
        return len(self.person_ids)

    @property
    def n_images(self) -> int:
        return len(self.labels)

    def subset(self, person_ids: list[str]) -> SiteFaces:
        """The same faces restricted to some people (e.g. all but those who asked to be forgotten)."""
        index = {p: k for k, p in enumerate(self.person_ids)}
        missing = [p for p in person_ids if p not in index]
        if missing:
            raise KeyError(f"person {missing[0]!r} has no faces here")
        ks = [index[p] for p in person_ids]
        rows = (
            torch.cat([torch.arange(int(self.starts[k]), int(self.starts[k] + self.counts[k])) for k in ks])
            if ks
            else torch.empty(0, dtype=torch.long)
        )
        labels = (
            torch.cat([torch.full((int(self.counts[k]),), j, dtype=torch.long) for j, k in enumerate(ks)])
            if ks
            else torch.empty(0, dtype=torch.long)
        )
        sub = SiteFaces(
            [self.person_ids[k] for k in ks],
            [self.pseudonyms[k] for k in ks],
            self.images[rows],
            labels,
            [self.image_ids[i] for i in rows.tolist()],
        )
        # Per-image derived tensors (frozen-prefix features) carry over row by row.
        sub.cache.update(
            {k: v[rows] for k, v in self.cache.items() if isinstance(v, torch.Tensor) and len(v) == self.n_images}
        )
        return sub


def _build(groups: list[tuple[str, str, list[tuple[str, bytes]]]], threads: int) -> SiteFaces:
    groups = [g for g in groups if g[2]]
    datas = [data for _, _, imgs in groups for _, data in imgs]
    images = decode_faces(datas, threads=threads)
    labels = (
        torch.cat([torch.full((len(imgs),), k, dtype=torch.long) for k, (_, _, imgs) in enumerate(groups)])
        if groups
        else torch.empty(0, dtype=torch.long)
    )
    return SiteFaces(
        [g[0] for g in groups],
        [g[1] for g in groups],
        images,
        labels,
        [iid for _, _, imgs in groups for iid, _ in imgs],
    )


def faces_from_vault(vault, people: list[str] | None = None, *, threads: int = 2) -> SiteFaces:
    """Read (and decode, in memory) the images of `people` (all by default) from an open Vault."""
    records = {r.person_id: r for r in vault.people()}
    wanted = sorted(records) if people is None else list(people)
    unknown = [p for p in wanted if p not in records]
    if unknown:
        raise KeyError(f"person {unknown[0]!r} is not in the vault; `facefed-client vault ls` lists its people")
    ids = {p: vault.image_ids(p) for p in wanted}
    order = [iid for p in wanted for iid in ids[p]]
    got: dict[str, bytes] = {}
    for _pid, iid, data in vault.iter_images(order):
        got[iid] = data
    groups = [(p, records[p].pseudonym, [(iid, got[iid]) for iid in ids[p]]) for p in wanted]
    return _build(groups, threads)


def lfw_pseudonym(name: str) -> str:
    """A stable stand-in pseudonym for an LFW name (head rows never carry names)."""
    return "lfw-" + hashlib.sha256(name.encode()).hexdigest()[:16]


class LFWImages(Protocol):
    """Where LFW images come from: the archive (common/lfw.py LFW) or a simulation's in-memory copy."""

    def keys(self, name: str) -> list[ImageKey]: ...

    def load_images(self, keys: Iterable[ImageKey]) -> dict[ImageKey, bytes]: ...


def faces_from_lfw(
    lfw: LFWImages, names: list[str], *, max_per_person: int | None = None, threads: int = 2
) -> SiteFaces:
    """Faces of the given LFW people straight from the archive (benchmarks, simulation, tests), detected
    and aligned as `vault import --lfw` stores them. Images with no detected face are skipped (listed
    in `skipped`); a person left with no image is dropped. `max_per_person` counts archive images."""
    from facefed.common.faces.lfw import canonical_public

    keys = {n: lfw.keys(n)[:max_per_person] if max_per_person else lfw.keys(n) for n in names}
    data = lfw.load_images([k for ks in keys.values() for k in ks])
    crops = dict(canonical_public((k, data[k]) for ks in keys.values() for k in ks))
    groups = [(n, lfw_pseudonym(n), [(k.relpath, crops[k]) for k in keys[n] if crops[k] is not None]) for n in names]
    faces = _build(groups, threads)  # type: ignore[arg-type]  # None crops are filtered out above
    faces.skipped = [k.relpath for ks in keys.values() for k in ks if crops[k] is None]
    return faces
