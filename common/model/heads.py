"""The margin head (CosFace): one class centre per enrolled person, the site's private part.

logits_j = s * cos(x, w_j), and the true class gets s * (cos - m) (Wang et al., CosFace, 2018).
Rows are stored unit-norm and re-normalised after every optimizer step (projected SGD on the
sphere), so the forward pass is a plain `nn.Linear` on the normalised embedding: Opacus computes its
per-sample gradients natively, and renormalising is post-processing of a DP output.

Rows are keyed by the person's pseudonym (never a name). New rows are drawn at random, independently
of any data: initialising a row from the person's own images would not be private, because that row
enters every other person's softmax and so every backbone gradient (see client/training/trainer.py).
The head is never sent anywhere; deleting a person deletes their row (`remove_people`).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from facefed.common.durable import atomic_write_bytes
from facefed.common.errors import FacefedError
from facefed.common.model.stages import EMBEDDING_DIM

HEAD_FORMAT = "facefed-head/1"
_ID_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")


class HeadError(FacefedError, ValueError):
    """A bad person id, a duplicate or unknown row, or a head file that does not fit."""


def _check_id(pid: str) -> str:
    if not isinstance(pid, str) or not _ID_RE.match(pid):
        raise HeadError(f"head row id {pid!r} is not a pseudonym (1-128 of A-Z a-z 0-9 _ . -)")
    return pid


def _random_rows(ids: Sequence[str], dim: int, seed: int) -> torch.Tensor:
    """Unit rows from a generator seeded by (seed, id) only: data-independent and reproducible."""
    rows = []
    for pid in ids:
        g = torch.Generator().manual_seed(
            int.from_bytes(hashlib.sha256(f"{seed}\x00{pid}".encode()).digest()[:8], "big") >> 1
        )
        rows.append(torch.randn(dim, generator=g))
    return F.normalize(torch.stack(rows), dim=1) if rows else torch.empty((0, dim))


class MarginHead(nn.Module):
    """CosFace head: `forward(emb)` -> scaled cosine logits; `loss(logits, labels)` applies the margin."""

    def __init__(
        self,
        ids: Iterable[str] = (),
        *,
        dim: int = EMBEDDING_DIM,
        scale: float = 32.0,
        margin: float = 0.35,
        seed: int = 0,
    ):
        super().__init__()
        self.dim, self.scale, self.margin, self.seed = dim, float(scale), float(margin), int(seed)
        self.ids: list[str] = []
        self._index: dict[str, int] = {}
        self.fc = nn.Linear(dim, 1, bias=False)
        self.fc.weight = nn.Parameter(torch.empty((0, dim)))
        self.probed = False  # set once the head has had its fresh-head phase (DP centring, linear probing)
        self.add_people(ids)

    # -- rows ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ids)

    def index(self, pid: str) -> int:
        try:
            return self._index[pid]
        except KeyError:
            raise HeadError(f"person {pid!r} has no row in this head") from None

    def indices(self, pids: Iterable[str]) -> torch.Tensor:
        return torch.tensor([self.index(p) for p in pids], dtype=torch.long)

    def _set_rows(self, ids: list[str], weight: torch.Tensor) -> None:
        self.ids = ids
        self._index = {p: i for i, p in enumerate(ids)}
        fc = nn.Linear(self.dim, max(1, len(ids)), bias=False)  # (a 0-row Linear warns on init)
        fc.weight = nn.Parameter(weight.detach().clone().float())
        self.fc = fc

    def add_people(self, ids: Iterable[str]) -> list[str]:
        """Add a random (data-independent) row for each new id; returns the ids actually added."""
        new = []
        for pid in ids:
            _check_id(pid)
            if pid in self._index or pid in new:
                continue
            new.append(pid)
        if new:
            weight = torch.cat([self.fc.weight.detach(), _random_rows(new, self.dim, self.seed)])
            self._set_rows(self.ids + new, weight)
        return new

    def remove_people(self, ids: Iterable[str]) -> list[str]:
        """Delete rows; returns the ids removed. The row's values are gone from this object."""
        drop = {p for p in ids if p in self._index}
        if drop:
            keep = [i for i, p in enumerate(self.ids) if p not in drop]
            self._set_rows([self.ids[i] for i in keep], self.fc.weight.detach()[keep].clone())
        return sorted(drop)

    @torch.no_grad()
    def renormalize(self) -> None:
        self.fc.weight.copy_(F.normalize(self.fc.weight, dim=1))

    # -- forward -------------------------------------------------------------------------------
    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """Scaled cosine logits (rows are unit-norm; the embedding is normalised here)."""
        cos: torch.Tensor = self.fc(F.normalize(emb, dim=1))
        return self.scale * cos

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        """CosFace loss: subtract s*m from the true class's logit, then cross-entropy."""
        margin = torch.zeros_like(logits).scatter_(1, labels.view(-1, 1), self.scale * self.margin)
        return F.cross_entropy(logits - margin, labels, reduction=reduction)

    # -- persistence ---------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "format": HEAD_FORMAT,
            "ids": list(self.ids),
            "weight": self.fc.weight.detach().clone(),
            "dim": self.dim,
            "scale": self.scale,
            "margin": self.margin,
            "seed": self.seed,
            "probed": self.probed,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], *, what: str = "head state") -> MarginHead:
        if not isinstance(state, dict) or state.get("format") != HEAD_FORMAT:
            raise HeadError(f"{what}: not a facefed head (format {HEAD_FORMAT})")
        ids, weight = list(state["ids"]), state["weight"]
        if tuple(weight.shape) != (len(ids), int(state["dim"])):
            raise HeadError(f"{what}: weight has shape {tuple(weight.shape)}, expected ({len(ids)}, {state['dim']})")
        head = cls(dim=int(state["dim"]), scale=state["scale"], margin=state["margin"], seed=state["seed"])
        for pid in ids:
            _check_id(pid)
        if len(set(ids)) != len(ids):
            raise HeadError(f"{what}: duplicate row ids")
        head._set_rows(ids, weight.float())
        head.probed = bool(state.get("probed", False))
        return head

    def save(self, path: str | os.PathLike[str]) -> None:
        buf = io.BytesIO()
        torch.save(self.state(), buf)
        atomic_write_bytes(Path(path), buf.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MarginHead:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:
            raise HeadError(f"{path}: not a readable head file ({e})") from e
        return cls.from_state(state, what=str(path))
