"""Crash recovery at `Vault.open`: shares of writers that died, erasures left pending.

Runs only under the vault's writer lock, and only if it is free at once (a reader never waits for a
writer): while the lock is held no writer is alive, so every pending write is a dead writer's.
Nothing is ever deleted because the manifest merely lacks it (a swapped store, a restored manifest
or a foreign disk would make that deadly): a share goes only if the manifest recorded it as being
written by a writer that died (and its header says it is this vault's share for that store), or as
belonging to an erased person. Why each step is safe: docs/vault.md ("Crash safety")."""

from __future__ import annotations

from collections.abc import Iterable

from facefed.client.vault import audit
from facefed.client.vault.core import VaultCore, log
from facefed.client.vault.reports import OrphanShare, StoreHealth
from facefed.client.vault.sharefile import ShareFormatError, unseal
from facefed.client.vault.stores import ShareNotFound, StoreError
from facefed.client.vault.stores.base import IDENTITY_ID


def recover(core: VaultCore) -> None:
    with core.writing("recovery", wait=False) as held:
        if not held:  # a writer is at work: it, or the next open, recovers
            return
        sweep_dead_writers(core)
        retry_pending_deletions(core)
        core.lock.remove_stale()
        for store in core.stores:
            store.sweep_temp()


def _ours_at(core: VaultCore, x: int, share_id: str) -> bool | None:
    """True: the share is this vault's share `share_id` for x (safe to delete); None: it is gone;
    False: something else, or the store cannot say (left alone)."""
    try:
        header, _ = unseal(core.keys, core.stores[x - 1].get(share_id))
    except ShareNotFound:
        return None
    except (StoreError, ShareFormatError):
        return False
    return header.x == x and header.share_id == share_id


def delete_verified(core: VaultCore, shares: Iterable[tuple[int, str]], why: str) -> list[tuple[int, str]]:
    """Delete the shares whose headers prove them this vault's, for that x and id; (x, id) settled:
    deleted, already gone, or provably not a share of ours (left on disk, record dropped)."""
    settled, doomed = [], []
    for x, sid in shares:
        verdict = _ours_at(core, x, sid)
        if verdict is None:
            settled.append((x, sid))
        elif verdict:
            doomed.append((x, sid))
        else:
            try:
                core.stores[x - 1].stat()  # reachable and in place: the file is not ours, keep it
                log.warning("store x=%d: %s is not this vault's share; left alone", x, sid)
                settled.append((x, sid))
            except StoreError:
                pass  # unreachable or misplaced: decide later
    gone, _ = core.delete_shares(doomed, why=why)
    return settled + gone


def sweep_dead_writers(core: VaultCore) -> None:
    assert core.lock.held, "pending writes are a dead writer's only while the writer lock is held"
    rows = core.manifest.pending_writes()
    if not rows:
        return
    done = delete_verified(core, rows, "share of an interrupted write left for the next open")
    core.manifest.drop_pending_writes(done)
    log.info("removed %d share(s) of an interrupted write", len(done))


def retry_pending_deletions(core: VaultCore) -> tuple[int, int]:
    """Finish the erasures a store could not do before; (shares destroyed now, still pending)."""
    pending = core.manifest.pending_deletions()
    if not pending:
        return 0, 0
    gone, _ = core.delete_shares([(p.x, p.share_id) for p in pending])
    core.manifest.finish_deletions(gone)
    gone_set = set(gone)
    groups: dict[tuple[str, str], list[int]] = {}
    for p in pending:
        g = groups.setdefault((p.request_id, p.pseudonym), [0, 0])
        g[0 if (p.x, p.share_id) in gone_set else 1] += 1
    for (request_id, pseudonym), (done, left) in groups.items():
        if done:
            core.audit(
                "erase_resumed",
                request_id=request_id,
                pseudonym=pseudonym,
                shares_destroyed=done,
                shares_pending=left,
            )
    return len(gone), len(pending) - len(gone)


def find_orphans(core: VaultCore) -> tuple[list[OrphanShare], list[StoreHealth]]:
    """Shares in stores that the manifest does not know (reported, never deleted for that alone).
    Stores are listed *before* the manifest is read: a concurrent put commits its pending rows
    before writing, so any file seen here that belongs to a live write is already referenced."""
    listings: dict[int, list[str]] = {}
    health: list[StoreHealth] = []
    for x, store in enumerate(core.stores, start=1):
        try:
            listings[x] = [sid for sid in store.list() if sid != IDENTITY_ID]
            health.append(StoreHealth(x, store.url, True, len(listings[x])))
        except StoreError as e:
            health.append(StoreHealth(x, store.url, False, 0, str(e)))
    refs = core.manifest.referenced()
    orphans = []
    for x, ids in listings.items():
        for sid in sorted(set(ids) - refs.get(x, set())):
            try:
                blob = core.stores[x - 1].get(sid)
            except (ShareNotFound, StoreError):
                continue  # gone meanwhile, or unreadable: not ours to judge now
            owner, copy_of = None, None
            try:
                header, _ = unseal(core.keys, blob)
                ours = header.x == x
                owner = header.owner if ours else None
                if ours and header.share_id != sid and header.share_id in refs.get(x, set()):
                    copy_of = header.share_id
            except ShareFormatError:
                ours = False
            orphans.append(OrphanShare(x, core.stores[x - 1].url, sid, ours, owner=owner, copy_of=copy_of))
    return orphans, health


def erased_owners(core: VaultCore) -> set[bytes]:
    """Owner tags of every pseudonym the audit log says was erased (and is not in the manifest)."""
    live = {ps for _, ps, _ in core.manifest.people()}
    erased = {
        str(e["pseudonym"])
        for e in audit.read_entries(core.audit_path)
        if str(e.get("event", "")).startswith("erase") and "pseudonym" in e
    }
    return {core.keys.owner(ps) for ps in erased - live}


def remove_orphans(core: VaultCore, orphans: list[OrphanShare]) -> int:
    """Delete the orphans that provably need not exist: copies of a referenced share of this vault
    under another name, and shares of people the audit log says were erased. Other unreferenced
    shares (a manifest restored from an older backup leaves real images so) are kept and reported."""
    dead = erased_owners(core)
    doomed = [(o.x, o.share_id) for o in orphans if o.ours and (o.copy_of is not None or o.owner in dead)]
    if not doomed:
        return 0
    gone, _ = core.delete_shares(doomed, why="orphan left for the next repair")
    log.info("removed %d orphan share(s)", len(gone))
    return len(gone)
