"""`facefed-client train`: local (non-federated) training from a vault, for baselines.

The site's training state lives in `VAULT/train-state/` (or `--state DIR`; client/state.py): the private
margin head. The privacy accountant is the vault's own (`VAULT/accountant.json`, shared with the
federation node: epsilon accumulates over every release ever made from the vault's people), and the
config is checked against the site's policy (`facefed-client policy`) before anything runs. Faces are
read from the vault into memory only.
"""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from facefed.client.state import TRAIN_STATE_SUBDIR, SiteState, default_train_state, register_state
from facefed.common.cli import fail
from facefed.common.config import ConfigError, TrainConfig, load_config
from facefed.common.paths import DataNotFound, pretrained_path


def train(
    vault: Path = typer.Option(..., "--vault", help="the site's vault directory"),
    config: Path = typer.Option(..., "--config", help="training config (TOML, see configs/train*.toml)"),
    out: Path = typer.Option(..., "--out", help="where to write the trained checkpoint"),
    init: Path = typer.Option(
        None,
        "--init",
        help="start from this checkpoint (default: the pretrained model, "
        "or scratch if the config says train_from = conv1 and no pretrained)",
    ),
    state: Path = typer.Option(None, "--state", help=f"training state dir (default: VAULT/{TRAIN_STATE_SUBDIR})"),
    device: str = typer.Option("auto", "--device", help="auto (cuda when available), cpu or cuda"),
    seed: int = typer.Option(
        None,
        "--insecure-seed",
        hidden=True,
        help="INSECURE, tests and experiments only: fix the DP randomness (default: AES-256-CTR under a "
        "fresh OS key; noise that can be regenerated protects nothing)",
    ),
) -> None:
    """Train the embedder on this site's faces (DP-SGD per person by default) and save a checkpoint."""
    from facefed.client.training.faces import faces_from_vault
    from facefed.client.training.privacy import check_order, open_accountant, plan, policy_of
    from facefed.client.training.trainer import train_local
    from facefed.client.vault.errors import VaultError
    from facefed.client.vault.vault import Vault
    from facefed.common.accountant import BudgetExceeded
    from facefed.common.model.heads import HeadError, MarginHead
    from facefed.common.model.mobilefacenet import CheckpointMismatch, build_embedder, load_checkpoint, save_checkpoint
    from facefed.common.protocol.train import SiteRefused

    try:
        cfg = load_config(config, TrainConfig)
    except ConfigError as e:
        fail(str(e))
    try:  # the site's policy first: nothing is read or recorded for a config it refuses
        policy = policy_of(vault)
        check_order(policy, cfg, cfg.steps)
    except SiteRefused as e:
        fail(f"refused ({e.kind}): {e.reason}")
    out = out.expanduser()
    if out.exists() and out.is_dir():
        fail(f"--out {out} is a directory; give a file name, e.g. {out / 'model.ckpt'}")
    files = SiteState((state or default_train_state(vault)).expanduser(), vault)
    register_state(vault, files.state_dir)  # forget must find this head too
    console = Console()
    try:
        if init is not None:
            model, parent = load_checkpoint(init)
            model.train_from = cfg.train_from
        elif cfg.pretrained is not None or cfg.train_from != "conv1":
            model, parent = (
                build_embedder(pretrained_path(cfg.pretrained), train_from=cfg.train_from),
                {"source": "pretrained"},
            )
        else:
            model, parent = build_embedder(None, train_from="conv1"), {"source": "scratch"}
    except (DataNotFound, FileNotFoundError, CheckpointMismatch) as e:
        fail(str(e))
    head_file = files.head
    try:
        head = (
            MarginHead.load(head_file)
            if head_file.exists()
            else MarginHead(scale=cfg.scale, margin=cfg.margin, seed=seed or 0)
        )
        accountant = open_accountant(files, policy)
        cfg, _ = plan(policy, cfg, accountant, cfg.steps, fresh_head=not head.probed)
    except HeadError as e:
        fail(str(e))
    except SiteRefused as e:
        fail(f"refused ({e.kind}): {e.reason}")

    try:
        v = Vault.open(vault)
    except (VaultError, OSError) as e:
        fail(f"cannot open vault {vault}: {e}")
    try:
        with console.status(f"reading {len(v.people())} people from the vault (in memory only)"):
            faces = faces_from_vault(v)
    finally:
        v.close()

    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TextColumn("ε {task.fields[eps]}"),
        TextColumn("{task.fields[ips]:.0f} img/s"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("train", total=None, loss=math.nan, eps="-", ips=0.0)

        def progress(p) -> None:
            eps = "non-private" if not math.isfinite(p.epsilon) else f"{p.epsilon:.2f}"
            bar.update(
                task, total=p.total, completed=p.step, description=p.phase, loss=p.loss, eps=eps, ips=p.images_per_s
            )

        try:
            report = train_local(
                model, head, faces, cfg, accountant, insecure_seed=seed, progress=progress, device=device
            )
        except (BudgetExceeded, ValueError) as e:
            bar.stop()
            fail(str(e))
    head.save(head_file)
    meta = {
        "kind": "local",
        "parent": parent.get("sha256", parent.get("source")),
        "seed": seed,
        **report.metrics(),
        "privacy_unit": report.unit,
        "people": faces.n_people,
        "n_images": faces.n_images,
        "config": cfg.model_dump(),
    }
    digest = save_checkpoint(out, model, meta)
    eps = (
        "non-private (no guarantee)"
        if report.unit == "none"
        else f"ε = {report.epsilon:.3f} at δ = {report.delta:g}, per {report.unit}, {report.accountant.upper()} accountant"
    )
    console.print(
        f"trained {report.steps} steps ({report.images} samples, {report.wall_s:.1f} s, "
        f"{report.images_per_s:.0f} img/s), loss {report.loss:.3f}; {eps}"
    )
    console.print(f"wrote {out} (sha256 {digest})", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the `train` command to the main CLI."""
    app.command("train")(train)
