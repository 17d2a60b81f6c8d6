"""Right to be forgotten, the site's part: erase a person's faces at once and every trace of them here.

`forget(vault_dir, state_dir, person_id)` does, in this order:
 1. checks the person (an unknown person is an error that changes nothing);
 2. records the request (`client/forget/requests.py`): pseudonym, the runs/rounds their data was used in
    (what the server needs to roll back and replay), and a tombstone; committed before anything is
    destroyed, so a crash later never loses the request;
 3. erases their shares from every store (`Vault.erase`: manifest rows first, then the files; what a
    store could not delete stays pending in the vault and is retried at every open);
 4. deletes their row from every head file in EVERY state directory of the vault (the node's
    `VAULT/site`, `facefed-client train`'s `VAULT/train-state` with its `head.pt`, any other one a
    node or `train` registered in `VAULT/states`; client/state.py), each rewritten atomically;
 5. deletes their contribution-log rows (`STATE/contributions.sqlite`, keyed by pseudonym) in each,
    once the summary in step 2 is safely recorded (and merged again, in case a round added rows).
Repeating it is harmless: an open request for the same person is resumed or returned, never doubled.
`settle(vault_dir, state_dir)` does the same for every request without the id being typed again: for
the node at start-up and around rounds (a crash before erasing, a round in flight during the erasure).

What this cannot do alone: the other rows of a head and the shared backbone were trained *with* the
person; exact unlearning (rollback + replay without them) is the server's part (server/forget/unlearn.py),
which reads the summary from the request log through the site's `query` reply.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from facefed.client.forget.requests import ForgetRequest, RequestError, RequestLog, RunSpan
from facefed.client.state import SiteState, default_node_state, requests_path, site_states
from facefed.client.vault import UnknownPerson, Vault
from facefed.client.vault.validate import check_person_id
from facefed.common import sqlite
from facefed.common.errors import FacefedError
from facefed.common.model.heads import HeadError, MarginHead

log = logging.getLogger("facefed.forget")

MAX_REASON = 500


class ForgetError(FacefedError, ValueError):
    """The request cannot be made as given (bad reason text, state directory unusable)."""


@dataclass
class ForgetOutcome:
    request: ForgetRequest
    repeated: bool  # the person had already been erased by this request: nothing new destroyed
    erased_now: bool  # shares were destroyed by this call
    shares_destroyed_now: int = 0
    head_rows_removed_now: int = 0
    head_files_now: list[str] = field(default_factory=list)
    contribution_rows_now: int = 0
    problems: list[str] = field(default_factory=list)  # head files that could not be checked
    state_dir: Path | None = None  # where heads and the contribution log were looked for


def default_state_dir(vault_dir: Path) -> Path:
    """Where `facefed-client start` keeps the site's state unless told otherwise."""
    return default_node_state(vault_dir)


def check_reason(reason: str | None, person_id: str) -> str | None:
    if reason is None:
        return None
    if not isinstance(reason, str) or not 0 < len(reason) <= MAX_REASON or not reason.isprintable():
        raise ForgetError(f"--reason must be 1..{MAX_REASON} printable characters")
    if person_id in reason:
        # The log keeps pseudonyms only; a reason naming the person would undo that.
        raise ForgetError("--reason contains the person id; the request log must not hold it, reword the reason")
    return reason


# -- contribution log (operated on directly: the ContributionLog API lacks a secure delete) -----------
def _contrib_db(path: Path) -> sqlite3.Connection:
    # The log runs in WAL mode (ContributionLog); the deleted rows carry the person id: overwrite them.
    # Not mode=ro even to read: a read-only open of a WAL database fails without its -shm file.
    return sqlite.connect(path, journal="WAL", secure_delete=True)


def contribution_spans(state_dir: Path, pseudonym: str) -> list[RunSpan]:
    """Per run: the earliest and latest round the person was present in (attempts included)."""
    path = SiteState(Path(state_dir)).contributions
    if not path.is_file():
        return []
    db = _contrib_db(path)
    try:
        has = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='contributions'").fetchone()
        if not has:
            return []
        rows = db.execute(
            "SELECT DISTINCT run_id, round FROM contributions WHERE pseudonym=? ORDER BY run_id, round", (pseudonym,)
        ).fetchall()
    finally:
        db.close()
    by_run: dict[str, list[int]] = {}
    for run_id, rnd in rows:
        by_run.setdefault(run_id, []).append(int(rnd))
    return [RunSpan(run_id, rs[0], rs[-1], tuple(rs)) for run_id, rs in by_run.items()]


def drop_contributions(state_dir: Path, pseudonym: str) -> int:
    """Delete the person's rows and push the WAL into the database, so no copy of them stays behind."""
    path = SiteState(Path(state_dir)).contributions
    if not path.is_file():
        return 0
    db = _contrib_db(path)
    try:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='contributions'").fetchone():
            return 0
        n = db.execute("DELETE FROM contributions WHERE pseudonym=?", (pseudonym,)).rowcount
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # a no-op unless the log runs in WAL mode
    finally:
        db.close()
    return n


def contribution_people(state_dir: Path) -> list[str]:
    path = SiteState(Path(state_dir)).contributions
    if not path.is_file():
        return []
    db = _contrib_db(path)
    try:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='contributions'").fetchone():
            return []
        return [r[0] for r in db.execute("SELECT DISTINCT pseudonym FROM contributions")]
    finally:
        db.close()


def merge_spans(a: list[RunSpan], b: list[RunSpan]) -> list[RunSpan]:
    by_run: dict[str, RunSpan] = {s.run_id: s for s in a}
    for s in b:
        old = by_run.get(s.run_id)
        rounds = tuple(sorted(set(s.rounds) | set(old.rounds if old else ())))
        by_run[s.run_id] = RunSpan(s.run_id, rounds[0], rounds[-1], rounds)
    return [by_run[k] for k in sorted(by_run)]


# -- heads ------------------------------------------------------------------------------------------
def head_files(state_dir: Path) -> list[Path]:
    return SiteState(Path(state_dir)).head_files()


def scrub_heads(state_dir: Path, pseudonym: str) -> tuple[int, list[str], list[str]]:
    """Remove the person's row from every head file; (rows removed, files rewritten, problems)."""
    removed, changed, problems = 0, [], []
    for path in head_files(state_dir):
        try:
            head = MarginHead.load(path)
        except (HeadError, OSError) as e:
            problems.append(f"{path}: could not be checked for the person's row ({e}); inspect or delete it")
            continue
        if head.remove_people([pseudonym]):
            head.save(path)  # atomic: temp file, fsync, rename
            removed += 1
            changed.append(str(path.relative_to(state_dir)))
    return removed, changed, problems


def _number(value: object) -> float:
    """A number from an audit entry (JSON); anything else means the entry is not ours."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"the vault's audit log has a malformed erase entry ({value!r} is not a number)")
    return float(value)


def _erased_per_audit(vault: Vault, reqlog: RequestLog, req: ForgetRequest, vault_dir: Path) -> ForgetRequest:
    """A crash after the vault began erasing but before the log said so: the vault has the facts. Its
    audit log records the erase (or, when the process died while destroying shares, the `erase_resumed`
    of the open that finished the job), and its manifest any deletion still pending for the request."""
    entries = [
        e
        for e in vault.audit_entries()
        if e.get("event") in ("erase", "erase_resumed")
        and e.get("pseudonym") == req.pseudonym
        and e.get("request_id", req.request_id) == req.request_id
    ]
    pending = vault.pending_deletions(req.request_id)
    if not entries and not pending:
        raise RequestError(
            f"request {req.request_id}: the person is gone from the vault but its audit log has no "
            f"erase of pseudonym {req.pseudonym}; run `facefed-client vault verify --vault {vault_dir}` "
            f"and check the audit log"
        )
    images = max((int(_number(e.get("images", 0))) for e in entries), default=0)
    return reqlog.mark_erased(
        req.request_id,
        erased_at=_number(entries[0]["time"]) if entries else time.time(),
        shares_destroyed=sum(int(_number(e.get("shares_destroyed", 0))) for e in entries),
        shares_pending=pending,
        images=images,
    )


def refresh_pending(vault: Vault, reqlog: RequestLog, req: ForgetRequest) -> ForgetRequest:
    """A request that left deletions pending: count again what the vault still has pending (an open,
    verify or repair finishes them when the store is back), so status and receipts stop saying so."""
    if req.erased_at is None or not req.shares_pending:
        return req
    now = vault.pending_deletions(req.request_id)
    if now >= req.shares_pending:
        return req
    return reqlog.set_pending(
        req.request_id,
        shares_destroyed=(req.shares_destroyed or 0) + req.shares_pending - now,
        shares_pending=now,
    )


def _states(vault_dir: Path, state_dir: Path) -> list[Path]:
    """Every state directory of this vault: the one given, the node's, `train`'s, and any registered."""
    out = [state_dir, *site_states(vault_dir)]
    return [d for i, d in enumerate(out) if d not in out[:i]]


def _scrub_heads_of(
    reqlog: RequestLog, req: ForgetRequest, state_dir: Path
) -> tuple[ForgetRequest, int, list[str], list[str]]:
    rows, files, problems = scrub_heads(state_dir, req.pseudonym) if state_dir.is_dir() else (0, [], [])
    if rows or req.head_rows_removed is None:
        req = reqlog.mark_heads(
            req.request_id,
            rows_removed=(req.head_rows_removed or 0) + rows,
            files=sorted(set(req.head_files) | set(files)),
        )
    return req, rows, files, problems


# -- the request ------------------------------------------------------------------------------------
def run_forget(
    vault_dir: str | Path, state_dir: str | Path | None, person_id: str, reason: str | None = None
) -> ForgetOutcome:
    received = time.time()
    vault_dir = Path(vault_dir).expanduser().absolute()
    state_dir = default_state_dir(vault_dir) if state_dir is None else Path(state_dir).expanduser().absolute()
    check_person_id(person_id)
    reason = check_reason(reason, person_id)
    if state_dir.exists() and not state_dir.is_dir():
        raise ForgetError(f"--state {state_dir} is not a directory; give the site's state directory")

    with Vault.open(vault_dir) as vault:
        try:
            pseudonym = vault.person(person_id).pseudonym
        except UnknownPerson:
            pseudonym = None
        # Without a request log no one was ever forgotten here: do not even create the file.
        if pseudonym is None and not requests_path(vault_dir).is_file():
            raise _unknown(person_id, vault_dir)
        with RequestLog(vault_dir) as reqlog:
            return _run(vault, reqlog, vault_dir, state_dir, person_id, pseudonym, reason, received)


def _unknown(person_id: str, vault_dir: Path) -> UnknownPerson:
    return UnknownPerson(
        f"unknown person {person_id!r} at vault {vault_dir}: nothing was changed; "
        f"`facefed-client vault ls --vault {vault_dir}` lists this vault's people"
    )


def _run(
    vault: Vault,
    reqlog: RequestLog,
    vault_dir: Path,
    state_dir: Path,
    person_id: str,
    pseudonym: str | None,
    reason: str | None,
    received: float,
) -> ForgetOutcome:
    previous = reqlog.latest_for(person_id)
    if pseudonym is None and previous is None:
        raise _unknown(person_id, vault_dir)

    erased_now, destroyed_now = False, 0
    if pseudonym is not None and (previous is None or previous.erased_at is not None):
        # A new request (first time, or a person enrolled again after an earlier one was finished).
        spans: list[RunSpan] = []
        for d in _states(vault_dir, state_dir):
            spans = merge_spans(spans, contribution_spans(d, pseudonym))
        req = reqlog.receive(person_id, pseudonym, spans, reason, received_at=received)
    else:
        assert previous is not None
        req = refresh_pending(vault, reqlog, previous)
    repeated = req.erased_at is not None

    if req.erased_at is None:
        if pseudonym is not None:
            report = vault.erase(person_id, request_id=req.request_id)
            erased_at = time.time()
            req = reqlog.mark_erased(
                req.request_id,
                erased_at=erased_at,
                shares_destroyed=report.shares_destroyed,
                shares_pending=report.shares_pending,
                images=report.images,
            )
            erased_now, destroyed_now = True, report.shares_destroyed
        else:
            req = _erased_per_audit(vault, reqlog, req, vault_dir)
    log.info("request %s: data erased (%s shares)", req.request_id, req.shares_destroyed)

    # Heads and contributions: run every time (idempotent), in EVERY state directory the site has
    # (the node's, `facefed-client train`'s, any other registered with the vault; client/state.py),
    # so a head written by a round that was in flight during the first call is scrubbed by the repeat.
    rows, dropped = 0, 0
    files: list[str] = []
    problems: list[str] = []
    for d in _states(vault_dir, state_dir):
        req, r, f, p = _scrub_heads_of(reqlog, req, d)
        rows, files, problems = rows + r, files + f, problems + p
        spans = contribution_spans(d, req.pseudonym)
        if spans:
            merged = merge_spans(req.contributions, spans)
            if merged != req.contributions:
                req = reqlog.set_contributions(req.request_id, merged)
        dropped += drop_contributions(d, req.pseudonym)
    if dropped or req.contribution_rows is None:
        req = reqlog.mark_contributions_dropped(req.request_id, (req.contribution_rows or 0) + dropped)

    return ForgetOutcome(
        request=req,
        repeated=repeated,
        erased_now=erased_now,
        shares_destroyed_now=destroyed_now,
        head_rows_removed_now=rows,
        head_files_now=files,
        contribution_rows_now=dropped,
        problems=problems,
        state_dir=state_dir,
    )


def settle(vault_dir: str | Path, state_dir: str | Path | None = None) -> list[ForgetOutcome]:
    """Finish every request as far as the site can, without the operator typing the id again.

    For the node to call at start-up, before answering the server's `query` and after each round:
    a request whose process died before erasing is erased now (the person is found by pseudonym); a
    head or contribution row that a round in flight wrote after the erasure is removed (the person
    is found by keyed hash among the contribution log's ids). A person enrolled again since (new
    pseudonym, tombstone lifted) keeps their new data; only rows under the old pseudonym go.
    Returns the requests for which something was done."""
    vault_dir = Path(vault_dir).expanduser().absolute()
    state_dir = default_state_dir(vault_dir) if state_dir is None else Path(state_dir).expanduser().absolute()
    if not requests_path(vault_dir).is_file():
        return []
    done: list[ForgetOutcome] = []
    with Vault.open(vault_dir) as vault, RequestLog(vault_dir) as reqlog:
        current = {r.person_id: r.pseudonym for r in vault.people()}
        by_pseudonym = {ps: pid for pid, ps in current.items()}
        by_hash = {reqlog.hash_of(p): p for p in current}
        latest: dict[str, ForgetRequest] = {}
        for req in reqlog.all():  # oldest first: the last one per person wins
            refreshed = refresh_pending(vault, reqlog, req)
            if refreshed != req:
                done.append(ForgetOutcome(request=refreshed, repeated=True, erased_now=False))
            req = refreshed
            h = reqlog.id_hash_of(req.request_id)
            if h in latest:  # an earlier request of someone forgotten twice: only its head rows can remain
                old, rows = latest[h], 0
                files, problems = list[str](), list[str]()
                for d in _states(vault_dir, state_dir):
                    old, r, f, p = _scrub_heads_of(reqlog, old, d)
                    rows, files, problems = rows + r, files + f, problems + p
                if rows or problems:
                    done.append(
                        ForgetOutcome(
                            request=old,
                            repeated=True,
                            erased_now=False,
                            head_rows_removed_now=rows,
                            head_files_now=files,
                            problems=problems,
                        )
                    )
            latest[h] = req
        for h, req in latest.items():
            pid = by_pseudonym.get(req.pseudonym) or by_hash.get(h)
            was = (req.erased_at, req.head_rows_removed, req.contribution_rows)
            if pid is not None and current.get(pid, req.pseudonym) == req.pseudonym:
                o = _run(vault, reqlog, vault_dir, state_dir, pid, current.get(pid), None, time.time())
            else:  # nothing here names them any more, or they were enrolled again under a new pseudonym
                if req.erased_at is None and req.pseudonym not in by_pseudonym:
                    req = _erased_per_audit(vault, reqlog, req, vault_dir)
                rows, dropped = 0, 0
                files, problems = list[str](), list[str]()
                for d in _states(vault_dir, state_dir):
                    req, r, f, p = _scrub_heads_of(reqlog, req, d)
                    rows, files, problems = rows + r, files + f, problems + p
                    spans = contribution_spans(d, req.pseudonym)
                    if spans and merge_spans(req.contributions, spans) != req.contributions:
                        req = reqlog.set_contributions(req.request_id, merge_spans(req.contributions, spans))
                    dropped += drop_contributions(d, req.pseudonym)
                if dropped:
                    req = reqlog.mark_contributions_dropped(req.request_id, (req.contribution_rows or 0) + dropped)
                o = ForgetOutcome(
                    request=req,
                    repeated=True,
                    erased_now=False,
                    head_rows_removed_now=rows,
                    head_files_now=files,
                    contribution_rows_now=dropped,
                    problems=problems,
                )
            if (o.request.erased_at, o.request.head_rows_removed, o.request.contribution_rows) != was or o.problems:
                done.append(o)
    return done


def forget(
    vault_dir: str | Path, state_dir: str | Path | None, person_id: str, reason: str | None = None
) -> ForgetRequest:
    """Forget a person at this site (see the module doc); returns the request record."""
    return run_forget(vault_dir, state_dir, person_id, reason).request
