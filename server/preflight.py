"""What the server can check about a configuration before it asks any site to train.

`FederationConfig` itself refuses what no site could accept (e.g. `train.delta` at or over
1/`train.min_people`). Here, against the ledger: each site's accountant fixes its privacy unit and
delta for good (common/accountant.py), so a config that changes them would be refused by every site
that trained before; and delta must stay below one over the number of people a site reported.
Each problem is one line naming the site, the key and the remedy.
"""

from __future__ import annotations

from facefed.common.fedconfig import FederationConfig
from facefed.server.ledger.db import Ledger


def problems(cfg: FederationConfig, ledger: Ledger) -> list[str]:
    """The rules this config breaks for the sites the ledger knows (empty: nothing known against it)."""
    t = cfg.train
    if t.privacy_unit == "none":
        return []
    active = {s.name for s in ledger.sites() if s.active}
    out: list[str] = []
    for site, last in sorted(ledger.site_epsilons().items()):
        if active and site not in active or (cfg.sites is not None and site not in cfg.sites):
            continue
        if last.unit and last.unit != t.privacy_unit:
            out.append(
                f"site {site}'s accountant counts per {last.unit}; train.privacy_unit = {t.privacy_unit!r} would "
                f"be refused (the privacy unit is fixed per site): set privacy_unit = {last.unit!r}"
            )
        if last.delta is not None and last.delta == last.delta and last.delta != t.delta:
            out.append(
                f"site {site}'s accountant uses delta {last.delta:g}; train.delta = {t.delta:g} would be refused "
                f"(delta is fixed per site): set delta = {last.delta:g}"
            )
        if last.people and t.privacy_unit == "person" and t.delta >= 1.0 / last.people:
            out.append(f"site {site} has {last.people} people; train.delta = {t.delta:g} must be below 1/{last.people}")
    return out
