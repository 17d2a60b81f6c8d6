"""The federation ledger (SQLite): what was trained, from what, by whom, with what privacy cost.

It is the source of truth for resuming, for exact unlearning (server/forget/) and for receipts:
- `runs`: one row per training run (our id, not Flower's: a run survives server restarts and is
  worked on by one or more Flower runs, listed in `attempts`), with its frozen configuration.
- `checkpoints`: every global model file: run, round, sha256 and the parent it was trained from, so
  any checkpoint's lineage can be walked back to the run's base. Deleting a checkpoint (unlearning)
  keeps the row and records when and why.
- `rounds`: one row per round attempt: time, participating and missing sites, aggregated metrics,
  parent and resulting checkpoint. At most one *committed* attempt per (run, round) (unique index):
  a round counts only when its checkpoint file is on disk and this row is committed, in that order.
  Attempts that timed out with too few sites are kept as `failed`.
- `site_rounds`: per site and round attempt: status (ok / missing / error / rejected), the weight it
  got, people and images used, its epsilon with unit, delta and accountant, compute time, bytes each
  way, and the array keys the server received from it (evidence that no head left the site).
- `sites`: registered site names, node key fingerprints, Flower node ids, revocation time.
- `forget_requests`: deletion requests the sites reported (pseudonym only, never the person id),
  where the person's data was used, and how each was unlearned: the replay run, the rollback
  checkpoint, the first model without them, the checkpoints deleted, the signed receipt and when it
  reached the site. A replay run is an ordinary run (`kind = 'replay'`) whose base is the rollback
  checkpoint and whose rounds start after it (`start_round`); the run it replaces is `superseded`.
- `runs.best_checkpoint`: the run's best live checkpoint on the validation pairs (server/ledger/best.py),
  what `current` serves; kept in the same transaction as every change that can move it (a committed
  round, a base model's scores, a new run, a deleted checkpoint). Schema 2 added it; a schema-1
  ledger is migrated when opened (the best of an unscored run is its latest checkpoint).

WAL mode lets `facefed-server status` read while the ServerApp writes.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facefed.common.durable import immediate
from facefed.common.errors import FacefedError
from facefed.common.sqlite import SchemaError, check_version, connect, user_version
from facefed.server.ledger.best import Score, Worse, score

SCHEMA_VERSION = 2  # 2: runs.best_checkpoint

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sites (
    name          TEXT PRIMARY KEY,
    fingerprint   TEXT NOT NULL,
    public_key    TEXT NOT NULL,
    node_id       TEXT,
    registered_at REAL NOT NULL,
    revoked_at    REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS sites_active_fp ON sites(fingerprint) WHERE revoked_at IS NULL;

CREATE TABLE IF NOT EXISTS runs (
    run_id          TEXT PRIMARY KEY,
    kind            TEXT NOT NULL DEFAULT 'train' CHECK (kind IN ('train', 'replay')),
    parent_run_id   TEXT,
    created_at      REAL NOT NULL,
    ended_at        REAL,
    status          TEXT NOT NULL CHECK (status IN ('running', 'completed', 'failed', 'stopped', 'superseded')),
    rounds_planned  INTEGER NOT NULL,
    config_sha256   TEXT NOT NULL,
    config_json     TEXT NOT NULL,
    base_checkpoint TEXT NOT NULL,
    base_metrics    TEXT,
    detail          TEXT,
    start_round     INTEGER NOT NULL DEFAULT 0,  -- the base checkpoint's round (a replay starts mid-lineage)
    family          TEXT,                        -- the training job: its shard runs and their replays
    shard           INTEGER NOT NULL DEFAULT 0,  -- SISA shard this run trains (0 of 1 without shards)
    best_checkpoint TEXT                         -- best live checkpoint on validation (server/ledger/best.py)
);

CREATE TABLE IF NOT EXISTS queries (      -- each site's answer (or not) to each forget `query`
    site        TEXT NOT NULL,
    at          REAL NOT NULL,
    ok          INTEGER NOT NULL,
    pending     INTEGER NOT NULL DEFAULT 0,
    detail      TEXT
);

CREATE TABLE IF NOT EXISTS ensembles (
    family      TEXT NOT NULL,
    created_at  REAL NOT NULL,
    checkpoints TEXT NOT NULL,  -- JSON list: the shard models, in shard order
    metrics     TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS attempts (
    run_id      TEXT NOT NULL REFERENCES runs(run_id),
    flwr_run_id TEXT NOT NULL,
    started_at  REAL NOT NULL,
    ended_at    REAL,
    outcome     TEXT,
    PRIMARY KEY (run_id, flwr_run_id)
);

CREATE TABLE IF NOT EXISTS checkpoints (
    checkpoint_id  TEXT PRIMARY KEY,
    run_id         TEXT,
    round          INTEGER NOT NULL,
    path           TEXT NOT NULL,
    sha256         TEXT NOT NULL,
    parent_id      TEXT REFERENCES checkpoints(checkpoint_id),
    created_at     REAL NOT NULL,
    deleted_at     REAL,
    deleted_reason TEXT
);

CREATE TABLE IF NOT EXISTS rounds (
    run_id               TEXT NOT NULL REFERENCES runs(run_id),
    round                INTEGER NOT NULL,
    attempt              INTEGER NOT NULL,
    status               TEXT NOT NULL CHECK (status IN ('committed', 'failed')),
    flwr_run_id          TEXT,
    started_at           REAL NOT NULL,
    ended_at             REAL NOT NULL,
    parent_checkpoint    TEXT NOT NULL REFERENCES checkpoints(checkpoint_id),
    parent_sha256        TEXT NOT NULL,
    checkpoint_id        TEXT REFERENCES checkpoints(checkpoint_id),
    checkpoint_sha256    TEXT,
    participants         TEXT NOT NULL,
    missing              TEXT NOT NULL,
    weighting            TEXT NOT NULL,
    total_weight         REAL NOT NULL,
    metrics              TEXT NOT NULL,
    detail               TEXT,
    PRIMARY KEY (run_id, round, attempt)
);
CREATE UNIQUE INDEX IF NOT EXISTS rounds_one_commit ON rounds(run_id, round) WHERE status = 'committed';

CREATE TABLE IF NOT EXISTS site_rounds (
    run_id        TEXT NOT NULL,
    round         INTEGER NOT NULL,
    attempt       INTEGER NOT NULL,
    site          TEXT NOT NULL,
    node_id       TEXT,
    status        TEXT NOT NULL CHECK (status IN ('ok', 'missing', 'error', 'rejected')),
    weight        REAL NOT NULL DEFAULT 0,
    people        INTEGER,
    images        INTEGER,
    steps         INTEGER,
    loss          REAL,
    epsilon       REAL,
    delta         REAL,
    unit          TEXT,
    accountant    TEXT,
    compute_s     REAL,
    bytes_down    INTEGER,
    bytes_up      INTEGER,
    received_keys TEXT,
    detail        TEXT,
    PRIMARY KEY (run_id, round, attempt, site)
);

CREATE TABLE IF NOT EXISTS forget_requests (
    request_id        TEXT PRIMARY KEY,
    site              TEXT NOT NULL,
    pseudonym         TEXT NOT NULL,
    received_at       REAL NOT NULL,
    erased_at         REAL NOT NULL,
    shares_destroyed  INTEGER NOT NULL,
    contributions     TEXT NOT NULL,        -- JSON {run_id: [rounds the person was present in]}
    reported_at       REAL NOT NULL,
    status            TEXT NOT NULL CHECK (status IN ('pending', 'replaying', 'unlearned', 'refused')),
    replay_run_id     TEXT,
    rollback_checkpoint TEXT,
    model_checkpoint  TEXT,
    model_sha256      TEXT,
    checkpoints_deleted TEXT,               -- JSON list of checkpoint ids
    receipt           TEXT,                 -- the signed receipt (JSON)
    delivered_at      REAL,
    detail            TEXT
);
"""


class LedgerError(FacefedError, RuntimeError):
    """A ledger operation that would break an invariant (e.g. committing a round twice)."""


def _now() -> float:
    return time.time()


# -- records ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SiteRow:
    name: str
    fingerprint: str
    public_key: str
    node_id: str | None
    registered_at: float
    revoked_at: float | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True)
class RunRow:
    run_id: str
    kind: str
    parent_run_id: str | None
    created_at: float
    ended_at: float | None
    status: str
    rounds_planned: int
    config_sha256: str
    config_json: str
    base_checkpoint: str
    base_metrics: dict[str, Any] | None
    detail: str | None
    start_round: int = 0
    family: str | None = None
    shard: int = 0
    best_checkpoint: str | None = None


@dataclass(frozen=True)
class CheckpointRow:
    checkpoint_id: str
    run_id: str | None
    round: int
    path: str
    sha256: str
    parent_id: str | None
    created_at: float
    deleted_at: float | None = None
    deleted_reason: str | None = None


REFUSED = "refused ("  # a SiteRound's detail for a site that refused: "refused (KIND): REASON"


def refusal_line(site: str, detail: str | None) -> str | None:
    """`site NAME refused (KIND): REASON` for a site-round detail that records a refusal, else None."""
    if not detail or not detail.startswith(REFUSED):
        return None
    return f"site {site} {detail}"


@dataclass(frozen=True)
class SiteRound:
    """One site's part in one round attempt."""

    site: str
    status: str  # ok | missing | error | rejected
    node_id: str | None = None
    weight: float = 0.0
    people: int | None = None
    images: int | None = None
    steps: int | None = None
    loss: float | None = None
    epsilon: float | None = None
    delta: float | None = None
    unit: str | None = None
    accountant: str | None = None
    compute_s: float | None = None
    bytes_down: int | None = None
    bytes_up: int | None = None
    received_keys: list[str] | None = None
    detail: str | None = None


@dataclass(frozen=True)
class RoundRow:
    run_id: str
    round: int
    attempt: int
    status: str
    flwr_run_id: str | None
    started_at: float
    ended_at: float
    parent_checkpoint: str
    parent_sha256: str
    checkpoint_id: str | None
    checkpoint_sha256: str | None
    participants: list[str]
    missing: list[str]
    weighting: str
    total_weight: float
    metrics: dict[str, Any]
    detail: str | None
    sites: list[SiteRound] = field(default_factory=list)


@dataclass(frozen=True)
class ForgetRow:
    request_id: str
    site: str
    pseudonym: str
    received_at: float
    erased_at: float
    shares_destroyed: int
    contributions: dict[str, list[int]]  # run id -> rounds the person was present in (any attempt)
    reported_at: float = 0.0
    status: str = "pending"
    replay_run_id: str | None = None
    rollback_checkpoint: str | None = None
    model_checkpoint: str | None = None
    model_sha256: str | None = None
    checkpoints_deleted: list[str] = field(default_factory=list)
    receipt: dict[str, Any] | None = None
    delivered_at: float | None = None
    detail: str | None = None

    @classmethod
    def of(cls, row: sqlite3.Row) -> ForgetRow:
        d = dict(row)
        d["contributions"] = json.loads(d["contributions"])
        d["checkpoints_deleted"] = json.loads(d["checkpoints_deleted"]) if d["checkpoints_deleted"] else []
        d["receipt"] = json.loads(d["receipt"]) if d["receipt"] else None
        return cls(**d)


# -- the ledger -----------------------------------------------------------------------------------
class Ledger:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = connect(self.path, journal="WAL", foreign_keys=True, rows=True)
        try:
            if user_version(self._db) == 0:  # a new file: the (idempotent) DDL first, then the version stamp
                self._db.executescript(_SCHEMA)  # executescript commits on its own
            if check_version(self._db, SCHEMA_VERSION, what="ledger", path=self.path) < SCHEMA_VERSION:
                self._migrate()
        except SchemaError as e:
            self._db.close()
            raise LedgerError(str(e)) from None
        except BaseException:
            self._db.close()
            raise

    def _migrate(self) -> None:
        """Bring an older ledger to SCHEMA_VERSION in one transaction (another process may have done it)."""
        with self._tx() as db:
            found = user_version(db)
            if found >= SCHEMA_VERSION:
                return
            if found < 2:  # 2: the runs' best checkpoint, computed from what the ledger already holds
                db.execute("ALTER TABLE runs ADD COLUMN best_checkpoint TEXT")
                for (run_id,) in db.execute("SELECT run_id FROM runs").fetchall():
                    self._refresh_best(db, run_id)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        return immediate(self._db)

    # -- sites --------------------------------------------------------------------------------
    def add_site(self, name: str, fingerprint: str, public_key: str, node_id: str | None) -> SiteRow:
        with self._tx() as db:
            current = db.execute("SELECT * FROM sites WHERE name = ?", (name,)).fetchone()
            if current and current["revoked_at"] is None:
                raise LedgerError(
                    f"site {name!r} is already registered (key {current['fingerprint']}); "
                    f"revoke it first with `facefed-server sites revoke {name}`"
                )
            other = db.execute(
                "SELECT name FROM sites WHERE fingerprint = ? AND revoked_at IS NULL", (fingerprint,)
            ).fetchone()
            if other:
                raise LedgerError(f"this key ({fingerprint}) is already registered for site {other['name']!r}")
            db.execute(
                "INSERT OR REPLACE INTO sites VALUES (?, ?, ?, ?, ?, NULL)",
                (name, fingerprint, public_key, node_id, _now()),
            )
        return self.site(name)

    def revoke_site(self, name: str) -> SiteRow:
        with self._tx() as db:
            cur = db.execute("UPDATE sites SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL", (_now(), name))
            if cur.rowcount == 0:
                raise LedgerError(f"no active site named {name!r}; see `facefed-server sites ls`")
        return self.site(name)

    def site(self, name: str) -> SiteRow:
        row = self._db.execute("SELECT * FROM sites WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise LedgerError(f"no site named {name!r}; see `facefed-server sites ls`")
        return SiteRow(**dict(row))

    def sites(self) -> list[SiteRow]:
        return [SiteRow(**dict(r)) for r in self._db.execute("SELECT * FROM sites ORDER BY name")]

    def site_by_fingerprint(self, fingerprint: str) -> SiteRow | None:
        row = self._db.execute(
            "SELECT * FROM sites WHERE fingerprint = ? AND revoked_at IS NULL", (fingerprint,)
        ).fetchone()
        return SiteRow(**dict(row)) if row else None

    # -- checkpoints --------------------------------------------------------------------------
    def add_checkpoint(self, row: CheckpointRow) -> None:
        """Record a checkpoint that is not a round's result (a run's base model)."""
        with self._tx() as db:
            existing = db.execute(
                "SELECT sha256 FROM checkpoints WHERE checkpoint_id = ?", (row.checkpoint_id,)
            ).fetchone()
            if existing:
                if existing["sha256"] != row.sha256:
                    raise LedgerError(f"checkpoint {row.checkpoint_id} already recorded with another sha256")
                return
            self._insert_checkpoint(db, row)

    @staticmethod
    def _insert_checkpoint(db: sqlite3.Connection, row: CheckpointRow) -> None:
        db.execute(
            "INSERT INTO checkpoints VALUES (?, ?, ?, ?, ?, ?, ?, NULL, NULL)",
            (row.checkpoint_id, row.run_id, row.round, row.path, row.sha256, row.parent_id, row.created_at),
        )

    def checkpoint(self, checkpoint_id: str) -> CheckpointRow:
        row = self._db.execute("SELECT * FROM checkpoints WHERE checkpoint_id = ?", (checkpoint_id,)).fetchone()
        if row is None:
            raise LedgerError(f"no checkpoint {checkpoint_id!r} in {self.path}")
        return CheckpointRow(**dict(row))

    def lineage(self, checkpoint_id: str) -> list[CheckpointRow]:
        """The checkpoint and its ancestors, newest first, back to a root (no parent)."""
        out: list[CheckpointRow] = []
        seen: set[str] = set()
        cur: str | None = checkpoint_id
        while cur is not None and cur not in seen:
            seen.add(cur)
            row = self.checkpoint(cur)
            out.append(row)
            cur = row.parent_id
        return out

    def mark_checkpoint_deleted(self, checkpoint_id: str, reason: str) -> None:
        """Record a deleted checkpoint; a run whose best it was gets its best among the live ones."""
        with self._tx() as db:
            db.execute(
                "UPDATE checkpoints SET deleted_at = ?, deleted_reason = ? WHERE checkpoint_id = ?",
                (_now(), reason, checkpoint_id),
            )
            for (run_id,) in db.execute(
                "SELECT run_id FROM runs WHERE best_checkpoint = ?", (checkpoint_id,)
            ).fetchall():
                self._refresh_best(db, run_id)

    # -- model selection (server/ledger/best.py) ----------------------------------------------
    def checkpoint_score(self, checkpoint_id: str) -> Score | None:
        """The checkpoint's validation score: from the round that made it, or (a base model) from the
        evaluation of the run it is the base of; None if it was not scored."""
        row = self._db.execute(
            "SELECT metrics FROM rounds WHERE checkpoint_id = ? AND status = 'committed'", (checkpoint_id,)
        ).fetchone()
        if row is not None:
            return score(json.loads(row["metrics"]))
        for (metrics,) in self._db.execute(
            "SELECT base_metrics FROM runs WHERE base_checkpoint = ? AND base_metrics IS NOT NULL ORDER BY created_at",
            (checkpoint_id,),
        ):
            found = score(json.loads(metrics))
            if found is not None:
                return found
        return None

    def best_of(self, checkpoint_id: str) -> CheckpointRow | None:
        """The best live checkpoint on `checkpoint_id`'s lineage (itself included) by validation score,
        ties to the newer; with none scored, the newest live one (None: every one was deleted)."""
        live = [c for c in self.lineage(checkpoint_id) if c.deleted_at is None]  # newest first
        scored = [(s, c) for c in live if (s := self.checkpoint_score(c.checkpoint_id)) is not None]
        if scored:
            return max(scored, key=lambda sc: (sc[0], sc[1].round))[1]
        return live[0] if live else None

    def best(self, run_id: str) -> CheckpointRow | None:
        """The run's best live checkpoint: the ledger's mark (`runs.best_checkpoint`)."""
        run = self.run(run_id)
        if run.best_checkpoint is not None:
            row = self.checkpoint(run.best_checkpoint)
            if row.deleted_at is None:
                return row
        return self.best_of(self.head(run_id)[1].checkpoint_id)

    def _refresh_best(self, db: sqlite3.Connection, run_id: str) -> None:
        best = self.best_of(self.head(run_id)[1].checkpoint_id)
        db.execute(
            "UPDATE runs SET best_checkpoint = ? WHERE run_id = ?", (best.checkpoint_id if best else None, run_id)
        )

    def worse_than(self, row: RoundRow) -> Worse | None:
        """Whether a committed round scored below the best checkpoint before it (on its parent's
        lineage) on validation; None if it did not, or either was not scored."""
        if row.status != "committed":
            return None
        now = score(row.metrics)
        before = self.best_of(row.parent_checkpoint)
        was = self.checkpoint_score(before.checkpoint_id) if before else None
        if now is None or before is None or was is None or now >= was:
            return None
        return Worse(row.round, now, before.checkpoint_id, was)

    # -- runs ---------------------------------------------------------------------------------
    def create_run(
        self,
        run_id: str,
        *,
        config_json: str,
        config_sha256: str,
        rounds: int,
        base: CheckpointRow,
        kind: str = "train",
        parent_run_id: str | None = None,
        family: str | None = None,
        shard: int = 0,
    ) -> RunRow:
        with self._tx() as db:
            if (
                db.execute("SELECT 1 FROM checkpoints WHERE checkpoint_id = ?", (base.checkpoint_id,)).fetchone()
                is None
            ):
                self._insert_checkpoint(db, base)
            db.execute(
                "INSERT INTO runs VALUES (?, ?, ?, ?, NULL, 'running', ?, ?, ?, ?, NULL, NULL, ?, ?, ?, NULL)",
                (
                    run_id,
                    kind,
                    parent_run_id,
                    _now(),
                    rounds,
                    config_sha256,
                    config_json,
                    base.checkpoint_id,
                    base.round if kind == "replay" else 0,
                    family or run_id,
                    shard,
                ),
            )
            self._refresh_best(db, run_id)  # a replay starts from its rollback's lineage
        return self.run(run_id)

    @staticmethod
    def _run_row(row: sqlite3.Row) -> RunRow:
        d = dict(row)
        d["base_metrics"] = json.loads(d["base_metrics"]) if d["base_metrics"] else None
        return RunRow(**d)

    def run(self, run_id: str) -> RunRow:
        row = self._db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise LedgerError(f"no run {run_id!r} in {self.path}; see `facefed-server status`")
        return self._run_row(row)

    def runs(self) -> list[RunRow]:
        return [self._run_row(r) for r in self._db.execute("SELECT * FROM runs ORDER BY created_at")]

    def live_run(self, family: str, shard: int) -> RunRow | None:
        """The newest run of this job and shard that no replay replaced."""
        row = self._db.execute(
            "SELECT * FROM runs WHERE family = ? AND shard = ? AND status != 'superseded' "
            "ORDER BY created_at DESC LIMIT 1",
            (family, shard),
        ).fetchone()
        return self._run_row(row) if row else None

    def resumable_family(self, config_sha256: str, shards: int) -> str | None:
        """The newest sharded job with this configuration that has a shard not yet completed."""
        rows = self._db.execute(
            "SELECT DISTINCT family FROM runs WHERE config_sha256 = ? ORDER BY created_at DESC", (config_sha256,)
        ).fetchall()
        for (family,) in rows:
            live = [self.live_run(family, k) for k in range(shards)]
            if any(r is None or r.status != "completed" for r in live):
                return str(family)
        return None

    def record_query(self, site: str, ok: bool, pending: int = 0, detail: str | None = None) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO queries VALUES (?, ?, ?, ?, ?)", (site, _now(), int(ok), pending, detail))

    def queries_since(self, t: float) -> list[dict[str, Any]]:
        return [dict[str, Any](r) for r in self._db.execute("SELECT * FROM queries WHERE at >= ? ORDER BY at", (t,))]

    def record_ensemble(self, family: str, checkpoints: list[str], metrics: dict[str, Any]) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO ensembles VALUES (?, ?, ?, ?)",
                (family, _now(), json.dumps(checkpoints), json.dumps(metrics)),
            )

    def ensembles(self, family: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM ensembles" + (" WHERE family = ?" if family else "") + " ORDER BY created_at"
        return [
            {**dict(r), "checkpoints": json.loads(r["checkpoints"]), "metrics": json.loads(r["metrics"])}
            for r in self._db.execute(sql, (family,) if family else ())
        ]

    def set_base_metrics(self, run_id: str, metrics: dict[str, Any]) -> None:
        """Evaluation of the run's base model (round 0), the reference for every later round."""
        with self._tx() as db:
            db.execute("UPDATE runs SET base_metrics = ? WHERE run_id = ?", (json.dumps(metrics), run_id))
            self._refresh_best(db, run_id)

    def resumable_run(self, config_sha256: str) -> RunRow | None:
        """The newest unfinished run (running, or failed/stopped part-way) with this exact configuration."""
        row = self._db.execute(
            "SELECT * FROM runs WHERE config_sha256 = ? AND status NOT IN ('completed', 'superseded') "
            "ORDER BY created_at DESC LIMIT 1",
            (config_sha256,),
        ).fetchone()
        return self._run_row(row) if row else None

    def set_run_status(self, run_id: str, status: str, detail: str | None = None) -> None:
        ended = _now() if status in ("completed", "failed", "stopped", "superseded") else None
        with self._tx() as db:
            db.execute(
                "UPDATE runs SET status = ?, detail = ?, ended_at = ? WHERE run_id = ?", (status, detail, ended, run_id)
            )

    def add_attempt(self, run_id: str, flwr_run_id: str) -> None:
        """A new attempt (the caller holds the run's lock, so no earlier attempt is still working): one
        that never recorded its end was killed without a word (SIGKILL, or Flower's forced exit)."""
        with self._tx() as db:
            db.execute(
                "UPDATE attempts SET ended_at = ?, outcome = ? WHERE run_id = ? AND flwr_run_id != ? AND ended_at IS NULL",
                (
                    _now(),
                    f"killed without recording its end; Flower run {flwr_run_id} resumed the run",
                    run_id,
                    flwr_run_id,
                ),
            )
            db.execute("INSERT OR IGNORE INTO attempts VALUES (?, ?, ?, NULL, NULL)", (run_id, flwr_run_id, _now()))

    def end_attempt(self, run_id: str, flwr_run_id: str, outcome: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE attempts SET ended_at = ?, outcome = ? WHERE run_id = ? AND flwr_run_id = ?",
                (_now(), outcome, run_id, flwr_run_id),
            )

    def attempts(self, run_id: str) -> list[dict[str, Any]]:
        return [
            dict(r) for r in self._db.execute("SELECT * FROM attempts WHERE run_id = ? ORDER BY started_at", (run_id,))
        ]

    # -- rounds -------------------------------------------------------------------------------
    def head(self, run_id: str) -> tuple[int, CheckpointRow]:
        """(last committed round, its checkpoint); (0, base checkpoint) before the first commit."""
        row = self._db.execute(
            "SELECT round, checkpoint_id FROM rounds WHERE run_id = ? AND status = 'committed' "
            "ORDER BY round DESC LIMIT 1",
            (run_id,),
        ).fetchone()
        if row is None:
            run = self.run(run_id)
            return run.start_round, self.checkpoint(run.base_checkpoint)
        return row["round"], self.checkpoint(row["checkpoint_id"])

    def next_attempt(self, run_id: str, rnd: int) -> int:
        row = self._db.execute(
            "SELECT MAX(attempt) FROM rounds WHERE run_id = ? AND round = ?", (run_id, rnd)
        ).fetchone()
        return (row[0] or 0) + 1

    def commit_round(self, row: RoundRow, checkpoint: CheckpointRow) -> None:
        """Record a round and its (already durable) checkpoint in one transaction."""
        if row.status != "committed" or row.checkpoint_id != checkpoint.checkpoint_id:
            raise LedgerError("commit_round needs a committed row that names its checkpoint")
        with self._tx() as db:
            done = db.execute(
                "SELECT attempt FROM rounds WHERE run_id = ? AND round = ? AND status = 'committed'",
                (row.run_id, row.round),
            ).fetchone()
            if done:
                raise LedgerError(
                    f"round {row.round} of run {row.run_id} is already committed "
                    f"(attempt {done['attempt']}); a round is never counted twice"
                )
            old = db.execute(
                "SELECT checkpoint_id FROM checkpoints WHERE checkpoint_id = ?", (checkpoint.checkpoint_id,)
            ).fetchone()
            if old:  # an uncommitted leftover can only come from a failed attempt: replace it
                db.execute("DELETE FROM checkpoints WHERE checkpoint_id = ?", (checkpoint.checkpoint_id,))
            self._insert_checkpoint(db, checkpoint)
            self._insert_round(db, row)
            self._refresh_best(db, row.run_id)

    def record_failed_round(self, row: RoundRow) -> None:
        if row.status != "failed":
            raise LedgerError("record_failed_round needs a failed row")
        with self._tx() as db:
            self._insert_round(db, row)

    @staticmethod
    def _insert_round(db: sqlite3.Connection, r: RoundRow) -> None:
        db.execute(
            "INSERT INTO rounds VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                r.run_id,
                r.round,
                r.attempt,
                r.status,
                r.flwr_run_id,
                r.started_at,
                r.ended_at,
                r.parent_checkpoint,
                r.parent_sha256,
                r.checkpoint_id,
                r.checkpoint_sha256,
                json.dumps(r.participants),
                json.dumps(r.missing),
                r.weighting,
                r.total_weight,
                json.dumps(r.metrics),
                r.detail,
            ),
        )
        for s in r.sites:
            db.execute(
                "INSERT INTO site_rounds VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    r.run_id,
                    r.round,
                    r.attempt,
                    s.site,
                    s.node_id,
                    s.status,
                    s.weight,
                    s.people,
                    s.images,
                    s.steps,
                    s.loss,
                    s.epsilon,
                    s.delta,
                    s.unit,
                    s.accountant,
                    s.compute_s,
                    s.bytes_down,
                    s.bytes_up,
                    json.dumps(s.received_keys) if s.received_keys is not None else None,
                    s.detail,
                ),
            )

    def rounds(self, run_id: str, *, committed_only: bool = False) -> list[RoundRow]:
        sql = "SELECT * FROM rounds WHERE run_id = ?" + (" AND status = 'committed'" if committed_only else "")
        out = []
        for r in self._db.execute(sql + " ORDER BY round, attempt", (run_id,)).fetchall():
            d = dict(r)
            d["participants"] = json.loads(d["participants"])
            d["missing"] = json.loads(d["missing"])
            d["metrics"] = json.loads(d["metrics"])
            d["sites"] = self.site_rounds(run_id, d["round"], d["attempt"])
            out.append(RoundRow(**d))
        return out

    def site_rounds(self, run_id: str, rnd: int, attempt: int) -> list[SiteRound]:
        out = []
        for r in self._db.execute(
            "SELECT * FROM site_rounds WHERE run_id = ? AND round = ? AND attempt = ? ORDER BY site",
            (run_id, rnd, attempt),
        ):
            d = dict(r)
            for k in ("run_id", "round", "attempt"):
                d.pop(k)
            d["received_keys"] = json.loads(d["received_keys"]) if d["received_keys"] else None
            out.append(SiteRound(**d))
        return out

    def site_head(self, checkpoint_id: str, site: str) -> tuple[str, int, int] | None:
        """(run, round, attempt) of the site's head to continue from when training on `checkpoint_id`.

        A site's private head evolves only along committed rounds it took part in, so it is found on the
        checkpoint's lineage: the newest committed round on it with this site ok. Along a replay's
        lineage that is a round before the rollback (of the run the replay replaces), never a
        discarded one. None: the site has no head on this lineage (a fresh, data-independent head).
        """
        for ckpt in self.lineage(checkpoint_id):
            if ckpt.run_id is None or ckpt.round < 1:
                continue
            row = self._db.execute(
                "SELECT r.attempt FROM rounds r JOIN site_rounds sr USING (run_id, round, attempt) "
                "WHERE r.run_id = ? AND r.round = ? AND r.status = 'committed' AND r.checkpoint_id = ? "
                "AND sr.site = ? AND sr.status = 'ok'",
                (ckpt.run_id, ckpt.round, ckpt.checkpoint_id, site),
            ).fetchone()
            if row:
                return ckpt.run_id, ckpt.round, row["attempt"]
        return None

    def round_of_checkpoint(self, checkpoint_id: str) -> RoundRow | None:
        """The committed round that produced this checkpoint (None for a base model)."""
        row = self._db.execute(
            "SELECT run_id, round FROM rounds WHERE checkpoint_id = ? AND status = 'committed'", (checkpoint_id,)
        ).fetchone()
        if row is None:
            return None
        return next(r for r in self.rounds(row["run_id"], committed_only=True) if r.round == row["round"])

    # -- forget requests ----------------------------------------------------------------------
    def report_request(self, row: ForgetRow) -> tuple[ForgetRow, bool]:
        """Record a request a site reported; (row, new). A repeated report changes nothing, except
        that rounds the site learnt of later (a round in flight during the erasure) are merged in."""
        with self._tx() as db:
            old = db.execute("SELECT * FROM forget_requests WHERE request_id = ?", (row.request_id,)).fetchone()
            if old is None:
                db.execute(
                    "INSERT INTO forget_requests (request_id, site, pseudonym, received_at, erased_at, "
                    "shares_destroyed, contributions, reported_at, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        row.request_id,
                        row.site,
                        row.pseudonym,
                        row.received_at,
                        row.erased_at,
                        row.shares_destroyed,
                        json.dumps(row.contributions, sort_keys=True),
                        _now(),
                        "pending",
                    ),
                )
                return self.request(row.request_id), True
            if old["site"] != row.site or old["pseudonym"] != row.pseudonym:
                raise LedgerError(
                    f"request {row.request_id} was reported by site {old['site']!r}; "
                    f"site {row.site!r} reports it again with other details"
                )
            merged = {k: sorted(set(v)) for k, v in json.loads(old["contributions"]).items()}
            for run, rounds in row.contributions.items():
                merged[run] = sorted(set(merged.get(run, [])) | set(rounds))
            if old["status"] != "pending" and merged != json.loads(old["contributions"]):
                # Rounds we did not know of when we replayed: the replay must be done again.
                db.execute(
                    "UPDATE forget_requests SET status = 'pending', detail = ? WHERE request_id = ?",
                    ("the site reported further rounds with this person after the replay", row.request_id),
                )
            db.execute(
                "UPDATE forget_requests SET contributions = ? WHERE request_id = ?",
                (json.dumps(merged, sort_keys=True), row.request_id),
            )
        return self.request(row.request_id), False

    def request(self, request_id: str) -> ForgetRow:
        row = self._db.execute("SELECT * FROM forget_requests WHERE request_id = ?", (request_id,)).fetchone()
        if row is None:
            raise LedgerError(f"no forget request {request_id!r} in {self.path}")
        return ForgetRow.of(row)

    def requests(self, status: str | None = None) -> list[ForgetRow]:
        sql = "SELECT * FROM forget_requests" + (" WHERE status = ?" if status else "") + " ORDER BY reported_at"
        return [ForgetRow.of(r) for r in self._db.execute(sql, (status,) if status else ())]

    def start_replay(
        self, request_ids: list[str], replay_run_id: str, rollback: str, superseded_run: str, detail: str
    ) -> None:
        """Tie requests to their replay run and retire the tainted run, in one transaction (a crash
        after it resumes the replay; before it, the requests are still pending)."""
        with self._tx() as db:
            for rid in request_ids:
                db.execute(
                    "UPDATE forget_requests SET status = 'replaying', replay_run_id = ?, rollback_checkpoint = ?,"
                    " detail = NULL WHERE request_id = ?",
                    (replay_run_id, rollback, rid),
                )
            db.execute(
                "UPDATE runs SET status = 'superseded', detail = ?, ended_at = ? WHERE run_id = ?",
                (detail, _now(), superseded_run),
            )

    def refuse_requests(self, request_ids: list[str], why: str) -> None:
        with self._tx() as db:
            for rid in request_ids:
                db.execute("UPDATE forget_requests SET status = 'refused', detail = ? WHERE request_id = ?", (why, rid))

    def finish_request(
        self, request_id: str, *, model: CheckpointRow, deleted: list[str], receipt: dict[str, Any]
    ) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE forget_requests SET status = 'unlearned', model_checkpoint = ?, model_sha256 = ?, "
                "checkpoints_deleted = ?, receipt = ?, detail = NULL WHERE request_id = ?",
                (
                    model.checkpoint_id,
                    model.sha256,
                    json.dumps(deleted),
                    json.dumps(receipt, sort_keys=True),
                    request_id,
                ),
            )

    def mark_delivered(self, request_ids: list[str]) -> None:
        with self._tx() as db:
            for rid in request_ids:
                db.execute(
                    "UPDATE forget_requests SET delivered_at = ? WHERE request_id = ? AND delivered_at IS NULL",
                    (_now(), rid),
                )

    def site_epsilons(self, run_id: str | None = None) -> dict[str, SiteRound]:
        """Each site's latest reported privacy spend (its accountant is cumulative)."""
        sql = (
            "SELECT sr.* FROM site_rounds sr JOIN rounds r USING (run_id, round, attempt) "
            "WHERE sr.status = 'ok' AND sr.epsilon IS NOT NULL"
            + (" AND sr.run_id = ?" if run_id else "")
            + " ORDER BY r.ended_at"
        )
        latest: dict[str, SiteRound] = {}
        for r in self._db.execute(sql, (run_id,) if run_id else ()):
            d = dict(r)
            for k in ("run_id", "round", "attempt"):
                d.pop(k)
            d["received_keys"] = json.loads(d["received_keys"]) if d["received_keys"] else None
            latest[d["site"]] = SiteRound(**d)
        return latest
