"""`facefed-server unlearn`, `requests` and `receipts verify`: the server's side of the right to be forgotten."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from facefed.common.cli import fail
from facefed.common.paths import DataNotFound, lfw_path, pretrained_path
from facefed.server.cli.federation import StateOpt, _paths, _ts
from facefed.server.ledger.db import Ledger, LedgerError

receipts_app = typer.Typer(help="Check forget receipts against the ledger.", no_args_is_help=True)
console = Console()
KeyOpt = Annotated[
    Path | None,
    typer.Option(
        "--receipt-key",
        help="Ed25519 receipt signing key (default: receipts.key beside the server's CA from "
        "`facefed-server certs`, else STATE/keys/receipts.key, made on first use).",
    ),
]


def unlearn(
    state: StateOpt,
    wait: Annotated[
        float,
        typer.Option(
            "--wait", help="Seconds to wait for every registered site to be online before asking for requests."
        ),
    ] = 60.0,
    receipt_key: KeyOpt = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Stop following after this many seconds.")] = 0.0,
    lfw: Annotated[
        str | None,
        typer.Option("--lfw", help="LFW for the replays' evaluation (default: what `train` recorded in STATE)."),
    ] = None,
    pretrained: Annotated[
        str | None,
        typer.Option("--pretrained", help="The base model (default: what `train` recorded in STATE)."),
    ] = None,
) -> None:
    """Collect the sites' forget requests now, replay every run they taint, and deliver signed receipts.

    Training runs do the same before they start and between rounds; this command is for when no
    training is due. A replay is new training: it spends the sites' privacy budget and is refused,
    with the numbers, if a site's budget does not allow it."""
    from facefed.server.ops.progress import follow_unlearn, submit
    from facefed.server.ops.submission import write_submission

    paths = _paths(state)
    if wait < 0:
        fail("--wait must be >= 0")
    if receipt_key is not None and not receipt_key.is_file():
        fail(f"--receipt-key {receipt_key} does not exist; make one with `facefed-server certs --out DIR`")
    known = paths.recorded_data()
    try:
        pre = str(pretrained_path(pretrained or known.get("pretrained"), how="pass --pretrained PATH").resolve())
        lfw = str(lfw_path(lfw or known.get("lfw"), how="pass --lfw PATH").resolve())
    except DataNotFound as e:
        fail(str(e))
        raise
    started = time.time()
    sub = write_submission(
        paths,
        None,
        run_id="",
        resume=False,
        lfw=lfw,
        pretrained=pre,
        mode="unlearn",
        receipt_key=str(receipt_key.resolve()) if receipt_key else None,
        wait_s=wait,
    )
    try:
        flwr_run = submit(paths, sub)
    except Exception as e:  # SuperLinkError: the server is not running
        fail(str(e), 3)
    typer.echo(f"unlearning (Flower run {flwr_run}); following the ledger")
    raise typer.Exit(follow_unlearn(paths, flwr_run, started, timeout=timeout))


def requests(
    state: StateOpt, as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False
) -> None:
    """Forget requests the sites reported, and how each was unlearned."""
    paths = _paths(state)
    with Ledger(paths.ledger) as ledger:
        rows = ledger.requests()
    if as_json:
        typer.echo(json.dumps([r.__dict__ for r in rows], indent=1, default=str))
        return
    t = Table(title="forget requests")
    for col in (
        "request",
        "site",
        "pseudonym",
        "received",
        "erased",
        "status",
        "replay run",
        "model",
        "deleted",
        "receipt delivered",
    ):
        t.add_column(col)
    for r in rows:
        t.add_row(
            r.request_id,
            r.site,
            r.pseudonym[:8] + "..",
            _ts(r.received_at),
            _ts(r.erased_at),
            r.status,
            r.replay_run_id or "-",
            r.model_checkpoint or "-",
            str(len(r.checkpoints_deleted)),
            _ts(r.delivered_at) if r.delivered_at else "-",
        )
    console.print(t)
    for r in rows:
        if r.detail:
            typer.echo(f"{r.request_id}: {r.detail}")


@receipts_app.command("verify")
def receipts_verify(
    file: Annotated[Path, typer.Argument(help="A receipt (VAULT/receipts/<request>.json at the site).")],
    state: StateOpt,
    key: Annotated[
        Path | None, typer.Option("--key", help="The server's receipts.pub (default: found as for signing).")
    ] = None,
) -> None:
    """Check a receipt's signature, and its lineage against the ledger: the model descends from a
    checkpoint that predates the person's first contribution, and no later round used them."""
    from facefed.server.forget.receipts import key_paths, verify_receipt

    paths = _paths(state)
    if not file.is_file():
        fail(f"receipt {file} does not exist")
    if file.stat().st_size > 1_000_000:
        fail(f"receipt {file} is larger than 1 MB: not a receipt")
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        fail(f"receipt {file} is not JSON ({e})")
    pub = key if key is not None else key_paths(paths)[1]
    if not pub.is_file():
        fail(f"no receipt public key at {pub}; pass --key receipts.pub")
    try:
        with Ledger(paths.ledger) as ledger:
            receipt, checks = verify_receipt(doc, pub.read_bytes(), ledger)
    except LedgerError as e:
        fail(str(e))
    for c in checks:
        typer.secho(
            f"  [{'ok' if c.ok else 'FAIL'}] {c.what}" + (f": {c.detail}" if c.detail else ""),
            fg=None if c.ok else typer.colors.RED,
        )
    if all(c.ok for c in checks):
        assert receipt is not None
        typer.secho(
            f"receipt {receipt.request_id} VERIFIED: site {receipt.site}, person {receipt.person_pseudonym[:8]}.., "
            f"model {receipt.model_id} ({receipt.model_sha256[:12]}), rolled back to round "
            f"{receipt.rollback_round}, replayed {receipt.replayed_rounds or 'nothing'}",
            fg=typer.colors.GREEN,
        )
        return
    typer.secho(f"receipt {file} does NOT verify", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("unlearn")(unlearn)
    app.command("requests")(requests)
    app.add_typer(receipts_app, name="receipts")
