"""The site's contribution log: for every person, the runs and rounds in which their images were used.

Exact unlearning needs, for a person to forget, the earliest round that saw their data, so the model
can be rolled back to the checkpoint before it and the later rounds replayed without them. The server
never learns who is at a site, so this log lives at the site only (`STATE/contributions.sqlite`,
never sent), keyed by the vault's random pseudonym, never the operator's person id (issue 11: the id
stays in the vault's manifest only, so erasing the manifest row unlinks every other record).

One row per (person, run, round, attempt). A person counts as *present* in a round when their
images were in the training set of that call (they could have been sampled: Poisson sampling gives
every enrolled person the chance, and that chance is what the DP guarantee is about), and as
*sampled* when at least one of their images actually entered a gradient step. Attempts are kept
apart because a round the server did not commit still consumed privacy budget and still released an
update; unlearning can rely on `present` to be conservative.
Writes are idempotent (a retried ClientApp rewrites the same rows).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from facefed.common import sqlite
from facefed.common.durable import immediate

_SCHEMA = """
CREATE TABLE IF NOT EXISTS contributions (
    pseudonym         TEXT NOT NULL,
    run_id            TEXT NOT NULL,
    round             INTEGER NOT NULL,
    attempt           INTEGER NOT NULL,
    images            INTEGER NOT NULL,
    sampled           INTEGER NOT NULL,
    parent_checkpoint TEXT NOT NULL,
    head_file         TEXT,
    recorded_at       REAL NOT NULL,
    PRIMARY KEY (pseudonym, run_id, round, attempt)
);
CREATE INDEX IF NOT EXISTS contributions_round ON contributions(run_id, round);
"""


@dataclass(frozen=True)
class Contribution:
    pseudonym: str
    run_id: str
    round: int
    attempt: int
    images: int
    sampled: bool
    parent_checkpoint: str
    head_file: str | None
    recorded_at: float


class ContributionLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite.connect(self.path, journal="WAL", rows=True)
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ContributionLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def record(
        self,
        *,
        run_id: str,
        rnd: int,
        attempt: int,
        parent_checkpoint: str,
        images: dict[str, int],
        sampled: Iterable[str],
        head_file: str | None,
    ) -> int:
        """Record every person (by pseudonym) present in one training call; returns the number of rows written."""
        sampled = set(sampled)
        unknown = sampled - images.keys()
        if unknown:
            raise ValueError(f"sampled person {sorted(unknown)[0]!r} was not in the training set")
        now = time.time()
        with immediate(self._db):
            self._db.executemany(
                "INSERT OR REPLACE INTO contributions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (pid, run_id, rnd, attempt, n, int(pid in sampled), parent_checkpoint, head_file, now)
                    for pid, n in sorted(images.items())
                ],
            )
        return len(images)

    def of_person(self, pseudonym: str) -> list[Contribution]:
        rows = self._db.execute(
            "SELECT * FROM contributions WHERE pseudonym = ? ORDER BY run_id, round, attempt", (pseudonym,)
        ).fetchall()
        return [self._row(r) for r in rows]

    def first_round(self, pseudonym: str, run_id: str) -> int | None:
        """The earliest round of `run_id` in which the person was present (None if never)."""
        row = self._db.execute(
            "SELECT MIN(round) FROM contributions WHERE pseudonym = ? AND run_id = ?", (pseudonym, run_id)
        ).fetchone()
        return row[0]

    def people_in(self, run_id: str, rnd: int) -> list[str]:
        return [
            r[0]
            for r in self._db.execute(
                "SELECT DISTINCT pseudonym FROM contributions WHERE run_id = ? AND round = ? ORDER BY pseudonym",
                (run_id, rnd),
            )
        ]

    def forget(self, pseudonym: str) -> int:
        """Drop a forgotten person's rows (after unlearning has used them); returns how many."""
        cur = self._db.execute("DELETE FROM contributions WHERE pseudonym = ?", (pseudonym,))
        return cur.rowcount

    @staticmethod
    def _row(r: sqlite3.Row) -> Contribution:
        d = dict(r)
        d["sampled"] = bool(d["sampled"])
        d["round"] = d.pop("round")
        return Contribution(**d)
