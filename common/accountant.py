"""A site's privacy ledger: the RDP accountant of the Poisson-subsampled Gaussian, kept on disk.

Every DP-SGD step a site has ever taken on its data is one (noise multiplier, sample rate) pair;
the file keeps the run-length history of them, so epsilon accumulates over rounds, runs and
unlearning replays instead of restarting with each process. Epsilon is computed with Opacus' RDP
analysis (Mironov et al. 2019) and converted to (epsilon, delta) at the site's fixed delta.

The unit (person / image) is fixed per file: a person-level and an image-level history cannot be
added up. A budget `max_epsilon` is checked *before* training (`plan`): a run that would exceed it
is refused with the planned and remaining epsilon, and nothing is changed. `record` persists after
the steps have actually been taken (atomic replace, under an exclusive lock).
"""

from __future__ import annotations

import fcntl
import functools
import json
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
from opacus.accountants.analysis import rdp as rdp_analysis

from facefed.common.durable import atomic_write_bytes
from facefed.common.errors import FacefedError

Unit = Literal["person", "image", "none"]
ACCOUNTANT = "rdp"
FORMAT = "facefed-accountant/1"
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [80, 128, 256]


class BudgetExceeded(FacefedError, RuntimeError):
    """Training would take the site past its epsilon budget; nothing was run or recorded."""

    def __init__(self, planned: float, spent: float, max_epsilon: float, delta: float, unit: str):
        self.planned, self.spent, self.max_epsilon = planned, spent, max_epsilon
        remaining = max(0.0, max_epsilon - spent)
        super().__init__(
            f"privacy budget exceeded: this training would bring the site to epsilon {planned:.3f} "
            f"(per {unit}, delta {delta:g}, RDP), over its budget max_epsilon {max_epsilon:g}; "
            f"spent so far {spent:.3f}, remaining {remaining:.3f}. Nothing was trained or recorded. "
            "Remedy: fewer steps, a lower sample rate or a larger noise multiplier, or (a policy decision) a larger budget."
        )


class AccountantMismatch(FacefedError, ValueError):
    """The state file was written for another unit or delta, or is not an accountant file."""


@dataclass(frozen=True)
class Event:
    noise_multiplier: float
    sample_rate: float
    steps: int
    label: str = ""
    at: str = ""


@functools.lru_cache(maxsize=1024)
def _rdp_per_step(q: float, sigma: float) -> npt.NDArray[np.float64]:
    """RDP of one subsampled Gaussian step at every order. Opacus computes it in 1-2 s (fractional
    orders); RDP composes additively, so n steps are n times this, and a site's history repeats a few
    (q, sigma) pairs: computing each once makes an epsilon query cheap. Callers must not mutate it."""
    out = np.asarray(rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=ORDERS), dtype=float)
    out.setflags(write=False)
    return out


def _rdp(history: list[tuple[float, float, int]]) -> npt.NDArray[np.float64] | float | None:
    history = [(s, q, n) for s, q, n in history if n > 0 and q > 0]
    if any(s <= 0 for s, _, _ in history):
        return None  # a noiseless step gives no guarantee at all
    return sum((n * _rdp_per_step(float(q), float(s)) for s, q, n in history), 0.0)


def _eps(rdp: npt.NDArray[np.float64] | float | None, delta: float) -> float:
    if rdp is None:
        return math.inf
    if isinstance(rdp, float) and rdp == 0.0:
        return 0.0
    eps, _ = rdp_analysis.get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)
    return float(eps)


def epsilon_of(history: list[tuple[float, float, int]], delta: float) -> float:
    """(epsilon at `delta`) of the composition of subsampled Gaussian mechanisms in `history`."""
    return _eps(_rdp(history), delta)


class SiteAccountant:
    def __init__(
        self,
        path: str | os.PathLike[str],
        delta: float,
        max_epsilon: float,
        unit: Unit = "person",
        *,
        required: bool = False,
    ):
        if unit not in ("person", "image", "none"):
            raise ValueError(f"accountant unit must be person, image or none, got {unit!r}")
        if not (0 < delta < 1):
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if not max_epsilon > 0:
            raise ValueError(f"max_epsilon must be > 0, got {max_epsilon}")
        self.path = Path(path)
        self.required = required  # a missing file is an error, never an empty history (epsilon 0)
        self.delta, self.max_epsilon, self.unit = float(delta), float(max_epsilon), unit
        self.accountant = ACCOUNTANT
        self._events = self._read()

    # -- file --------------------------------------------------------------------------------------
    @contextmanager
    def _lock(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _read(self) -> list[Event]:
        if not self.path.exists():
            if self.required:
                raise AccountantMismatch(
                    f"{self.path}: the privacy accountant is missing; the epsilon already spent is unknown "
                    "and is never read as 0: restore it from a backup"
                )
            return []
        try:
            data = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise AccountantMismatch(
                f"{self.path}: unreadable accountant state ({e}); it must not be deleted or edited by hand"
            ) from e
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise AccountantMismatch(f"{self.path}: not a facefed accountant file (format {FORMAT})")
        if data.get("unit") != self.unit:
            raise AccountantMismatch(
                f"{self.path}: the site's accountant counts per {data.get('unit')}, "
                f"this training is per {self.unit}; use one privacy unit per site"
            )
        if float(data.get("delta", -1)) != self.delta:
            raise AccountantMismatch(
                f"{self.path}: the site's accountant uses delta {data.get('delta')}, "
                f"the config says {self.delta}; delta is fixed per site"
            )
        return [Event(**e) for e in data.get("events", [])]

    def _write(self) -> None:
        data = {
            "format": FORMAT,
            "accountant": ACCOUNTANT,
            "unit": self.unit,
            "delta": self.delta,
            "events": [e.__dict__ for e in self._events],
        }
        atomic_write_bytes(self.path, json.dumps(data, indent=1).encode())

    def create(self) -> None:
        """Write an empty history if there is no file yet (a vault's first policy)."""
        with self._lock():
            if not self.path.exists():
                self._events = []
                self._write()

    # -- queries ---------------------------------------------------------------------------------
    def history(self) -> list[tuple[float, float, int]]:
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self._events]

    @property
    def steps(self) -> int:
        return sum(e.steps for e in self._events)

    def epsilon(self) -> float:
        """Epsilon spent so far (at this site's delta); inf once any noiseless step was recorded."""
        if self.unit == "none":
            return math.inf if self.steps else 0.0
        return epsilon_of(self.history(), self.delta)

    def projected(
        self, noise_multiplier: float, sample_rate: float, steps: int, *, extra: Sequence[tuple[float, float, int]] = ()
    ) -> float:
        """Epsilon after `steps` more steps and the `extra` releases (noise multiplier, rate, count)."""
        if self.unit == "none":
            return math.inf if (self.steps or steps or extra) else 0.0
        return epsilon_of(self.history() + list(extra) + [(noise_multiplier, sample_rate, steps)], self.delta)

    def plan(
        self, noise_multiplier: float, sample_rate: float, steps: int, *, extra: Sequence[tuple[float, float, int]] = ()
    ) -> float:
        """Projected epsilon after `steps` more steps (and `extra`); BudgetExceeded (changing nothing) if over budget."""
        self._events = self._read()  # another process (an earlier round) may have recorded since
        planned = self.projected(noise_multiplier, sample_rate, steps, extra=extra)
        if self.unit != "none" and planned > self.max_epsilon:
            raise BudgetExceeded(planned, self.epsilon(), self.max_epsilon, self.delta, self.unit)
        return planned

    def noise_for(
        self, target_epsilon: float, sample_rate: float, steps: int, *, extra: Sequence[tuple[float, float, int]] = ()
    ) -> float:
        """The smallest noise multiplier (to 0.1 %) such that after `steps` more steps (and the `extra`
        releases) epsilon <= target."""
        base = _rdp(self.history() + list(extra))
        if self.unit == "none" or base is None or target_epsilon <= _eps(base, self.delta):
            raise BudgetExceeded(target_epsilon, self.epsilon(), target_epsilon, self.delta, self.unit)

        def eps_at(sigma: float) -> float:
            return _eps(
                base + rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=steps, orders=ORDERS),
                self.delta,
            )

        lo, hi = 0.0, 1.0
        while eps_at(hi) > target_epsilon:
            lo, hi = hi, hi * 2
            if hi > 1e4:
                raise ValueError(
                    f"no noise multiplier reaches epsilon {target_epsilon} in {steps} steps at q={sample_rate}"
                )
        while hi - lo > 1e-3 * hi:
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if eps_at(mid) > target_epsilon else (lo, mid)
        return hi

    # -- recording -------------------------------------------------------------------------------
    def record(self, noise_multiplier: float, sample_rate: float, steps: int, label: str = "") -> float:
        """Persist `steps` steps taken (atomically, under a lock) and return the new epsilon."""
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if steps == 0:
            return self.epsilon()
        with self._lock():
            self._events = self._read()
            self._events.append(
                Event(
                    float(noise_multiplier),
                    float(sample_rate),
                    int(steps),
                    label,
                    datetime.now(UTC).isoformat(timespec="seconds"),
                )
            )
            self._write()
        return self.epsilon()
