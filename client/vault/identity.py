"""Store identities: each store carries a record, written at `vault init`, saying which vault it
belongs to and which x-coordinate it holds; `Vault.open` checks every store against it.

    {"facefed_store": 1, "vault": <vault id>, "x": <x>, "n": <n>, "tag": <HMAC>}

The vault id is a keyed hash of the vault key (so two vaults never share one, and it reveals
nothing); the tag is an HMAC with the share tag key over the other fields, so a store holder cannot
forge or edit a record. A store whose record names another x (swapped disks, a reordered
vault.toml) or another vault is *misplaced*: the vault reads, writes and deletes nothing in it and
says so (`vault verify`); `vault remap` puts swapped stores back in order. A local store keeps the
record in the dot file `.facefed-store`, a remote one under the reserved share id `IDENTITY_ID`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass

from facefed.client.vault.sharefile import ShareKeys

IDENTITY_VERSION = 1


def vault_id(master: bytes) -> str:
    return hmac.new(master, b"facefed vault id v1", hashlib.sha256).hexdigest()[:32]


def _tag(keys: ShareKeys, body: dict[str, object]) -> str:
    text = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(keys.tag_key, b"facefed store identity\x00" + text, hashlib.sha256).hexdigest()


def make_record(keys: ShareKeys, vid: str, x: int, n: int) -> bytes:
    body: dict[str, object] = {"facefed_store": IDENTITY_VERSION, "vault": vid, "x": x, "n": n}
    return (json.dumps({**body, "tag": _tag(keys, body)}, sort_keys=True) + "\n").encode()


@dataclass(frozen=True)
class Identity:
    ours: bool  # the tag verifies with this vault's key and the vault id is ours
    x: int | None
    n: int | None


def parse_record(keys: ShareKeys, vid: str, record: bytes) -> Identity:
    try:
        obj = json.loads(record)
        body = {k: obj[k] for k in ("facefed_store", "vault", "x", "n")}
        tag = obj["tag"]
    except (ValueError, KeyError, TypeError):
        return Identity(False, None, None)
    if not isinstance(tag, str) or not hmac.compare_digest(tag, _tag(keys, body)) or body["vault"] != vid:
        return Identity(False, None, None)
    x, n = body["x"], body["n"]
    return Identity(True, x if isinstance(x, int) else None, n if isinstance(n, int) else None)
