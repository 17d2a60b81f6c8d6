"""`facefed-server evaluate` and `export`: the LFW verification protocol on a model named by id, and
the file of the model a site or user should use.

`--model` takes a name (`current`: the newest run's best checkpoint on the validation pairs, `latest`, a
run id, a checkpoint id as `status` prints it; server/ledger/models.py) with `--state`, or a checkpoint file. The protocol is the one the ledger's per-round evaluation uses
(10-fold CV thresholds, flip averaging; server/evaluation.py `PROTOCOL_FLIP`), so a model reads the same
number in `status`, `train`, `report` and here.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from facefed.common.cli import fail, out_console, print_json, ticking

PAIR_FILES = ("pairsDevTest.txt", "pairs.txt")  # the protocol's test files (pairsDevTrain: training people)

StateOpt = Annotated[
    Path | None,
    typer.Option(
        "--state",
        envvar="FACEFED_SERVER_STATE",
        help="Server state directory: resolves model names and the LFW that `train` recorded.",
    ),
]


def _say(msg: str) -> None:
    typer.echo(f"[{time.strftime('%H:%M:%S')}] {msg}", err=True)


def resolve_models(state: Path | None, names: list[str]) -> tuple[list[Path], list[str], dict[str, str | None]]:
    """Model names -> checkpoint files, their ids, and the data `train` recorded (if --state)."""
    from facefed.server.ledger.db import Ledger
    from facefed.server.ledger.models import ModelNotFound, resolve
    from facefed.server.state import StateDirError, StatePaths

    paths: list[Path] = []
    ids: list[str] = []
    recorded: dict[str, str | None] = {}
    try:
        sp = StatePaths.at(state) if state is not None else None
    except StateDirError as e:
        fail(str(e))
    ledger = Ledger(sp.ledger) if sp is not None and sp.ledger.is_file() else None
    try:
        for name in names:
            r = resolve(ledger, name)
            paths += r.paths
            ids += r.ids
    except ModelNotFound as e:
        fail(str(e))
    finally:
        if ledger is not None:
            ledger.close()
    if sp is not None:
        recorded = sp.recorded_data()
    return paths, ids, recorded


def evaluate(
    model: Annotated[
        list[str],
        typer.Option(
            "--model",
            help="`current` (= `best`: the newest run's best live checkpoint on the validation pairs), `latest` "
            "(its last committed round), a run id (its latest live model), a checkpoint id (with --state), or a "
            "checkpoint file; repeat it for the shard models of a sharded job (evaluated as their ensemble)",
        ),
    ],
    state: StateOpt = None,
    lfw: Annotated[
        str | None, typer.Option("--lfw", help="LFW archive or tree (default: recorded in --state, else $FACEFED_LFW)")
    ] = None,
    pairs: Annotated[
        str, typer.Option("--pairs", help="pairsDevTest.txt (View 1 test) or pairs.txt (View 2, 10 folds)")
    ] = "pairsDevTest.txt",
    unseen: Annotated[
        bool,
        typer.Option(
            "--unseen",
            help="only the pairs with no person LFW-built sites train on (peopleDevTrain's people with >= 2 "
            "images; official folds): the honest View 2 figure for a model trained on them",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object instead of the table")] = False,
    max_pairs: Annotated[
        int | None,
        typer.Option("--max-pairs", min=20, help="quick look on a balanced subset of the pairs (not the protocol)"),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto (cuda when available), cpu or cuda")] = "auto",
    preprocess: Annotated[
        str,
        typer.Option(
            "--preprocess",
            help="aligned: detect + 5-point alignment (the field's protocol, and the ledger's); "
            "fixed-crop: the old fixed box, as a baseline",
        ),
    ] = "aligned",
) -> None:
    """Accuracy (10-fold CV thresholds, mean ± std, flip averaging), ROC AUC and TAR@FAR on LFW pairs."""
    # torch and LFW load here, not at import: every other facefed-server command starts fast.
    from facefed.common.errors import FacefedError
    from facefed.common.evaluate import EvalCache
    from facefed.common.lfw import LFW, LFWFormatError
    from facefed.common.model.mobilefacenet import CheckpointMismatch, load_checkpoint
    from facefed.common.paths import DataNotFound, lfw_path
    from facefed.server.evaluation import PROTOCOL_FLIP

    if preprocess not in ("aligned", "fixed-crop"):
        fail(f"--preprocess must be aligned or fixed-crop, got {preprocess!r}")
    if pairs not in PAIR_FILES:
        fail(
            f"--pairs must be pairsDevTest.txt or pairs.txt, got {pairs!r} (pairsDevTrain's people are training people)"
        )
    files, ids, recorded = resolve_models(state, model)
    nets: list[Any] = []
    meta: dict[str, Any] = {}
    for path in files:
        try:
            net, meta = load_checkpoint(path)
        except (FileNotFoundError, CheckpointMismatch) as e:
            fail(str(e))
        nets.append(net)
    t0 = time.monotonic()
    try:
        where = lfw_path(lfw or recorded.get("lfw"), how="pass --lfw PATH (or --state of a server that trained)")
        _say(f"reading {pairs} from {where}, detecting and aligning its faces ({preprocess}) ...")
        cache = EvalCache(
            LFW(where),
            pairs,
            flip=PROTOCOL_FLIP,
            max_pairs=max_pairs,
            preprocess=preprocess,
            device=device,
            unseen=unseen,
        )
    except (DataNotFound, LFWFormatError, FacefedError) as e:
        fail(str(e))
    n_img = len(cache.keys) * (2 if PROTOCOL_FLIP else 1) * len(nets)
    _say(f"decoded {len(cache.keys)} images in {time.monotonic() - t0:.1f} s; embedding {n_img} views ...")
    t1 = time.monotonic()
    with ticking(f"embedding {n_img} views"):
        result = cache.evaluate(nets[0]) if len(nets) == 1 else cache.evaluate_ensemble(nets)
    dt = time.monotonic() - t1
    _say(f"embedded in {dt:.1f} s ({n_img / max(dt, 1e-9):.0f} images/s)")
    name = ids[0] if len(ids) == 1 else f"{len(ids)}-shard ensemble ({', '.join(ids)})"
    if as_json:
        print_json(
            {
                "model": ids if len(ids) > 1 else ids[0],
                "files": [str(f) for f in files],
                "meta": meta,
                **result.to_dict(),
            }
        )
        return
    table = Table(title=f"LFW {cache.label}{' (subset)' if max_pairs else ''}: {name}")
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
    table.add_row("flip averaging", "yes" if result.flip else "no", "the protocol of the ledger's evaluation too")
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
    out_console().print(table)


def export(
    out: Annotated[Path, typer.Option("--out", help="Where to write the model file.")],
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="`current` (= `best`: the newest run's best live checkpoint on the validation pairs, "
            "never a deleted one), `latest` (its last committed round), a run id or a checkpoint id.",
        ),
    ] = "current",
    state: StateOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out.")] = False,
) -> None:
    """Write the model a site or user should use (default: the current one, the best on validation) to a
    file, with its id and sha256."""
    from facefed.common.model.mobilefacenet import sha256_file

    if state is None:
        fail("export needs --state DIR (or FACEFED_SERVER_STATE) to know which models exist")
    files, ids, _ = resolve_models(state, [model])
    if len(files) != 1:
        fail(f"{model} names a sharded job's {len(files)} shard models ({', '.join(ids)}); export them one by one")
    if out.exists() and not force:
        fail(f"{out} exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.copyfile(files[0], tmp)
    tmp.replace(out)
    digest = sha256_file(out)
    typer.echo(f"exported {ids[0]} to {out} (sha256 {digest})")
    if not sys.stdout.isatty():
        sys.stdout.flush()


def report(
    state: Annotated[Path, typer.Option("--state", envvar="FACEFED_SERVER_STATE", help="Server state directory.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for report.html and the CSV files.")] = Path("report"),
) -> None:
    """Write a self-contained HTML report (accuracy and epsilon per round, ROC, forget requests,
    participation; plots embedded) and CSV files of the same data."""
    from facefed.server.report import ReportError, write_report
    from facefed.server.state import StateDirError, StatePaths

    try:
        rep = write_report(StatePaths.at(state), out)
    except (StateDirError, ReportError) as e:
        fail(str(e))
    typer.echo(f"report: {rep.html.resolve()}")
    typer.echo(f"csv: {', '.join(str(p) for p in rep.csvs)}")


def register(app: typer.Typer) -> None:
    """Add the `evaluate` and `export` commands to the main CLI."""
    app.command("evaluate")(evaluate)
    app.command("export")(export)
    app.command("report")(report)
