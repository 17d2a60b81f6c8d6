"""The site's forget-request log: every right-to-be-forgotten request and how far it has got.

Where: `VAULT/requests.sqlite`, in the vault directory, not the training state directory. The request
is about the vault's data, the vault directory is the one thing every site command is given
(`forget --vault DIR`, `forget status --vault DIR`, the node config), it already holds the key the
keyed hashes below use, and it is what a site backs up. The state directory can be elsewhere or lost;
a request must not be.

Crash safety: the request row (stage `received`, with the person's pseudonym and the contribution
summary the server will need) commits before any data is touched, so a site that dies between
erasure and reporting still has everything to report after restart; each later stage is its own
committed update, and `forget` resumes an unfinished request instead of opening a second one.

Stages, in order: received -> data_erased -> model_unlearned -> receipt_issued.

The person's id is never stored here. A request carries the vault pseudonym (what the head rows, the
server and the receipt know) and `HMAC(vault key, id)`, which lets a repeated request find the first
one and lets the tombstone refuse re-enrolment, without the id being readable from this file. Like
the manifest, the database runs with `secure_delete` and a rollback journal (not WAL), so nothing
deleted lingers in free pages or a WAL file.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from facefed.client.state import RECEIPTS_DIR, REQUESTS_NAME, SiteState
from facefed.client.vault.tombstones import TOMBSTONES_SCHEMA, id_hash, vault_key
from facefed.common import sqlite
from facefed.common.durable import immediate
from facefed.common.errors import FacefedError

__all__ = ["RECEIPTS_DIR", "REQUESTS_NAME", "ForgetRequest", "RequestError", "RequestLog", "RunSpan", "vault_key"]
REQUEST_ID_RE = re.compile(r"^fr-[0-9a-f]{16}$")
STAGES = ("received", "data_erased", "model_unlearned", "receipt_issued")

_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS requests (
    request_id      TEXT PRIMARY KEY,
    id_hash         TEXT NOT NULL,
    pseudonym       TEXT NOT NULL,
    reason          TEXT,
    received_at     REAL NOT NULL,
    contributions   TEXT NOT NULL,       -- JSON list of RunSpan: what the server needs to unlearn
    erased_at       REAL,
    shares_destroyed INTEGER,
    shares_pending  INTEGER,
    images          INTEGER,
    head_rows_removed INTEGER,
    head_files      TEXT,                -- JSON list of head files rewritten without the person
    contribution_rows INTEGER,
    unlearned_at    REAL,
    run_id          TEXT,
    round           INTEGER,
    checkpoint_id   TEXT,
    checkpoint_sha256 TEXT,
    receipt_path    TEXT,
    receipt_at      REAL
);
CREATE INDEX IF NOT EXISTS requests_by_hash ON requests(id_hash);
"""
    + TOMBSTONES_SCHEMA
)


class RequestError(FacefedError, ValueError):
    """An unknown request id, a stage out of order, or a damaged request log."""


@dataclass(frozen=True)
class RunSpan:
    """Where a person's data was used in one run: the server rolls back to before `first_round`."""

    run_id: str
    first_round: int
    last_round: int
    rounds: tuple[int, ...]  # every round they were present in (any attempt), increasing


@dataclass(frozen=True)
class ForgetRequest:
    request_id: str
    pseudonym: str
    reason: str | None
    received_at: float
    contributions: list[RunSpan] = field(default_factory=list)
    erased_at: float | None = None
    shares_destroyed: int | None = None
    shares_pending: int | None = None
    images: int | None = None
    head_rows_removed: int | None = None
    head_files: list[str] = field(default_factory=list)
    contribution_rows: int | None = None
    unlearned_at: float | None = None
    run_id: str | None = None
    round: int | None = None
    checkpoint_id: str | None = None
    checkpoint_sha256: str | None = None
    receipt_path: str | None = None
    receipt_at: float | None = None

    @property
    def stage(self) -> str:
        if self.receipt_path is not None:
            return "receipt_issued"
        if self.unlearned_at is not None:
            return "model_unlearned"
        if self.erased_at is not None:
            return "data_erased"
        return "received"

    @property
    def erase_seconds(self) -> float | None:
        """Time from the request to the data being erased."""
        return None if self.erased_at is None else self.erased_at - self.received_at

    @property
    def open(self) -> bool:
        return self.stage != "receipt_issued"

    def to_json(self) -> dict:
        d = asdict(self)
        d["stage"] = self.stage
        d["erase_seconds"] = self.erase_seconds
        return d


def new_request_id() -> str:
    return "fr-" + secrets.token_hex(8)


def check_request_id(request_id: str) -> str:
    if not isinstance(request_id, str) or not REQUEST_ID_RE.match(request_id):
        raise RequestError(
            f"request id {str(request_id)[:40]!r} is not a forget request id (fr- and 16 hex digits); "
            f"`facefed-client forget status --vault DIR` lists them"
        )
    return request_id


class RequestLog:
    """`RequestLog(vault_dir)`; use as a context manager. Every write is one IMMEDIATE transaction."""

    def __init__(self, vault_dir: str | Path):
        self.vault_dir = Path(vault_dir)
        self.files = SiteState.of_node(self.vault_dir)
        self.path = self.files.requests
        self.key = vault_key(self.vault_dir)
        self._db = sqlite.connect(self.path, journal="DELETE", secure_delete=True, rows=True)
        self._db.executescript(_SCHEMA)
        try:
            self.path.chmod(0o600)
        except OSError:
            pass

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> RequestLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write(self):
        return immediate(self._db)

    def hash_of(self, person_id: str) -> str:
        return id_hash(self.key, person_id)

    # -- reading --------------------------------------------------------------------------------
    def get(self, request_id: str) -> ForgetRequest:
        row = self._db.execute("SELECT * FROM requests WHERE request_id=?", (check_request_id(request_id),)).fetchone()
        if row is None:
            raise RequestError(
                f"no forget request {request_id} in {self.path}; `facefed-client forget status --vault DIR` lists them"
            )
        return self._row(row)

    def id_hash_of(self, request_id: str) -> str:
        row = self._db.execute("SELECT id_hash FROM requests WHERE request_id=?", (request_id,)).fetchone()
        if row is None:
            raise RequestError(f"no forget request {request_id} in {self.path}")
        return row[0]

    def all(self) -> list[ForgetRequest]:
        return [self._row(r) for r in self._db.execute("SELECT * FROM requests ORDER BY received_at, request_id")]

    def latest_for(self, person_id: str) -> ForgetRequest | None:
        """The most recent request for this person id (matched by keyed hash), if any."""
        row = self._db.execute(
            "SELECT * FROM requests WHERE id_hash=? ORDER BY received_at DESC LIMIT 1", (self.hash_of(person_id),)
        ).fetchone()
        return None if row is None else self._row(row)

    def pending_for_server(self) -> list[ForgetRequest]:
        """Requests whose data is erased but whose model is not yet unlearned (what `query` reports)."""
        return [r for r in self.all() if r.stage == "data_erased"]

    def tombstoned(self, person_id: str) -> bool:
        return (
            self._db.execute("SELECT 1 FROM tombstones WHERE id_hash=?", (self.hash_of(person_id),)).fetchone()
            is not None
        )

    # -- stages ---------------------------------------------------------------------------------
    def receive(
        self,
        person_id: str,
        pseudonym: str,
        contributions: list[RunSpan],
        reason: str | None,
        received_at: float | None = None,
    ) -> ForgetRequest:
        """Open a request and lay the tombstone, in one transaction, before any data is touched."""
        rid = new_request_id()
        h = self.hash_of(person_id)
        now = time.time() if received_at is None else received_at
        with self._write() as db:
            db.execute(
                "INSERT INTO requests (request_id, id_hash, pseudonym, reason, received_at, contributions) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (rid, h, pseudonym, reason, now, json.dumps([asdict(s) for s in contributions])),
            )
            db.execute("INSERT OR REPLACE INTO tombstones VALUES (?, ?, ?)", (h, rid, now))
        return self.get(rid)

    def mark_erased(
        self, request_id: str, *, erased_at: float, shares_destroyed: int, shares_pending: int, images: int
    ) -> ForgetRequest:
        with self._write() as db:
            db.execute(
                "UPDATE requests SET erased_at=?, shares_destroyed=?, shares_pending=?, images=? WHERE request_id=?",
                (erased_at, shares_destroyed, shares_pending, images, request_id),
            )
        return self.get(request_id)

    def set_pending(self, request_id: str, *, shares_destroyed: int, shares_pending: int) -> ForgetRequest:
        """Deletions that were pending in an unreachable store have finished (or some of them)."""
        with self._write() as db:
            db.execute(
                "UPDATE requests SET shares_destroyed=?, shares_pending=? WHERE request_id=?",
                (shares_destroyed, shares_pending, request_id),
            )
        return self.get(request_id)

    def mark_heads(self, request_id: str, *, rows_removed: int, files: list[str]) -> ForgetRequest:
        with self._write() as db:
            db.execute(
                "UPDATE requests SET head_rows_removed=?, head_files=? WHERE request_id=?",
                (rows_removed, json.dumps(files), request_id),
            )
        return self.get(request_id)

    def set_contributions(self, request_id: str, spans: list[RunSpan]) -> ForgetRequest:
        with self._write() as db:
            db.execute(
                "UPDATE requests SET contributions=? WHERE request_id=?",
                (json.dumps([asdict(s) for s in spans]), request_id),
            )
        return self.get(request_id)

    def mark_contributions_dropped(self, request_id: str, rows: int) -> ForgetRequest:
        with self._write() as db:
            db.execute("UPDATE requests SET contribution_rows=? WHERE request_id=?", (rows, request_id))
        return self.get(request_id)

    def mark_unlearned(
        self,
        request_id: str,
        *,
        run_id: str,
        rnd: int,
        checkpoint_id: str,
        checkpoint_sha256: str,
        at: float | None = None,
    ) -> ForgetRequest:
        """Filled by the server flow: the first model that excludes the person."""
        req = self.get(request_id)
        if req.erased_at is None:
            raise RequestError(
                f"request {request_id}: the data is not erased yet; finish `facefed-client forget` "
                f"before recording the model as unlearned"
            )
        if not re.fullmatch(r"[0-9a-f]{64}", checkpoint_sha256):
            raise RequestError(f"checkpoint sha256 {checkpoint_sha256!r} is not 64 hex digits")
        with self._write() as db:
            db.execute(
                "UPDATE requests SET unlearned_at=?, run_id=?, round=?, checkpoint_id=?, checkpoint_sha256=? "
                "WHERE request_id=?",
                (time.time() if at is None else at, run_id, int(rnd), checkpoint_id, checkpoint_sha256, request_id),
            )
        return self.get(request_id)

    def mark_receipt(self, request_id: str, path: Path) -> ForgetRequest:
        req = self.get(request_id)
        if req.unlearned_at is None:
            raise RequestError(f"request {request_id}: no receipt before the model is unlearned")
        with self._write() as db:
            db.execute(
                "UPDATE requests SET receipt_path=?, receipt_at=? WHERE request_id=?",
                (str(path), time.time(), request_id),
            )
        return self.get(request_id)

    def store_receipt(self, request_id: str, signed: dict) -> ForgetRequest:
        """Keep the server's signed receipt beside the log (`VAULT/receipts/<request>.json`, written
        atomically) and move the request to `receipt_issued`."""
        if self.get(request_id).unlearned_at is None:
            raise RequestError(f"request {request_id}: no receipt before the model is unlearned")
        folder = self.files.receipts_dir
        folder.mkdir(mode=0o700, exist_ok=True)
        path = folder / f"{request_id}.json"
        tmp = folder / f".{request_id}.json.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(signed, f, sort_keys=True, indent=2, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return self.mark_receipt(request_id, path)

    def lift_tombstone(self, person_id: str) -> bool:
        """Allow a forgotten person to be enrolled again (explicit operator decision)."""
        with self._write() as db:
            return db.execute("DELETE FROM tombstones WHERE id_hash=?", (self.hash_of(person_id),)).rowcount > 0

    @staticmethod
    def _row(r: sqlite3.Row) -> ForgetRequest:
        d = dict(r)
        d.pop("id_hash")
        d["contributions"] = [
            RunSpan(s["run_id"], s["first_round"], s["last_round"], tuple(s["rounds"]))
            for s in json.loads(d["contributions"])
        ]
        d["head_files"] = json.loads(d["head_files"]) if d["head_files"] else []
        return ForgetRequest(**d)
