"""Storing images: validate, record pending writes, seal and write n shares, commit (docs/vault.md)."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from facefed.client.vault.core import VaultCore
from facefed.client.vault.errors import InvalidImage, VaultError
from facefed.client.vault.manifest import ConcurrentPersonCreation, NewImage
from facefed.client.vault.sharefile import LEN_PREFIX, ShareHeader, bucket, seal
from facefed.client.vault.tombstones import lift_tombstones, tombstoned
from facefed.client.vault.validate import check_image, check_person_id
from facefed.common.shamir import random_bytes, split

MAX_SOURCE_NAME = 255


def put_many(
    core: VaultCore, items: Sequence[tuple[str, bytes, str | None]], *, allow_reenrol: bool = False
) -> list[str]:
    """See `Vault.put_many`."""
    checked = []
    for person_id, data, source_name in items:
        check_person_id(person_id)
        if source_name is not None and not isinstance(source_name, str):
            raise ValueError(f"source name must be a string, got {type(source_name).__name__}")
        if source_name is not None and not (source_name.isprintable() and 0 < len(source_name) <= MAX_SOURCE_NAME):
            raise ValueError(f"source name {source_name[:80]!r} must be 1..{MAX_SOURCE_NAME} printable characters")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidImage(f"image of person {person_id}: expected bytes, got {type(data).__name__}")
        data = bytes(data)
        check_image(data, source_name or f"image of person {person_id}")
        checked.append((person_id, data, source_name))
    if not checked:
        return []
    forgotten = tombstoned(core.path, [pid for pid, _, _ in checked])
    if forgotten and not allow_reenrol:
        raise VaultError(
            f"person {forgotten[0]!r} asked to be forgotten at this site; nothing was stored. "
            f"Enrol them again only with their new consent, using --allow-reenrol"
        )
    writer = core.writers.ensure()
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
        )
        for pid, data, src in checked
    ]
    all_shares = [(x, sid) for plan in plans for x, sid in plan.shares.items()]
    core.manifest.add_pending_writes(writer, all_shares)
    try:
        write_all(core, seal_batch(core, plans, [data for _, data, _ in checked]))
        core.manifest.commit_images(plans)
    except BaseException as e:
        gone, _ = core.delete_shares(all_shares)
        core.manifest.drop_pending_writes(gone)
        if isinstance(e, ConcurrentPersonCreation):
            raise VaultError(
                f"person {e.args[0]!r} was added by another process at the same moment; "
                f"nothing was stored, run the command again"
            ) from None
        raise
    if forgotten:  # enrolled again by the operator's explicit choice: later imports need no flag
        lift_tombstones(core.path, forgotten)
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
