"""Where a site keeps its privacy accountant per shard, and which of its people train in a shard.

With `shards = S > 1` (SISA-style, common/shards.py) every person trains in exactly one shard run, so
the shard runs touch disjoint people and compose in parallel per person: a person's epsilon is that
of their own shard. The vault keeps one accountant per shard (`VAULT/accountant-s<k>of<S>.json`, all S
created at the first sharded order, client/training/privacy.py) and reports
the shard's epsilon. `shards = 1` keeps the one `accountant.json`. The parallel argument needs one
fixed S per site: mixing shard counts (or sharded and unsharded training) at one site is refused,
because a person would then sit in several shards at once.

The assignment key is derived from the vault's secret key (so it is stable for the vault's life and
unknown outside the site); simulated sites derive theirs from their partition.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

from facefed.client.state import SiteState
from facefed.common.errors import FacefedError


class ShardStateError(FacefedError, ValueError):
    """The site's accountant state belongs to another shard count; the message says what to do."""


def _trained(path: Path) -> bool:
    """An accountant file that records steps (an unreadable one counts as trained: refuse, never guess)."""
    if not path.exists():
        return False
    try:
        return bool(json.loads(path.read_text()).get("events"))
    except (OSError, ValueError, AttributeError):
        return True


def accountant_path(site: SiteState, shard: int, shards: int) -> Path:
    """The accountant file for this shard (the vault's; a simulated site's state directory), refusing a
    shard count the site did not train with so far."""
    if not 0 <= shard < shards:
        raise ShardStateError(f"shard {shard} is not in 0..{shards - 1}")
    state = site.accountant_dir
    others = sorted({n for _, n, p in site.shard_accountants() if _trained(p)} - {shards})
    plain = _trained(site.accountant)
    if (shards == 1 and others) or (shards > 1 and (plain or others)):
        had = f"{others[0]} shards" if others else "no shards"
        raise ShardStateError(
            f"this site's privacy accountant ({state}) was kept for training with {had}; a site "
            f"trains with one shard count (the per-person guarantee composes in parallel over "
            f"disjoint shards only), so it cannot join a run with shards = {shards}"
        )
    return site.shard_accountant(shard, shards)


def shard_key(vault_key: bytes) -> bytes:
    return hmac.new(vault_key, b"facefed shard assignment v1", hashlib.sha256).digest()
