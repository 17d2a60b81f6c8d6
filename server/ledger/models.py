"""Names, not paths: which checkpoint(s) `evaluate --model` and `export --model` mean.

A name is `current` (the model a site or user should use now: the best live checkpoint on the
validation pairs of the newest live run, server/ledger/best.py; a sharded job's shard models together;
`best` is the same), `latest` (the newest live run's last committed round, better or not), a run id
(its latest live model: a run replaced by an unlearning replay resolves to the replay's), a checkpoint
id (as `status` prints it), or a path to a checkpoint file. A deleted checkpoint is never served: it
is refused with its reason and the current model's id.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from facefed.common.errors import FacefedError
from facefed.server.ledger.db import CheckpointRow, Ledger, LedgerError, RunRow

CURRENT, BEST, LATEST = "current", "best", "latest"
NAMES = (CURRENT, BEST, LATEST)
LIVE = ("completed", "running", "stopped")


class ModelNotFound(FacefedError, LookupError):
    """A model name that names nothing usable; the message says what exists."""


@dataclass(frozen=True)
class Resolved:
    """What a name resolved to: checkpoint rows (several: a sharded job's shard models) or a file."""

    name: str
    rows: list[CheckpointRow]
    file: Path | None = None

    @property
    def paths(self) -> list[Path]:
        return [self.file] if self.file is not None else [Path(r.path) for r in self.rows]

    @property
    def ids(self) -> list[str]:
        return [r.checkpoint_id for r in self.rows] if self.rows else [str(self.file)]


def _latest_replay(ledger: Ledger, run: RunRow) -> RunRow:
    runs = ledger.runs()
    while run.status == "superseded":
        nxt = [r for r in runs if r.parent_run_id == run.run_id and r.kind == "replay"]
        if not nxt:
            break
        run = nxt[-1]
    return run


def _head(ledger: Ledger, run: RunRow) -> CheckpointRow:
    _, row = ledger.head(run.run_id)
    return row


def _best(ledger: Ledger, run: RunRow) -> CheckpointRow:
    return ledger.best(run.run_id) or _head(ledger, run)


def _newest(ledger: Ledger) -> list[RunRow]:
    """The newest live run with a committed round (a sharded job: each shard's live run), [] if none."""
    runs = [r for r in ledger.runs() if r.status in LIVE and ledger.head(r.run_id)[0] > 0]
    if not runs:
        return []
    newest = max(runs, key=lambda r: r.created_at)
    if newest.family:
        shards = sorted({r.shard for r in ledger.runs() if r.family == newest.family})
        live = [ledger.live_run(newest.family, k) for k in shards]
        if all(r is not None for r in live):
            return [r for r in live if r is not None]
    return [newest]


def current(ledger: Ledger) -> list[CheckpointRow]:
    """The model to serve: the newest live run's best live checkpoint on validation (a sharded job:
    every shard run's best), [] if there is none."""
    return [_best(ledger, r) for r in _newest(ledger)]


def latest(ledger: Ledger) -> list[CheckpointRow]:
    """The newest live run's last committed checkpoint (a sharded job: every shard run's), [] if none."""
    return [_head(ledger, r) for r in _newest(ledger)]


def resolve(ledger: Ledger | None, name: str) -> Resolved:
    """`current`/`best`, `latest`, a run id, a checkpoint id, or a file path (see the module docstring)."""
    path = Path(name).expanduser()
    if ledger is None or (name not in NAMES and path.is_file()):
        if path.is_file():
            return Resolved(name, [], path)
        raise ModelNotFound(
            f"model {name!r} is not a file; to name a checkpoint id, a run id, `current` or `latest`, pass --state DIR"
        )
    now = current(ledger)
    hint = f"the current model is {', '.join(r.checkpoint_id for r in now)}" if now else "no run has a model yet"
    if name in NAMES:
        if not now:
            raise ModelNotFound(f"no current model: {hint}; train a run first")
        return Resolved(name, latest(ledger) if name == LATEST else now)
    runs = {r.run_id: r for r in ledger.runs()}
    if name in runs:
        run = _latest_replay(ledger, runs[name])
        if run.family and run.status in LIVE:
            members = [r for r in runs.values() if r.family == run.family and r.status in LIVE]
            if len(members) > 1 and run.run_id == run.family:
                return Resolved(name, [_head(ledger, r) for r in sorted(members, key=lambda r: r.shard)])
        return Resolved(name, [_head(ledger, run)])
    family = [r for r in runs.values() if r.family == name and r.status in LIVE]
    if family:
        return Resolved(name, [_head(ledger, r) for r in sorted(family, key=lambda r: r.shard)])
    try:
        row = ledger.checkpoint(name)
    except LedgerError:
        raise ModelNotFound(
            f"model {name!r} is neither `current`, `latest`, a run id, a checkpoint id nor a file; "
            f"`facefed-server runs ls --state DIR` lists them ({hint})"
        ) from None
    if row.deleted_at is not None:
        raise ModelNotFound(f"checkpoint {name} was deleted ({row.deleted_reason}); {hint}")
    return Resolved(name, [row])
