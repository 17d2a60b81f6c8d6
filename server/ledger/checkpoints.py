"""Global model checkpoints: one file per run and round, addressed by id, verified by sha256.

A checkpoint is written durably (temp file, fsync, rename, fsync of the directory) *before* the ledger
row that names it is committed, so a crash between the two leaves at most an orphan file that the
next attempt of the same round overwrites. Loading checks the file's sha256 against the ledger, so
a checkpoint that changed on disk is refused rather than trained on.

Ids are `<run_id>-r<round>` (round 0 is the run's base model), which keeps files and ledger rows
easy to match by eye and lets unlearning find "the checkpoint before round r" without a scan.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from facefed.common.calibration import preprocessing, provenance
from facefed.common.durable import fsync_dir
from facefed.common.errors import FacefedError
from facefed.common.model.mobilefacenet import MobileFaceNet, load_checkpoint, save_checkpoint, sha256_file
from facefed.server.ledger.db import CheckpointRow

RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,80}$")


class CheckpointCorrupt(FacefedError, RuntimeError):
    """A checkpoint file is missing or its sha256 differs from the ledger's; the message names it."""


def checkpoint_id(run_id: str, rnd: int) -> str:
    return f"{run_id}-r{rnd:04d}"


class CheckpointStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path_for(self, run_id: str, rnd: int) -> Path:
        if not RUN_ID_RE.match(run_id):
            raise ValueError(f"invalid run id {run_id!r}")
        if rnd < 0:
            raise ValueError(f"round must be >= 0, got {rnd}")
        return self.root / run_id / f"r{rnd:04d}.pt"

    def save(
        self,
        model: MobileFaceNet,
        *,
        run_id: str,
        rnd: int,
        parent: CheckpointRow | None,
        meta: dict[str, Any] | None = None,
        base_sha256: str | None = None,
        sites: dict[str, dict[str, Any]] | None = None,
    ) -> CheckpointRow:
        """Write the checkpoint with its preprocessing and provenance (common/calibration.py); `meta`
        may carry its decision threshold (`meta["threshold"]`); `sites`: name -> epsilon, delta, unit."""
        path = self.path_for(run_id, rnd)
        cid = checkpoint_id(run_id, rnd)
        full_meta = {
            "checkpoint_id": cid,
            "run_id": run_id,
            "round": rnd,
            "parent_id": parent.checkpoint_id if parent else None,
            "parent_sha256": parent.sha256 if parent else None,
            **(meta or {}),
            "preprocessing": preprocessing(),
            "provenance": provenance(
                run_id=run_id,
                round=rnd,
                parent_sha256=parent.sha256 if parent else None,
                base_sha256=base_sha256,
                sites=sites,
            ),
        }
        sha = save_checkpoint(path, model, full_meta)  # atomic: temp + fsync + rename
        fsync_dir(path.parent)
        return CheckpointRow(
            checkpoint_id=cid,
            run_id=run_id,
            round=rnd,
            path=str(path),
            sha256=sha,
            parent_id=parent.checkpoint_id if parent else None,
            created_at=time.time(),
        )

    def load(self, row: CheckpointRow) -> tuple[MobileFaceNet, dict[str, Any]]:
        path = Path(row.path)
        if row.deleted_at is not None:
            raise CheckpointCorrupt(f"checkpoint {row.checkpoint_id} was deleted ({row.deleted_reason})")
        if not path.is_file():
            raise CheckpointCorrupt(f"checkpoint {row.checkpoint_id}: file {path} is missing")
        actual = sha256_file(path)
        if actual != row.sha256:
            raise CheckpointCorrupt(
                f"checkpoint {row.checkpoint_id}: {path} has sha256 {actual[:16]}..., "
                f"the ledger recorded {row.sha256[:16]}...; refusing to use a changed file"
            )
        return load_checkpoint(path)

    def delete(self, row: CheckpointRow) -> bool:
        path = Path(row.path)
        existed = path.exists()
        path.unlink(missing_ok=True)
        if existed:
            fsync_dir(path.parent)
        return existed
