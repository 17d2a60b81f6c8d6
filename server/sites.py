"""The sites a round or a query goes to: registered, online, and who each node is.

With node authentication a node is the site whose registered key fingerprint (ledger) matches the
node's public key, and a reply claiming another name is rejected. Without authentication (local
tests, simulation) a node is whoever it says it is in its query replies (`node_site`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.serverapp import Grid

from facefed.common.fedconfig import FederationConfig
from facefed.common.nodekeys import fingerprint_pem
from facefed.server.ledger.db import Ledger


@dataclass
class SiteSlot:
    """A node chosen for a round and the site it is (None until it says so, without authentication)."""

    node_id: int
    site: str | None


@dataclass
class Sites:
    grid: Grid
    ledger: Ledger
    node_site: dict[int, str] = field(default_factory=dict)  # learnt from query replies (no authentication)
    phase: Callable[[str], None] = lambda _text: None  # what we are waiting for, for the operator

    def registered(self) -> dict[str, str]:
        """fingerprint -> site name, for active registered sites (empty without authentication)."""
        return {s.fingerprint: s.name for s in self.ledger.sites() if s.active}

    def name_of(self, slot: SiteSlot) -> str | None:
        return slot.site or self.node_site.get(slot.node_id)

    def choose(self, cfg: FederationConfig | None) -> tuple[list[SiteSlot], list[str]]:
        """Online nodes that are our sites, and the sites we expect (to name the missing ones)."""
        registered = self.registered()
        slots: list[SiteSlot] = []
        for n in self.grid.get_nodes():
            site: str | None = None
            if registered:
                fp = fingerprint_pem(n.public_key) if getattr(n, "public_key", b"") else None
                site = registered.get(fp) if fp else None
                if site is None:
                    continue  # a node whose key is not (or no longer) registered with us
            if cfg is not None and cfg.sites is not None and site is not None and site not in cfg.sites:
                continue
            slots.append(SiteSlot(n.node_id, site))
        expected = list(cfg.sites) if cfg is not None and cfg.sites is not None else sorted(registered.values())
        return slots, expected

    def wait(self, cfg: FederationConfig) -> tuple[list[SiteSlot], list[str]]:
        """`choose`, once `min_sites` are online or `wait_for_sites_s` has passed."""
        deadline = time.monotonic() + cfg.wait_for_sites_s
        while True:
            slots, expected = self.choose(cfg)
            if len(slots) >= cfg.min_sites or time.monotonic() >= deadline:
                return slots, expected
            self.phase(
                f"waiting for sites: {len(slots)} online, min_sites={cfg.min_sites} "
                f"(up to {max(0.0, deadline - time.monotonic()):.0f} s more)"
            )
            time.sleep(1.0)
