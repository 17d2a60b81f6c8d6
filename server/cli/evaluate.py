"""`facefed-server evaluate`: the LFW verification protocol on a model checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from facefed.common.cli import fail

PAIR_FILES = ("pairsDevTest.txt", "pairs.txt")  # the protocol's test files (pairsDevTrain: training people)


def evaluate(
    model: list[Path] = typer.Option(
        ...,
        "--model",
        help="facefed checkpoint (or the CASIA .pth) to evaluate; "
        "repeat it for the shard models of a sharded job (evaluated as their ensemble)",
    ),
    lfw: str = typer.Option(None, "--lfw", help="LFW archive or tree (default: $FACEFED_LFW)"),
    pairs: str = typer.Option(
        "pairsDevTest.txt", "--pairs", help="pairsDevTest.txt (View 1 test) or pairs.txt (View 2, 10 folds)"
    ),
    no_flip: bool = typer.Option(False, "--no-flip", help="no horizontal-flip test-time averaging"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of the table"),
    max_pairs: int = typer.Option(
        None, "--max-pairs", min=20, help="quick look on a balanced subset of the pairs (not the protocol)"
    ),
    device: str = typer.Option("auto", "--device", help="auto (cuda when available), cpu or cuda"),
    preprocess: str = typer.Option(
        "aligned",
        "--preprocess",
        help="aligned: detect + 5-point alignment (the field's protocol); fixed-crop: the old fixed box, as a baseline",
    ),
) -> None:
    """Accuracy (10-fold CV thresholds, mean ± std), ROC AUC and TAR@FAR on LFW pairs."""
    # torch and LFW load here, not at import: every other facefed-server command starts fast.
    from facefed.common.errors import FacefedError
    from facefed.common.evaluate import EvalCache
    from facefed.common.lfw import LFW, LFWFormatError
    from facefed.common.model.mobilefacenet import CheckpointMismatch, load_checkpoint
    from facefed.common.paths import DataNotFound

    if preprocess not in ("aligned", "fixed-crop"):
        fail(f"--preprocess must be aligned or fixed-crop, got {preprocess!r}")
    if pairs not in PAIR_FILES:
        fail(
            f"--pairs must be pairsDevTest.txt or pairs.txt, got {pairs!r} (pairsDevTrain's people are training people)"
        )
    nets: list[Any] = []
    meta: dict[str, Any] = {}
    for path in model:
        try:
            net, meta = load_checkpoint(path)
        except (FileNotFoundError, CheckpointMismatch) as e:
            fail(str(e))
        nets.append(net)
    try:
        data = LFW(lfw)
        cache = EvalCache(data, pairs, flip=not no_flip, max_pairs=max_pairs, preprocess=preprocess, device=device)
    except (DataNotFound, LFWFormatError, FacefedError) as e:
        fail(str(e))
    result = cache.evaluate(nets[0]) if len(nets) == 1 else cache.evaluate_ensemble(nets)
    name = model[0].name if len(model) == 1 else f"{len(model)}-shard ensemble ({', '.join(m.name for m in model)})"
    if as_json:
        print(
            json.dumps(
                {
                    "model": [str(m) for m in model] if len(model) > 1 else str(model[0]),
                    "meta": meta,
                    **result.to_dict(),
                },
                indent=1,
                default=str,
            )
        )
        return
    table = Table(title=f"LFW {pairs}{' (subset)' if max_pairs else ''}: {name}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("note")
    table.add_row(
        "accuracy",
        f"{100 * result.accuracy_mean:.2f} ± {100 * result.accuracy_std:.2f} %",
        f"{len(result.fold_accuracies)}-fold CV thresholds, {result.n_pairs} pairs",
    )
    table.add_row("ROC AUC", f"{result.auc:.4f}", "")
    for t in result.tar_at_far.values():
        table.add_row(
            f"TAR @ FAR={t.far:g}",
            f"{100 * t.tar:.2f} %",
            f"{t.n_impostor} impostor pairs, {t.impostors_accepted} accepted",
        )
    table.add_row("flip averaging", "yes" if result.flip else "no", "")
    fell = result.fallbacks
    table.add_row(
        "preprocessing",
        result.preprocess,
        f"{len(fell)} image(s) with no face: fixed-crop fallback ({', '.join(fell[:4])}{', ...' if len(fell) > 4 else ''})"
        if fell
        else "",
    )
    if "epsilon" in meta:
        table.add_row(
            "privacy",
            f"ε={meta['epsilon']}",
            f"δ={meta.get('delta')}, per {meta.get('privacy_unit')}, {meta.get('accountant')}",
        )
    Console().print(table)


def register(app: typer.Typer) -> None:
    """Add the `evaluate` command to the main CLI."""
    app.command("evaluate")(evaluate)
