"""`facefed-client policy` and `facefed-client status`: the site's privacy policy and budget.

    facefed-client policy show    --vault V [--json]
    facefed-client policy set     --vault V [--delta D] [--max-epsilon E] [--min-noise-multiplier S]
                                            [--max-sample-rate Q] [--max-steps N] [--max-grad-norm C]
                                            [--publish-people/--no-publish-people]
    facefed-client policy preview --vault V --config C [--rounds R]
    facefed-client status         --vault V [--json]

The policy and the vault's accountant: client/training/privacy.py. Every epsilon printed here is per
person (neighbouring datasets: add/remove one person with all their images), at the policy's delta,
from the RDP accountant.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console

from facefed.common.cli import fail

out = Console(highlight=False, soft_wrap=True)
app = typer.Typer(
    help="The site's privacy policy: what any training order may ask of this vault.", no_args_is_help=True
)

VaultOpt = Annotated[
    Path,
    typer.Option("--vault", envvar="FACEFED_VAULT", file_okay=False, help="Vault directory (or set FACEFED_VAULT)."),
]
RELATION = "per person (add/remove one person), RDP accountant"


def _eps(x: object) -> str:
    return "unknown" if not isinstance(x, float) else ("inf" if x == float("inf") else f"{x:.3f}")


@app.command("show")
def show(vault: VaultOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """Print the vault's privacy policy."""
    from facefed.client.training.privacy import policy_of
    from facefed.common.protocol.train import SiteRefused

    try:
        p = policy_of(vault)
    except SiteRefused as e:
        fail(e.reason)
    if as_json:
        out.print(p.model_dump_json(indent=1))
        return
    for k, v in p.model_dump().items():
        out.print(f"{k:22} {v}")


@app.command("set")
def set_(
    vault: VaultOpt,
    delta: float = typer.Option(None, "--delta", help="the accountant's delta (< 1/people); fixed once trained"),
    max_epsilon: float = typer.Option(None, "--max-epsilon", help="the vault's total budget, per person"),
    min_noise: float = typer.Option(None, "--min-noise-multiplier", help="floor of sigma (DP-SGD and centring)"),
    max_rate: float = typer.Option(None, "--max-sample-rate", help="ceiling of the Poisson rate q"),
    max_steps: int = typer.Option(None, "--max-steps", help="DP steps one order may take (probe + fine-tune)"),
    max_clip: float = typer.Option(None, "--max-grad-norm", help="ceiling of the clipping norm C"),
    publish_people: bool = typer.Option(
        None, "--publish-people/--no-publish-people", help="replies carry the number of enrolled people"
    ),
) -> None:
    """Change the vault's privacy policy (written 0600, atomically); unset options keep their value."""
    from facefed.client.training.privacy import Policy, policy_of, write_policy
    from facefed.client.vault.errors import VaultError
    from facefed.client.vault.vault import Vault
    from facefed.common.protocol.train import SiteRefused

    try:
        current = policy_of(vault)
    except SiteRefused as e:
        fail(e.reason)
    changes = {
        k: v
        for k, v in dict(
            delta=delta,
            max_epsilon=max_epsilon,
            min_noise_multiplier=min_noise,
            max_sample_rate=max_rate,
            max_steps=max_steps,
            max_grad_norm=max_clip,
            publish_people=publish_people,
        ).items()
        if v is not None
    }
    try:
        new = Policy.model_validate({**current.model_dump(), **changes})
    except ValidationError as e:
        fail("; ".join(f"--{'-'.join(str(p) for p in x['loc']).replace('_', '-')}: {x['msg']}" for x in e.errors()))
    try:
        with Vault.open(vault) as v:
            people = len(v.people())
    except (VaultError, OSError) as e:
        fail(f"cannot open vault {vault}: {e}")
    if people and new.delta >= 1.0 / people:
        fail(f"--delta {new.delta:g} must be below 1/{people} (one over the number of people in the vault)")
    try:
        path = write_policy(vault, new)
    except SiteRefused as e:
        fail(e.reason)
    out.print(f"wrote {path}: " + ", ".join(f"{k} = {v}" for k, v in new.model_dump().items() if k != "format"))


@app.command("preview")
def preview(
    vault: VaultOpt,
    config: Path = typer.Option(..., "--config", help="a training config (TOML) or a federation config with [train]"),
    rounds: int = typer.Option(None, "--rounds", help="rounds (default: the federation config's, else 1)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Predict this vault's epsilon after training with CONFIG (nothing is run or recorded)."""
    from facefed.client.training import privacy
    from facefed.common.config import ConfigError, TrainConfig, validate_config
    from facefed.common.protocol.train import SiteRefused

    try:
        data = tomllib.loads(config.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        fail(f"config {config}: cannot read ({e})")
    n = 1
    if "train" in data:
        n = int(data.get("rounds", 1))
        data = data["train"]
    try:
        cfg = validate_config(data, TrainConfig, where=str(config))
        result = privacy.preview(vault, cfg, rounds=rounds or n, steps=cfg.steps)
    except ConfigError as e:
        fail(str(e))
    except SiteRefused as e:
        fail(f"refused ({e.kind}): {e.reason}")
    if as_json:
        out.print(json.dumps(result))
        return
    verdict = "within" if result["fits"] else "OVER"
    out.print(
        f"{result['rounds']} round(s), {result['steps']} DP steps: epsilon {_eps(result['epsilon_now'])} -> "
        f"{_eps(result['epsilon_after'])} at delta {result['delta']:g}, {RELATION}; {verdict} the budget "
        f"{result['budget']:g}"
    )


def status(vault: VaultOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """Epsilon spent and left on this vault's people (every release ever made from them)."""
    from facefed.client.training.privacy import status as privacy_status

    if not (vault / "vault.toml").is_file():
        fail(f"{vault} is not a vault (no vault.toml); give the site's --vault")
    s = privacy_status(vault)
    if as_json:
        out.print(json.dumps(s))
        return
    out.print(
        f"epsilon spent {_eps(s['epsilon_spent'])}, left {_eps(s['epsilon_left'])} of max_epsilon "
        f"{s['max_epsilon']:g}, at delta {s['delta']:g}, {RELATION}"
    )
    for a in s["accountants"]:  # type: ignore[attr-defined]
        out.print(f"  {a['accountant']:16} {a['file']:28} epsilon {_eps(a['epsilon'])}  ({a['steps']} steps)")
    if s["problem"]:
        out.print(f"problem: {s['problem']}")
        raise typer.Exit(1)


def register(main: typer.Typer) -> None:
    main.add_typer(app, name="policy")
    main.command("status")(status)
