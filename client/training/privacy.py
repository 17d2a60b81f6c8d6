"""The site's own privacy: its policy, the one accountant of its vault, and the check of every order.

The server is not trusted with the site's people, so it does not set their privacy either. The
site's operator writes a policy (`facefed-client policy set`, `VAULT/policy.json`, 0600, atomic);
every training request, the server's train order or a local `facefed-client train` config, is
checked against it BEFORE anything runs (no image read, no accountant change): a request that asks
for less privacy than the policy allows is refused with `SiteRefused("policy", ...)`, naming the
field, what was asked, what the policy allows and the command that changes it. A request may ask
for more privacy (more noise, a lower rate, a smaller budget), never less.

What the policy fixes, and why each affects privacy:
  unit              "person" only: the neighbouring relation is add/remove one person (all their images)
  delta             the accountant's delta (also < 1 / number of people, checked against the vault)
  max_epsilon       the budget: the vault's total epsilon (every release ever made) may not pass it
  min_noise_multiplier   the floor of sigma, for DP-SGD steps and the centring release alike
  max_sample_rate   Poisson rate q (a higher q, same sigma: more epsilon per step)
  max_steps         DP-SGD steps one order may take (probe + fine-tune): bounds the spend per round
  max_grad_norm     clipping C: epsilon does not depend on it (the noise is sigma C), but the size of
                    each released update does; a ceiling keeps a server from asking for huge steps
  publish_people    whether a reply carries the number of enrolled people (the averaging weight), a
                    count the DP analysis treats as public (docs/privacy.md); false: a reply says 1

One accountant per vault (`VAULT/accountant.json`, or `accountant-s<k>of<S>.json` with S shards):
`facefed-client train` and the federation node use the same file whatever their state directories,
so the epsilon is that of the vault's people over every release ever made from them. With shards,
each person trains in one shard only, so the shard accountants compose in parallel per person (a
person's epsilon is their shard's; `status` shows the largest), and a vault trains with one shard
count (client/training/shard_state.py). The accountant is created with the policy, the first time;
from then on a missing or unreadable accountant refuses training (`SiteRefused("data")`): it never
reads as epsilon 0.

Simulated sites (`facefed-server simulate`) have no vault and no operator: they take the order's
settings, as the simulation is the server's own experiment.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from facefed.client.state import SiteState, policy_path
from facefed.client.training.shard_state import ShardStateError, accountant_path
from facefed.common.accountant import AccountantMismatch, BudgetExceeded, SiteAccountant, epsilon_of
from facefed.common.config import TrainConfig
from facefed.common.durable import atomic_write_bytes
from facefed.common.protocol.train import SiteRefused

FORMAT = "facefed-policy/1"
SET = "facefed-client policy set --vault VAULT"


class Policy(BaseModel):
    """The site's privacy policy (VAULT/policy.json)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    format: Literal["facefed-policy/1"] = "facefed-policy/1"
    unit: Literal["person"] = "person"
    delta: float = Field(default=1e-5, gt=0, lt=1)
    max_epsilon: float = Field(default=10.0, gt=0, le=1000)
    min_noise_multiplier: float = Field(default=1.0, gt=0)
    max_sample_rate: float = Field(default=0.5, gt=0, le=1)
    max_steps: int = Field(default=1000, ge=0)
    max_grad_norm: float = Field(default=10.0, gt=0)
    publish_people: bool = True


FLAGS = {
    "delta": "--delta",
    "max_epsilon": "--max-epsilon",
    "min_noise_multiplier": "--min-noise-multiplier",
    "max_sample_rate": "--max-sample-rate",
    "max_steps": "--max-steps",
    "max_grad_norm": "--max-grad-norm",
    "unit": "--unit",
}


# -- the policy file -------------------------------------------------------------------------------
@contextmanager
def _lock(vault: Path) -> Iterator[None]:
    with open(vault / ".privacy.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_policy(vault: Path) -> Policy | None:
    """The vault's policy, None if it has none yet; SiteRefused("data") if unreadable."""
    path = policy_path(vault)
    if not path.exists():
        return None
    try:
        return Policy.model_validate_json(path.read_bytes())
    except (OSError, ValidationError) as e:
        raise SiteRefused(
            "data", f"the site's privacy policy {path} is unreadable ({str(e)[:200]}); restore it or `{SET}`"
        ) from None


def write_policy(vault: Path, policy: Policy) -> Path:
    """Write the policy (0600, atomically), creating the vault's accountant if it has none and never trained."""
    vault = Path(vault)
    with _lock(vault):
        _ensure_accountant(vault, policy, read_policy(vault))
        # atomic_write_bytes' temp file is created 0600 (mkstemp) and keeps that mode when renamed
        atomic_write_bytes(policy_path(vault), (policy.model_dump_json(indent=1) + "\n").encode())
    return policy_path(vault)


def policy_of(vault: Path) -> Policy:
    """The vault's policy; the first time, the default one is written (and the accountant created)."""
    vault = Path(vault)
    if not (vault / "vault.toml").is_file():
        raise SiteRefused("data", f"{vault} is not a vault (no vault.toml); give the site's --vault")
    found = read_policy(vault)
    if found is not None:
        return found
    with _lock(vault):
        found = read_policy(vault)
        if found is None:
            found = Policy()
            _ensure_accountant(vault, found, None)
            # atomic_write_bytes' temp file is created 0600 (mkstemp) and keeps that mode when renamed
        atomic_write_bytes(policy_path(vault), (found.model_dump_json(indent=1) + "\n").encode())
    return found


def _ensure_accountant(vault: Path, new: Policy, old: Policy | None) -> None:
    files = SiteState(vault / ".", vault)  # only the vault paths are used
    existing = [files.accountant, *(p for _, _, p in files.shard_accountants())]
    if not any(p.exists() for p in existing):
        if old is not None:
            raise SiteRefused(
                "data",
                f"the vault's privacy accountant {files.accountant} is missing but its policy exists: the "
                "epsilon already spent is unknown, and is never read as 0; restore the accountant from a backup",
            )
        SiteAccountant(files.accountant, new.delta, new.max_epsilon, new.unit).create()
        return
    if old is not None and old.delta != new.delta:
        present = [p for p in existing if p.exists()]
        for p in present:
            if SiteAccountant(p, old.delta, old.max_epsilon, old.unit, required=True).steps:
                raise SiteRefused(
                    "policy",
                    f"delta is fixed once the vault has trained (the accountant {p.name} counts at delta "
                    f"{old.delta:g}); keep --delta {old.delta:g}",
                )
        for p in present:  # nothing recorded yet: the empty accountants move to the new delta
            p.unlink()
            SiteAccountant(p, new.delta, new.max_epsilon, new.unit).create()


# -- the check of an order -------------------------------------------------------------------------
def _refuse(field: str, asked: object, allows: str) -> SiteRefused:
    flag = FLAGS.get(field, f"--{field.replace('_', '-')}")
    return SiteRefused(
        "policy",
        f"{field}: order asks {asked}, policy allows {allows}; change it with `facefed-client policy set {flag} ...`",
    )


def check_order(policy: Policy, cfg: TrainConfig, steps: int) -> None:
    """Refuse (SiteRefused "policy") a request for less privacy than the policy allows. Runs nothing."""
    if cfg.privacy_unit != policy.unit:
        raise _refuse("privacy_unit", repr(cfg.privacy_unit), repr(policy.unit))
    if cfg.delta > policy.delta:
        raise _refuse("delta", f"{cfg.delta:g}", f"<= {policy.delta:g}")
    if cfg.max_epsilon > policy.max_epsilon:
        raise _refuse("max_epsilon", f"{cfg.max_epsilon:g}", f"<= {policy.max_epsilon:g}")
    if cfg.noise_multiplier is not None and cfg.noise_multiplier < policy.min_noise_multiplier:
        raise _refuse("noise_multiplier", f"{cfg.noise_multiplier:g}", f">= {policy.min_noise_multiplier:g}")
    if cfg.center_noise is not None and cfg.center_noise < policy.min_noise_multiplier:
        raise _refuse("center_noise", f"{cfg.center_noise:g}", f">= {policy.min_noise_multiplier:g}")
    if cfg.sample_rate > policy.max_sample_rate:
        raise _refuse("sample_rate", f"{cfg.sample_rate:g}", f"<= {policy.max_sample_rate:g}")
    if steps + cfg.probe_steps > policy.max_steps:
        raise _refuse(
            "max_steps",
            f"{steps + cfg.probe_steps} steps ({cfg.probe_steps} probe + {steps})",
            f"<= {policy.max_steps}",
        )
    if cfg.max_grad_norm > policy.max_grad_norm:
        raise _refuse("max_grad_norm", f"{cfg.max_grad_norm:g}", f"<= {policy.max_grad_norm:g}")


def open_accountant(files: SiteState, policy: Policy, shard: int = 0, shards: int = 1) -> SiteAccountant:
    """The vault's accountant for this shard at the policy's delta and budget; SiteRefused("data") when it
    is missing (after the vault's first training) or unreadable, SiteRefused("config") for another shard count."""
    try:
        path = accountant_path(files, shard, shards)
    except ShardStateError as e:
        raise SiteRefused("config", str(e)) from None
    if not path.exists():
        siblings = [files.shard_accountant(k, shards) for k in range(shards)]
        if shards == 1 or any(p.exists() for p in siblings):
            raise SiteRefused(
                "data",
                f"the privacy accountant {path} is missing: the epsilon already spent on this vault's people "
                "is unknown and is never read as 0; restore it from a backup (nothing was trained)",
            )
        for p in siblings:  # the vault's first order with this shard count: all its accountants at once
            SiteAccountant(p, policy.delta, policy.max_epsilon, policy.unit).create()
    try:
        acc = SiteAccountant(path, policy.delta, policy.max_epsilon, policy.unit, required=True)
        acc.epsilon()
    except (AccountantMismatch, ValueError) as e:
        raise SiteRefused("data", f"the privacy accountant is unusable: {e}") from None
    return acc


def plan(
    policy: Policy, cfg: TrainConfig, acc: SiteAccountant, steps: int, *, fresh_head: bool
) -> tuple[TrainConfig, float]:
    """Check an order against the policy and the budget, before anything runs; return the config to
    train with (the noise multiplier resolved, delta and budget the site's) and the planned epsilon.
    SiteRefused: "policy" (less privacy than allowed) or "budget" (over the smaller of the two budgets)."""
    check_order(policy, cfg, steps)
    budget = min(cfg.max_epsilon, policy.max_epsilon)
    acc.max_epsilon = budget  # the trainer's own check (accountant.plan) holds it to the smaller budget too
    total = steps + (cfg.probe_steps if fresh_head else 0)
    extra = cfg.fresh_head_events() if fresh_head else []
    sigma = cfg.noise_multiplier
    try:
        if sigma is None:
            assert cfg.target_epsilon is not None  # TrainConfig: one of the two for private training
            sigma = acc.noise_for(min(cfg.target_epsilon, budget), cfg.sample_rate, total, extra=extra)
            if sigma < policy.min_noise_multiplier:
                raise _refuse(
                    "noise_multiplier", f"{sigma:g} (from target_epsilon)", f">= {policy.min_noise_multiplier:g}"
                )
        planned = acc.projected(sigma, cfg.sample_rate, total, extra=extra)
        if planned > budget:
            raise BudgetExceeded(planned, acc.epsilon(), budget, acc.delta, acc.unit)
        if cfg.delta < policy.delta:  # the order asks for a smaller delta: its budget holds at its delta too
            at_order = epsilon_of(acc.history() + list(extra) + [(sigma, cfg.sample_rate, total)], cfg.delta)
            if at_order > cfg.max_epsilon:
                raise BudgetExceeded(at_order, acc.epsilon(), cfg.max_epsilon, cfg.delta, acc.unit)
    except BudgetExceeded as e:
        raise SiteRefused("budget", str(e)) from None
    except ValueError as e:
        raise SiteRefused("budget", str(e)) from None
    out = cfg.model_copy(
        update={
            "noise_multiplier": sigma,
            "target_epsilon": None,
            "delta": policy.delta,
            "max_epsilon": budget,
            "steps": steps,
        }
    )
    return out, planned


# -- status ----------------------------------------------------------------------------------------
def status(vault: Path) -> dict[str, object]:
    """What `facefed-client status` shows: epsilon spent and left, with delta, unit, relation, accountant."""
    vault = Path(vault)
    policy = read_policy(vault)
    files = SiteState(vault / ".", vault)
    shown = policy or Policy()
    accountants = []
    for label, path in [("all people", files.accountant)] + [
        (f"shard {k} of {n}", p) for k, n, p in sorted(files.shard_accountants())
    ]:
        if not path.exists():
            continue
        try:
            acc = SiteAccountant(path, shown.delta, shown.max_epsilon, shown.unit)
            eps: float | None = acc.epsilon()
            steps = acc.steps
        except (AccountantMismatch, ValueError):
            eps, steps = None, 0
        accountants.append({"accountant": label, "file": path.name, "epsilon": eps, "steps": steps})
    spent = max((a["epsilon"] for a in accountants if isinstance(a["epsilon"], float)), default=None)
    missing = policy is not None and not accountants
    return {
        "vault": str(vault),
        "policy": shown.model_dump(),
        "policy_file": policy is not None,
        "unit": shown.unit,
        "neighbouring": "add/remove one person (all of their images)",
        "delta": shown.delta,
        "accountant": "rdp",
        "epsilon_spent": spent if not missing else None,
        "epsilon_left": None if spent is None or missing else max(0.0, shown.max_epsilon - spent),
        "max_epsilon": shown.max_epsilon,
        "accountants": accountants,
        "problem": "the accountant is missing: training is refused until it is restored" if missing else "",
    }


def preview(vault: Path, cfg: TrainConfig, *, rounds: int, steps: int, fresh_head: bool = True) -> dict[str, object]:
    """Predict the vault's epsilon after `rounds` orders of `steps` steps of `cfg` (nothing is recorded)."""
    policy = read_policy(vault) or Policy()
    check_order(policy, cfg, steps)
    files = SiteState(Path(vault) / ".", Path(vault))
    history = []
    if files.accountant.exists():
        history = SiteAccountant(files.accountant, policy.delta, policy.max_epsilon, policy.unit).history()
    extra = cfg.fresh_head_events() if fresh_head else []
    total = rounds * steps + (cfg.probe_steps if fresh_head else 0)
    if cfg.noise_multiplier is None:
        raise SiteRefused("config", "preview needs train.noise_multiplier (target_epsilon calibrates one call)")
    now = epsilon_of(history, policy.delta)
    after = epsilon_of(history + list(extra) + [(cfg.noise_multiplier, cfg.sample_rate, total)], policy.delta)
    return {
        "unit": policy.unit,
        "neighbouring": "add/remove one person",
        "delta": policy.delta,
        "accountant": "rdp",
        "epsilon_now": now,
        "epsilon_after": after,
        "budget": min(cfg.max_epsilon, policy.max_epsilon),
        "fits": after <= min(cfg.max_epsilon, policy.max_epsilon),
        "rounds": rounds,
        "steps": total,
    }
