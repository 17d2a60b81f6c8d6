"""Exact unlearning by rollback and replay: which runs a forget request taints, and where to restart.

A checkpoint is *tainted* by a request when the person was present at a site in a round of that
checkpoint's run at or before the checkpoint's round: the site's update for that round was computed
with them in its data (under Poisson sampling their mere presence changes the distribution of the
update), and every later model of the run descends from it. Each site reports, per run, the rounds
the person was present in (client/forget/contributions.py; failed attempts are counted too, which can only
make the rollback earlier, never wrong).

For each live run (not superseded) whose current model is tainted, the plan is:
  rollback   the newest checkpoint on the run's lineage that no pending request taints;
  replay     a new run (`kind = 'replay'`) from the rollback checkpoint through the rounds the
             tainted run had committed, with the same configuration (the sites draw fresh DP
             randomness, so the replay is an independent release); the sites' heads
             restart from the heads of the rollback round (the person's row is already gone from
             them) and the person's data is already erased, so the replay cannot see them;
  tainted    the tainted run's checkpoints after the rollback: deleted once the replay is done
             (they are personal data too), and the sites' head files of those rounds.
Requests pending together share one replay per tainted run. Round numbers stay those of the
original lineage, so a replay's round r replaces the tainted run's round r.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from facefed.server.ledger.db import CheckpointRow, ForgetRow, Ledger, RunRow


@dataclass(frozen=True)
class ReplayPlan:
    run: RunRow  # the tainted run the replay replaces
    done: int  # its last committed round: the replay goes at least this far
    rollback: CheckpointRow
    tainted: list[CheckpointRow]  # on its lineage after the rollback, oldest first
    requests: list[ForgetRow]

    @property
    def rounds(self) -> list[int]:
        return list(range(self.rollback.round + 1, self.done + 1))


def taints(req: ForgetRow, ckpt: CheckpointRow) -> bool:
    rounds = req.contributions.get(ckpt.run_id or "", [])
    return ckpt.round >= 1 and any(r <= ckpt.round for r in rounds)


def plan_replays(ledger: Ledger, requests: list[ForgetRow]) -> list[ReplayPlan]:
    plans = []
    for run in ledger.runs():
        if run.status == "superseded":
            continue
        done, head = ledger.head(run.run_id)
        if done <= run.start_round:
            continue  # nothing trained in this run yet: its base is clean (pretrained or a rollback)
        lineage = list(reversed(ledger.lineage(head.checkpoint_id)))  # oldest first
        hit = [any(taints(r, c) for r in requests) for c in lineage]
        if not any(hit):
            continue
        first = hit.index(True)
        if first == 0:
            raise RuntimeError(
                f"run {run.run_id}: the root of its lineage ({lineage[0].checkpoint_id}) is tainted; "
                f"a base model must never hold site data"
            )
        mine = [r for r in requests if any(taints(r, c) for c in lineage[first:])]
        plans.append(
            ReplayPlan(run=run, done=done, rollback=lineage[first - 1], tainted=lineage[first:], requests=mine)
        )
    return plans


def replay_run_id(ledger: Ledger, run: RunRow) -> str:
    """`<root run>-u<n>`: replays of replays keep one suffix, so ids stay short and readable."""
    root = run
    while root.kind == "replay" and root.parent_run_id:
        root = ledger.run(root.parent_run_id)
    n = 1 + sum(1 for r in ledger.runs() if r.kind == "replay" and r.run_id.startswith(root.run_id + "-u"))
    return f"{root.run_id[:72]}-u{n}"


def tainted_of(ledger: Ledger, replay: RunRow) -> list[CheckpointRow]:
    """The replaced run's checkpoints after the replay's rollback (recomputed from the ledger, so a
    server that dies between replay and deletion finds them again)."""
    if replay.parent_run_id is None:
        return []
    _, head = ledger.head(replay.parent_run_id)
    lineage = ledger.lineage(head.checkpoint_id)
    keep = {c.checkpoint_id for c in ledger.lineage(replay.base_checkpoint)}
    return [c for c in reversed(lineage) if c.checkpoint_id not in keep]


def deletion_reason(requests: list[str], replay_run: str) -> str:
    return (
        f"unlearning: carries the influence of forget request(s) {', '.join(requests)}; "
        f"replaced by replay run {replay_run} at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"
    )
