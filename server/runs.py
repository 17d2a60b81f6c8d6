"""What a run is while a ServerApp works on it: its context, the per-run lock, and the run's failure.

`RunContext` names the ledger run being trained and its configuration; the round loop and the
unlearning replays are handed one explicitly (a replay is another context, not another server).
"""

from __future__ import annotations

import fcntl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from facefed.common.errors import FacefedError
from facefed.common.fedconfig import FederationConfig
from facefed.server.state import StatePaths

RUN_LOCK_WAIT_S = 60.0


class RunFailed(FacefedError, RuntimeError):
    """The run cannot go on (a round failed max_round_attempts times, or no sites); the ledger says why."""


@dataclass(frozen=True)
class RunContext:
    """The ledger run a round loop works on, with that run's configuration (with shards: the job's
    id `family` and this run's `shard`)."""

    run_id: str
    config: FederationConfig
    family: str | None = None
    shard: int = 0


@contextmanager
def run_lock(
    paths: StatePaths, run_id: str, *, wait_s: float = RUN_LOCK_WAIT_S, log: Callable[[str], None] = print
) -> Iterator[None]:
    """One ServerApp per ledger run, so two never interleave rounds. The holder may be the previous
    attempt's ServerApp, still shutting down after its SuperLink was killed (Flower interrupts it only
    when it notices its SuperExec is gone, seconds later): wait for it a bounded time, then fail."""
    lock_dir = paths.root / "locks"
    lock_dir.mkdir(exist_ok=True)
    with open(lock_dir / f"{run_id}.lock", "a+") as f:
        deadline, told = time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise RunFailed(
                        f"run {run_id} is being trained by another ServerApp (waited {wait_s:.0f} s); "
                        f"stop it or wait for it to end"
                    ) from None
                if not told:
                    log(
                        f"[facefed] run {run_id} is held by another ServerApp (a previous attempt shutting "
                        f"down?); waiting up to {wait_s:.0f} s"
                    )
                    told = True
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
