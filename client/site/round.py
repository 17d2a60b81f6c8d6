"""One federated round of local DP training at a site: what the ClientApp (or the site's warm
worker, see client/site/worker.py) does with a `train` message from the server.

Everything that must outlive the round is on disk, under the site's state directory (from the node
config written by `facefed-client start`):

    STATE/heads/<run>/r<round>-a<attempt>.pt   the site's private margin head after each round
    VAULT/accountant.json                      the vault's privacy accountant (epsilon accumulates)
    STATE/contributions.sqlite                 who (by pseudonym) was trained on in which run and round
    STATE/logs/rounds.jsonl                    loss, counts, timings: the site's own log, never sent
(every path is named in client/state.py).

Per round: check the order against the site's privacy policy first (client/training/privacy.py:
refused with SiteRefused before any image is read or the accountant changes), then (run id, round,
training config) and that the frozen part of our model is
the server's (same prefix fingerprint); open the vault and decode the faces in memory (no plain image
is ever written); load the head the server says this site's last committed round produced; train
with the trainer (per-person DP-SGD; refused before any step if it would pass the site's budget);
save the new head, log the contributions; reply with the shared tail only, plus the DP outputs and
public facts (common/protocol/train.py TrainMetrics). The head never leaves this process except to the site's own disk.

Simulation (`facefed-server simulate`): a node without a vault but with Flower's `partition-id` is a
virtual site whose people are a partition of LFW peopleDevTrain, detected and aligned as a vault import
stores them (`faces_from_lfw`: images with no face are skipped); paths come from the run config.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from facefed.client.forget.contributions import ContributionLog
from facefed.client.state import SiteState, register_state
from facefed.client.training.faces import SiteFaces, faces_from_lfw, faces_from_vault
from facefed.client.training.privacy import check_order, open_accountant, plan, policy_of
from facefed.client.training.shard_state import ShardStateError, accountant_path, shard_key
from facefed.client.training.trainer import train_local
from facefed.common.accountant import BudgetExceeded, SiteAccountant
from facefed.common.config import TrainConfig, validate_config
from facefed.common.lfw import ImageKey
from facefed.common.model.heads import MarginHead
from facefed.common.model.mobilefacenet import build_embedder, load_shared_state, prefix_fingerprint, shared_state
from facefed.common.nodekeys import check_site_name
from facefed.common.paths import pretrained_path
from facefed.common.protocol.train import SiteRefused, TrainOrder, problems
from facefed.common.shards import shard_of

# simulation: ray reuses worker processes (see _SimulatedLFW); (archive, sites, people, images) -> data
_LFW_CACHE: dict[tuple[str, int, int, int], tuple[list[list[str]], _SimulatedLFW]] = {}


class SiteConfigError(SiteRefused, ValueError):
    """The node or the order from the server is unusable; the message names the key and the remedy
    (a refusal of kind "config", common/protocol/train.py)."""

    def __init__(self, reason: str) -> None:
        super().__init__("config", reason)


@dataclass(frozen=True)
class Site:
    name: str
    state: Path
    vault: Path | None
    pretrained: Path
    threads: int
    sim_lfw: str | None = None
    sim_partition: tuple[int, int] | None = None
    sim_people: int = 0
    sim_max_images: int = 0

    @property
    def files(self) -> SiteState:
        return SiteState(self.state, self.vault)

    @property
    def contributions_path(self) -> Path:
        return self.files.contributions

    def head_path(self, run_id: str, rnd: int, attempt: int) -> Path:
        return self.files.head_path(run_id, rnd, attempt)


@dataclass(frozen=True)
class Order:
    """What the server asks for this round (validated: it comes over the network)."""

    run_id: str
    round: int
    attempt: int
    parent_checkpoint: str
    prefix: str
    train: TrainConfig
    steps: int
    seed: int
    head_round: int
    head_attempt: int
    expected_site: str
    head_run: str = ""  # the run whose head to continue (a replay continues the replaced run's head)
    shard: int = 0  # SISA shards (common/shards.py): this run trains only the site's people of `shard`
    shards: int = 1


def site_of(nc: dict, rc: dict) -> Site:
    """The site this node is, from Flower's node config (and run config, for simulation)."""
    threads = int(nc.get("threads", 1))
    if "vault" in nc:
        for key in ("site", "state"):
            if not str(nc.get(key, "")):
                raise SiteConfigError(f"node config lacks `{key}`; start the node with `facefed-client start`")
        pre = nc.get("pretrained") or None
        return Site(
            name=check_site_name(str(nc["site"])),
            state=Path(str(nc["state"])),
            vault=Path(str(nc["vault"])),
            pretrained=pretrained_path(pre),
            threads=max(1, threads),
        )
    if "partition-id" in nc:  # a virtual site on Flower's simulation engine
        pid, n = int(nc["partition-id"]), int(nc["num-partitions"])
        state, lfw = str(rc.get("sim-state", "")), str(rc.get("sim-lfw", ""))
        if not state or not lfw:
            raise SiteConfigError(
                "a simulated site needs run config `sim-state` and `sim-lfw`; use `facefed-server simulate`"
            )
        name = f"sim-{pid:03d}"
        return Site(
            name=name,
            state=Path(state) / "sites" / name,
            vault=None,
            pretrained=pretrained_path(str(rc.get("sim-pretrained", "")) or None),
            threads=1,
            sim_lfw=lfw,
            sim_partition=(pid, n),
            sim_people=int(rc.get("sim-people", 0)),
            sim_max_images=int(rc.get("sim-max-images", 0)),
        )
    raise SiteConfigError("node config has no `vault`: start this node with `facefed-client start --vault DIR`")


def order_of(config: Mapping[str, Any]) -> Order:
    """The server's `train` order (common/protocol/train.py), checked: it comes over the network."""
    try:
        wire = TrainOrder.from_config(config)
    except ValidationError as e:
        raise SiteConfigError(
            f"the server's order is malformed ({problems(e)}); server and site facefed versions differ?"
        ) from None
    try:
        train = validate_config(json.loads(wire.train_config), TrainConfig, where="server order")
    except json.JSONDecodeError as e:
        raise SiteConfigError(f"the server's training config is not JSON ({e})") from None
    if wire.shard >= wire.shards:
        raise SiteConfigError(f"the server's order has shard {wire.shard!r} of {wire.shards!r}")
    return Order(
        run_id=wire.run_id,
        round=wire.round,
        attempt=wire.attempt,
        parent_checkpoint=wire.parent_checkpoint,
        prefix=wire.prefix_fingerprint,
        train=train,
        steps=wire.steps,
        seed=wire.seed,
        head_round=wire.head_round,
        head_attempt=wire.head_attempt,
        expected_site=wire.expected_site,
        head_run=wire.head_run or wire.run_id,
        shard=wire.shard,
        shards=wire.shards,
    )


class _SimulatedLFW:
    """LFW images of every virtual site, read in one pass of the archive per simulation process.

    A gzip'd tar has no random access: reading one site's images scans the whole archive. Ray reuses
    a few worker processes for many virtual sites, so the first site a process serves reads the
    images of all of them (at most `max_images` per person) into memory and the rest are served
    from there. The bytes are the archive's; `faces_from_lfw` aligns them (landmarks cached on disk,
    so only the first round of the first simulation detects). Simulation only; a real site reads its vault.
    """

    def __init__(self, path: str, partitions: list[list[str]], max_images: int | None):
        from facefed.common.lfw import LFW

        lfw = LFW(path)
        self._keys = {n: (lfw.keys(n)[:max_images] if max_images else lfw.keys(n)) for p in partitions for n in p}
        self._bytes = lfw.load_images([k for ks in self._keys.values() for k in ks])

    def keys(self, name: str) -> list[ImageKey]:
        return self._keys[name]

    def load_images(self, keys: Iterable[ImageKey]) -> dict[ImageKey, bytes]:
        return {k: self._bytes[k] for k in keys}


def load_faces(site: Site, shard: int = 0, shards: int = 1) -> SiteFaces:
    """The site's faces, in memory; with shards, only the people the keyed hash puts in `shard`."""
    if site.vault is not None:
        from facefed.client.vault.tombstones import vault_key
        from facefed.client.vault.vault import Vault

        with Vault.open(site.vault) as vault:
            people = None
            if shards > 1:
                vkey = shard_key(vault_key(site.vault))
                people = sorted(r.person_id for r in vault.people() if shard_of(vkey, r.pseudonym, shards) == shard)
            return faces_from_vault(vault, people, threads=site.threads)
    if site.sim_partition is None or site.sim_lfw is None:
        raise SiteConfigError(f"site {site.name} has neither a vault nor a simulation partition")
    pid, n = site.sim_partition
    key = (site.sim_lfw, n, site.sim_people, site.sim_max_images)
    cached = _LFW_CACHE.get(key)
    if cached is None:
        from facefed.common.lfw import LFW, partition_people

        lfw = LFW(site.sim_lfw)
        counts = lfw.counts()
        # People with at least 2 images: a person seen once cannot teach the margin anything.
        parts = partition_people([p for p in lfw.people("peopleDevTrain.txt") if counts[p] >= 2], n)
        parts = [p[: site.sim_people] if site.sim_people else p for p in parts]
        cached = _LFW_CACHE[key] = (parts, _SimulatedLFW(site.sim_lfw, parts, site.sim_max_images or None))
    parts, images = cached
    names = parts[pid]
    if shards > 1:
        skey = shard_key(hashlib.sha256(f"facefed simulated site {pid}".encode()).digest())
        from facefed.client.training.faces import lfw_pseudonym

        names = [n for n in names if shard_of(skey, lfw_pseudonym(n), shards) == shard]
    return faces_from_lfw(images, names, max_per_person=site.sim_max_images or None, threads=site.threads)


def load_head(site: Site, order: Order) -> tuple[MarginHead, str]:
    """The head to continue from, and where it came from (for the reply and the logs)."""
    fresh = MarginHead(scale=order.train.scale, margin=order.train.margin, seed=order.seed)
    if order.head_round == 0:
        return fresh, "fresh"
    if order.head_round > 0:
        path = site.head_path(order.head_run or order.run_id, order.head_round, order.head_attempt)
        if not path.is_file():  # state lost at the site: a fresh head is data-independent, hence safe
            return fresh, f"fresh (missing {path.name})"
        return MarginHead.load(path), path.name
    # Unknown to the server (no authentication): our latest head of this run before this round.
    earlier = [((rnd, att), p) for rnd, att, p in site.files.round_heads(order.run_id) if rnd < order.round]
    if not earlier:
        return fresh, "fresh"
    best = max(earlier)[1]
    return MarginHead.load(best), best.name


@dataclass(frozen=True)
class RoundResult:
    arrays: dict[str, np.ndarray]  # the shared tail only
    metrics: dict[str, float | int]
    info: dict[str, str | int]


def _log_round(site: Site, entry: dict[str, Any]) -> None:
    """Append one line to the site's own round log (STATE/logs/rounds.jsonl): never sent anywhere."""
    path = site.files.logs_dir / "rounds.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({"at": time.time(), **entry}) + "\n")


def run_round(site: Site, order: Order, received: dict[str, np.ndarray]) -> RoundResult:
    """Train this site's faces for one round from the received shared tail; persist head and logs."""
    t0 = time.perf_counter()
    if order.expected_site and order.expected_site != site.name:
        raise SiteConfigError(
            f"the server knows this node as site {order.expected_site!r} but it was started "
            f"with --site {site.name}; restart it with --site {order.expected_site}"
        )
    if site.vault is not None:  # before anything else: the order against the site's own policy
        check_order(policy_of(site.vault), order.train, order.steps)
        register_state(site.vault, site.state)  # forget must find this state directory
    torch.set_num_threads(site.threads)

    model = build_embedder(site.pretrained, train_from=order.train.train_from)
    if prefix_fingerprint(model) != order.prefix:
        raise SiteConfigError(
            f"this site's pretrained weights ({site.pretrained}) differ from the server's base "
            f"model (frozen layers do not match); use the same pretrained file as the server"
        )
    load_shared_state(model, {k: torch.from_numpy(np.array(a, dtype=np.float32)) for k, a in received.items()})

    # The site's policy first (client/training/privacy.py): an order asking for less privacy than it
    # allows, or over budget, is refused here, before any image is read or the accountant changes.
    head, head_from = load_head(site, order)  # the head file only (random rows + earlier DP outputs)
    fresh = not head.probed
    accountant: SiteAccountant | None
    publish_people = True
    if site.vault is not None:
        policy = policy_of(site.vault)
        accountant = open_accountant(site.files, policy, order.shard, order.shards)
        cfg, _ = plan(policy, order.train, accountant, order.steps, fresh_head=fresh)
        publish_people = policy.publish_people
    else:  # a simulated site: no operator, the server's own experiment takes the order's settings
        cfg = order.train.model_copy(update={"steps": order.steps})
        try:
            acc_path = accountant_path(site.files, order.shard, order.shards)
        except ShardStateError as e:
            raise SiteRefused("config", str(e)) from None
        accountant = (
            None
            if cfg.privacy_unit == "none"
            else SiteAccountant(acc_path, cfg.delta, cfg.max_epsilon, cfg.privacy_unit)
        )
    faces = load_faces(site, order.shard, order.shards)
    if faces.n_people == 0:
        raise SiteRefused("data", f"this site has no people in shard {order.shard} of {order.shards}")
    t_train = time.perf_counter()
    # No seed: the DP randomness is AES-256-CTR under a fresh OS key (client/training/dprandom.py),
    # never derivable from the server's order (the server could otherwise strip the noise).
    try:
        report = train_local(model, head, faces, cfg, accountant)
    except BudgetExceeded as e:
        raise SiteRefused("budget", str(e)) from None

    head_path = site.head_path(order.run_id, order.round, order.attempt)
    head_path.parent.mkdir(parents=True, exist_ok=True)
    head.save(head_path)
    pseudonym_of = dict(zip(faces.person_ids, faces.pseudonyms, strict=True))
    with ContributionLog(site.contributions_path) as log:  # keyed by pseudonym, never the operator's id
        log.record(
            run_id=order.run_id,
            rnd=order.round,
            attempt=order.attempt,
            parent_checkpoint=order.parent_checkpoint,
            images={pseudonym_of[pid]: int(c) for pid, c in zip(faces.person_ids, faces.counts.tolist(), strict=True)},
            sampled={pseudonym_of[pid] for pid in report.people_used},
            head_file=str(head_path.relative_to(site.state)),
        )

    eps = report.epsilon if math.isfinite(report.epsilon) else -1.0
    # The site's own log keeps what the server must not see (loss, image and sampled counts, timings).
    _log_round(
        site,
        {
            "run": order.run_id,
            "round": order.round,
            "attempt": order.attempt,
            "people": faces.n_people,
            "images": faces.n_images,
            "sampled_images": report.images,
            "people_sampled": len(report.people_used),
            "loss": float(report.loss),
            "epsilon": float(eps),
            "train_s": time.perf_counter() - t_train,
            "round_s": time.perf_counter() - t0,
        },
    )
    # The reply: DP outputs and public facts only (common/protocol/train.py TrainMetrics). The steps are
    # the order's (and the probe steps of a fresh head, which the server knows it asked for); epsilon
    # and delta are functions of public parameters (sigma, q, steps) and of the policy.
    metrics = {
        "num-people": faces.n_people if publish_people else 1,
        "steps": report.steps,
        "probe-steps": report.probe_steps,
        "epsilon": float(eps),
        "delta": float(report.delta),
        "noise-multiplier": float(report.noise_multiplier),
        "sample-rate": float(report.sample_rate),
    }
    info: dict[str, str | int] = {
        "name": site.name,
        "unit": report.unit,
        "accountant": report.accountant,
        "head-from": head_from,
    }
    return RoundResult({k: v.detach().cpu().numpy() for k, v in shared_state(model).items()}, metrics, info)
