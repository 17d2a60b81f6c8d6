"""Erase, verify and repair: destroying a person's shares, checking every share, regenerating lost ones."""

from __future__ import annotations

import uuid

from facefed.client.vault import audit
from facefed.client.vault.config import write_config
from facefed.client.vault.core import MisplacedStore, VaultCore
from facefed.client.vault.errors import CorruptShare, UnknownPerson, VaultError
from facefed.client.vault.identity import parse_record
from facefed.client.vault.manifest import ImageInfo
from facefed.client.vault.reading import combine_shares, load_share
from facefed.client.vault.recovery import find_orphans, remove_orphans, retry_pending_deletions, sweep_dead_writers
from facefed.client.vault.reports import (
    EraseReport,
    ImageProblem,
    RepairReport,
    ShareProblem,
    StoreHealth,
    VerifyReport,
)
from facefed.client.vault.sharefile import ShareFormatError, ShareHeader, seal
from facefed.client.vault.stores import ShareNotFound, Store, StoreError, StoreUnavailable
from facefed.client.vault.validate import check_person_id, check_request_id
from facefed.common.shamir import Share, combine, regenerate

Todo = dict[str, tuple[ImageInfo, list[int], list[ShareProblem]]]  # image id -> (info, valid xs, problems)


def erase(core: VaultCore, person_id: str, request_id: str | None) -> EraseReport:
    with core.writing("erase"):  # no put of this person can be between its check and its commit now
        return _erase(core, person_id, request_id)


def _erase(core: VaultCore, person_id: str, request_id: str | None) -> EraseReport:
    typed = person_id
    person_id = check_person_id(person_id)
    request_id = check_request_id(request_id) if request_id is not None else uuid.uuid4().hex
    try:
        try:
            pseudonym, pending = core.manifest.begin_erase(person_id, request_id)
        except KeyError:
            if typed == person_id:
                raise
            pseudonym, pending = core.manifest.begin_erase(typed, request_id)  # stored before NFC
    except KeyError:
        raise UnknownPerson(
            f"unknown person {person_id!r}; `facefed-client vault ls` lists this vault's people"
        ) from None
    gone, failed = core.delete_shares([(p.x, p.share_id) for p in pending])
    core.manifest.finish_deletions(gone)
    gone_set = set(gone)
    destroyed: dict[str, int] = {}
    for p in pending:
        destroyed[p.image_id] = destroyed.get(p.image_id, 0) + ((p.x, p.share_id) in gone_set)
    # With n-k+1 of its shares gone, fewer than k remain anywhere: the image cannot be rebuilt.
    unrecoverable = all(count >= core.n - core.k + 1 for count in destroyed.values())
    report = EraseReport(
        request_id=request_id,
        pseudonym=pseudonym,
        images=len(destroyed),
        shares_destroyed=len(gone),
        shares_pending=len(pending) - len(gone),
        unreachable_stores=sorted(failed),
        unrecoverable=unrecoverable,
    )
    core.audit(
        "erase",
        request_id=request_id,
        pseudonym=pseudonym,
        images=report.images,
        shares_destroyed=report.shares_destroyed,
        shares_pending=report.shares_pending,
        unrecoverable=unrecoverable,
    )
    return report


def check_shares(
    core: VaultCore, info: ImageInfo
) -> tuple[list[int], list[ShareProblem], ImageProblem | None, ImageProblem | None]:
    """(valid xs, share problems, unrecoverable, inconsistent) for one image."""
    valid: list[tuple[int, memoryview]] = []
    problems: list[ShareProblem] = []
    for x in range(1, core.n + 1):
        url, sid = core.stores[x - 1].url, info.shares.get(x, "")

        def problem(kind: str, detail: str = "", x: int = x, url: str = url, sid: str = sid) -> ShareProblem:
            return ShareProblem(info.image_id, info.person_id, x, url, sid, kind, detail)

        try:
            valid.append((x, load_share(core, info, x)))
        except ShareNotFound:
            problems.append(problem("missing"))
        except StoreUnavailable as e:
            problems.append(problem("unreachable", str(e)))
        except StoreError as e:
            problems.append(problem("unreadable", str(e)))
        except ShareFormatError as e:
            problems.append(problem("corrupt", str(e)))
    xs = [x for x, _ in valid]
    if len(valid) < core.k:
        lost = f"{len(valid)} of {core.k} required shares valid: cannot be rebuilt"
        return xs, problems, ImageProblem(info.image_id, info.person_id, lost), None
    try:
        first = combine_shares(info, valid[: core.k])
        if len(valid) > core.k and combine_shares(info, valid[-core.k :]) != first:
            raise CorruptShare("different share subsets rebuild different images")
    except CorruptShare as e:
        return xs, problems, None, ImageProblem(info.image_id, info.person_id, str(e))
    return xs, problems, None, None


def scan(core: VaultCore) -> tuple[VerifyReport, Todo]:
    """Every image checked (in parallel); the report and the images that can be repaired."""
    report = VerifyReport()
    report.orphans, report.stores = find_orphans(core)
    infos = core.manifest.images()
    report.images = len(infos)
    todo: Todo = {}
    checked = core.executor().map(lambda info: check_shares(core, info), infos)
    for info, (xs, problems, lost, mixed) in zip(infos, checked):
        report.shares_ok += len(xs)
        for p in problems:
            {"missing": report.missing, "corrupt": report.corrupt}.get(p.problem, report.unreachable).append(p)
        if lost:
            report.unrecoverable.append(lost)
        if mixed:
            report.inconsistent.append(mixed)
        if problems and not lost and not mixed:
            todo[info.image_id] = (info, xs, problems)
    return report, todo


def verify(core: VaultCore) -> VerifyReport:
    with core.writing("verify", wait=False) as held:
        if held:  # finishing pending deletions is a mutation; skipped while a writer is busy
            retry_pending_deletions(core)
    report, _ = scan(core)
    report.pending_deletions = len(core.manifest.pending_deletions())
    report.misplaced_stores = [s.reason for s in core.stores if isinstance(s, MisplacedStore)]
    try:
        status = audit.verify_audit_chain(core.audit_path, core.manifest.get_meta("audit_head"))
        report.audit_entries = status.entries
    except VaultError as e:
        report.audit_error = str(e)
    return report


def repair(core: VaultCore) -> RepairReport:
    with core.writing("repair"):
        return _repair(core)


def _repair(core: VaultCore) -> RepairReport:
    rep = RepairReport()
    for x in range(1, core.n + 1):  # an empty replacement disk becomes x again (and is refilled below)
        problem, adoptable = core.store_identity_problem(x)
        if adoptable:
            try:
                core.write_identity(x)
                if problem is not None:
                    rep.stores_adopted.append(x)
            except StoreError as e:
                rep.misplaced_stores.append(f"store {core.raw_stores[x - 1].url}: could not write its identity: {e}")
    rep.misplaced_stores += [s.reason for s in core.stores if isinstance(s, MisplacedStore)]
    sweep_dead_writers(core)
    rep.pending_deletions_finished, rep.pending_deletions_left = retry_pending_deletions(core)
    found, todo = scan(core)
    rep.unrecoverable, rep.inconsistent = found.unrecoverable, found.inconsistent
    rep.orphans_removed = remove_orphans(core, found.orphans)
    gone = {(o.x, o.share_id) for o in found.orphans} - {
        (x, sid) for x, store in enumerate(core.stores, start=1) for sid in _listing(store)
    }
    rep.orphans_kept = [o for o in found.orphans if o.ours and (o.x, o.share_id) not in gone]
    rep.foreign_orphans = [o for o in found.orphans if not o.ours]
    try:
        audit.verify_audit_chain(core.audit_path, core.manifest.get_meta("audit_head"))
    except VaultError as e:
        rep.audit_error = str(e)
    for info, xs, problems in todo.values():
        sources = [Share(x, bytes(load_share(core, info, x))) for x in xs[: core.k]]
        owner = core.keys.owner(info.pseudonym)
        for p in problems:
            if p.problem not in ("missing", "corrupt"):
                rep.not_repaired.append(p)
                continue
            new = regenerate(sources, p.x)
            # Defensive: the regenerated share must rebuild the same image with k-1 of the others.
            check = [new] + sources[: core.k - 1]
            if combine(check) != combine(sources):
                raise CorruptShare(f"image {info.image_id}: regenerated share x={p.x} does not match; not written")
            header = ShareHeader(p.x, core.k, core.n, p.share_id, info.image_id, owner, info.padded)
            try:
                core.stores[p.x - 1].put(p.share_id, seal(core.keys, header, new.data, b""))
                rep.regenerated.append(p)
            except StoreError as e:
                rep.not_repaired.append(
                    ShareProblem(p.image_id, p.person_id, p.x, p.store, p.share_id, p.problem, f"write failed: {e}")
                )
    if rep.regenerated or rep.orphans_removed or rep.stores_adopted:
        core.audit("repair", shares_regenerated=len(rep.regenerated), orphans_removed=rep.orphans_removed)
    return rep


def _listing(store: Store) -> set[str]:
    try:
        return set(store.list())
    except StoreError:
        return set()


def remap(core: VaultCore, apply: bool) -> list[tuple[int, str]]:
    """The stores' identities say which x each holds: [(x, url)] in x order. With `apply`, vault.toml
    is rewritten in that order (the vault must be reopened). Refuses unless every store is this
    vault's and each x appears exactly once."""
    with core.writing("remap"):
        found: dict[int, str] = {}
        for store in core.raw_stores:
            try:
                record = store.read_identity()
            except StoreError as e:
                raise VaultError(f"cannot remap: {e}") from None
            ident = parse_record(core.keys, core.vault_id, record) if record is not None else None
            if ident is None or not ident.ours or ident.x is None or not 1 <= ident.x <= core.n:
                raise VaultError(
                    f"cannot remap: store {store.url} carries no identity of this vault; check the mounts and "
                    f"vault.toml by hand"
                )
            if ident.x in found:
                raise VaultError(f"cannot remap: stores {found[ident.x]} and {store.url} both say they are x={ident.x}")
            found[ident.x] = core.config.stores[core.raw_stores.index(store)]
        order = [(x, found[x]) for x in sorted(found)]
        if apply and [u for _, u in order] != list(core.config.stores):
            write_config(core.path, core.config.model_copy(update={"stores": [u for _, u in order]}))
            core.audit("remap", stores=len(order))
        return order


def store_health(core: VaultCore) -> list[StoreHealth]:
    out = []
    for x, store in enumerate(core.stores, start=1):
        try:
            st = store.stat()
            out.append(StoreHealth(x, store.url, True, st.shares))
        except StoreError as e:
            out.append(StoreHealth(x, store.url, False, 0, str(e)))
    return out
