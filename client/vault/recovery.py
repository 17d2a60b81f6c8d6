"""Crash recovery at `Vault.open`: shares of writers that died, erasures left pending, orphan shares.

Why each step is safe is in docs/vault.md ("Crash safety")."""

from __future__ import annotations

from facefed.client.vault.core import VaultCore, log
from facefed.client.vault.reports import OrphanShare, StoreHealth
from facefed.client.vault.sharefile import ShareFormatError, unseal
from facefed.client.vault.stores import ShareNotFound, StoreError


def recover(core: VaultCore) -> None:
    sweep_dead_writers(core)
    retry_pending_deletions(core)
    orphans, _ = find_orphans(core)
    remove_orphans(core, orphans)
    for store in core.stores:
        store.sweep_temp()


def sweep_dead_writers(core: VaultCore) -> None:
    for token in core.manifest.pending_writers():
        if not core.writers.dead(token):
            continue
        rows = core.manifest.pending_writes_of(token)
        gone, _ = core.delete_shares(rows)
        core.manifest.drop_pending_writes(gone)
        if len(gone) == len(rows):
            core.writers.remove(token)
        log.info("removed %d share(s) of an interrupted write", len(gone))


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
    """Shares in stores that the manifest does not know. Stores are listed *before* the
    manifest is read: a concurrent put commits its pending rows before writing, so any file
    seen here that belongs to a live write is already in the manifest read afterwards."""
    listings: dict[int, list[str]] = {}
    health: list[StoreHealth] = []
    for x, store in enumerate(core.stores, start=1):
        try:
            listings[x] = list(store.list())
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
            try:
                unseal(core.keys, blob)
                ours = True
            except ShareFormatError:
                ours = False
            orphans.append(OrphanShare(x, core.stores[x - 1].url, sid, ours))
    return orphans, health


def remove_orphans(core: VaultCore, orphans: list[OrphanShare]) -> int:
    """Delete the orphans that carry this vault's tag; a foreign file is reported, never deleted."""
    ours = [(o.x, o.share_id) for o in orphans if o.ours]
    if not ours:
        return 0
    gone, _ = core.delete_shares(ours)
    log.info("swept %d orphan share(s)", len(gone))
    return len(gone)
