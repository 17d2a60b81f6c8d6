"""Storing images: validate, record pending writes, seal and write n shares, commit (docs/vault.md).

Everything from the tombstone check to the commit runs under the vault's writer lock (writers.py):
an erase cannot slip between a batch's check and its commit, so a forgotten person never comes back.
Each image's bytes get a keyed hash (never a plain one: that would link a face across datasets);
the same bytes again for the same person are skipped, for another person refused with both ids.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from facefed.client.vault.core import VaultCore
from facefed.client.vault.errors import DuplicateImage, InvalidImage, VaultError
from facefed.client.vault.manifest import NewImage
from facefed.client.vault.sharefile import LEN_PREFIX, bucket, seal
from facefed.client.vault.sharefile import ShareHeader as ShareHeader
from facefed.client.vault.tombstones import lift_tombstones, tombstoned
from facefed.client.vault.validate import check_image, check_person_id
from facefed.common.shamir import random_bytes, split

MAX_SOURCE_NAME = 255

STORED, DUPLICATE, REFUSED = "stored", "duplicate", "refused"


@dataclass(frozen=True)
class PutOutcome:
    """What became of one item of a batch: `stored`, `duplicate` (same bytes already stored for this
    person: `image_id` is that image) or `refused` (`detail` says why; nothing of it was stored)."""

    status: str
    image_id: str | None
    detail: str = ""


def _check_item(person_id: object, data: object, source_name: object) -> tuple[str, bytes, str | None]:
    pid = check_person_id(person_id)  # type: ignore[arg-type]
    if source_name is not None and not isinstance(source_name, str):
        raise ValueError(f"source name must be a string, got {type(source_name).__name__}")
    if source_name is not None and not (source_name.isprintable() and 0 < len(source_name) <= MAX_SOURCE_NAME):
        raise ValueError(f"source name {source_name[:80]!r} must be 1..{MAX_SOURCE_NAME} printable characters")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidImage(f"image of person {pid}: expected bytes, got {type(data).__name__}")
    raw = bytes(data)
    check_image(raw, source_name or f"image of person {pid}")
    return pid, raw, source_name


def put_many(
    core: VaultCore, items: Sequence[tuple[str, bytes, str | None]], *, allow_reenrol: bool = False
) -> list[str]:
    """See `Vault.put_many`: all or nothing; a duplicate of the same person gives the stored image's id."""
    checked = [_check_item(*item) for item in items]
    outcomes = put_checked(core, checked, allow_reenrol=allow_reenrol, strict=True)
    return [o.image_id for o in outcomes if o.image_id is not None]


def add_images(
    core: VaultCore, items: Sequence[tuple[str, bytes, str | None]], *, allow_reenrol: bool = False
) -> list[PutOutcome]:
    """See `Vault.add_images`: bad items are refused one by one, the rest are stored."""
    outcomes: list[PutOutcome | None] = []
    checked: list[tuple[str, bytes, str | None]] = []
    for item in items:
        try:
            checked.append(_check_item(*item))
            outcomes.append(None)
        except (VaultError, ValueError) as e:
            outcomes.append(PutOutcome(REFUSED, None, str(e)))
    results = iter(put_checked(core, checked, allow_reenrol=allow_reenrol, strict=False))
    return [o if o is not None else next(results) for o in outcomes]


def put_checked(
    core: VaultCore, checked: list[tuple[str, bytes, str | None]], *, allow_reenrol: bool, strict: bool
) -> list[PutOutcome]:
    if not checked:
        return []
    hashes = [core.keys.content_hash(data) for _, data, _ in checked]
    with core.writing("put"):
        outcomes: list[PutOutcome | None] = [None] * len(checked)
        forgotten = tombstoned(core.path, [pid for pid, _, _ in checked])
        if forgotten and not allow_reenrol:
            if strict:
                raise VaultError(
                    f"person {forgotten[0]!r} asked to be forgotten at this site; nothing was stored. "
                    f"Enrol them again only with their new consent, using --allow-reenrol"
                )
            for i, (pid, _, _) in enumerate(checked):
                if pid in forgotten:
                    outcomes[i] = PutOutcome(
                        REFUSED, None, f"person {pid!r} asked to be forgotten at this site (--allow-reenrol)"
                    )
        known = core.manifest.by_content(hashes)
        first_in_batch: dict[str, int] = {}
        for i, ((pid, _, src), h) in enumerate(zip(checked, hashes)):
            if outcomes[i] is not None:
                continue
            other: tuple[str, str | None] | None = None
            if h in known:
                other = known[h]
            elif h in first_in_batch:
                other = (checked[first_in_batch[h]][0], None)
            if other is None:
                first_in_batch[h] = i
                continue
            name = src or "image"
            if other[0] == pid:
                outcomes[i] = PutOutcome(DUPLICATE, other[1], f"{name}: the same image of {pid!r} is already stored")
                continue
            msg = (
                f"{name}: the same image is already stored for person {other[0]!r}; refused for person {pid!r} "
                f"(one photo cannot show two people)"
            )
            if strict:
                raise DuplicateImage(msg + "; nothing was stored")
            outcomes[i] = PutOutcome(REFUSED, None, msg)
        todo = [i for i, o in enumerate(outcomes) if o is None]
        ids = _write(core, [checked[i] for i in todo], [hashes[i] for i in todo])
        for i, image_id in zip(todo, ids):
            outcomes[i] = PutOutcome(STORED, image_id)
        if strict:  # a duplicate earlier in the same batch: its image id is now known
            for i, o in enumerate(outcomes):
                if o is not None and o.status == DUPLICATE and o.image_id is None:
                    outcomes[i] = PutOutcome(DUPLICATE, outcomes[first_in_batch[hashes[i]]].image_id, o.detail)  # type: ignore[union-attr]
        lifted = [pid for pid in forgotten if any(checked[i][0] == pid for i in todo)]
        if lifted:  # enrolled again by the operator's explicit choice: later imports need no flag
            lift_tombstones(core.path, lifted)
    return [o for o in outcomes if o is not None]


def _write(core: VaultCore, checked: list[tuple[str, bytes, str | None]], hashes: list[str]) -> list[str]:
    """Pending rows, n shares per image, commit; on any failure everything written is removed."""
    if not checked:
        return []
    assert core.lock.held
    pseudonyms: dict[str, str] = {}
    for person_id, _, _ in checked:
        if person_id not in pseudonyms:
            pseudonyms[person_id] = core.manifest.pseudonym(person_id) or secrets.token_hex(16)
    plans = [
        NewImage(
            image_id=secrets.token_hex(16),
            person_id=pid,
            pseudonym=pseudonyms[pid],
            size=len(data),
            padded=bucket(LEN_PREFIX.size + len(data)),
            source_name=src,
            shares={x: secrets.token_hex(16) for x in range(1, core.n + 1)},
            content_hash=h,
        )
        for (pid, data, src), h in zip(checked, hashes)
    ]
    all_shares = [(x, sid) for plan in plans for x, sid in plan.shares.items()]
    core.manifest.add_pending_writes(f"{secrets.token_hex(8)}", all_shares)
    try:
        write_all(core, seal_batch(core, plans, [data for _, data, _ in checked]))
        core.manifest.commit_images(plans)
    except BaseException:
        gone, _ = core.delete_shares(all_shares, why="could not remove a share of the failed write (next open will)")
        core.manifest.drop_pending_writes(gone)
        raise
    return [plan.image_id for plan in plans]


def seal_batch(core: VaultCore, plans: list[NewImage], images: list[bytes]) -> list[list[tuple[str, bytes]]]:
    """Share files for a batch, per store. Each image is split on its own: one big split would
    save call overhead but its buffers (> 128 KiB) come from fresh mmaps and page faults cost more."""
    per_store: list[list[tuple[str, bytes]]] = [[] for _ in range(core.n)]
    for plan, data in zip(plans, images):
        framed = LEN_PREFIX.pack(len(data)) + data
        pad = plan.padded - len(framed)
        pads = random_bytes(core.n * pad)
        owner = core.keys.owner(plan.pseudonym)
        for i, share in enumerate(split(framed, core.n, core.k)):
            header = ShareHeader(share.x, core.k, core.n, plan.shares[share.x], plan.image_id, owner, plan.padded)
            blob = seal(core.keys, header, share.data, pads[i * pad : (i + 1) * pad])
            per_store[i].append((plan.shares[share.x], blob))
    return per_store


def write_all(core: VaultCore, per_store: list[list[tuple[str, bytes]]]) -> None:
    """Each store's shares in parallel (one `put_many` per store); the first error is raised after all end."""
    futures = [core.executor().submit(core.stores[i].put_many, per_store[i]) for i in range(core.n)]
    errors = []
    for f in futures:  # wait for every store before any cleanup starts
        try:
            f.result()
        except Exception as e:  # noqa: BLE001 - re-raised below
            errors.append(e)
    if errors:
        raise errors[0]
