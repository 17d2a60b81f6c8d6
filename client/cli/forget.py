"""`facefed-client forget`: a person's right to be forgotten at this site, and where each request stands.

    facefed-client forget --vault DIR --person ID [--reason TEXT] [--state DIR]
    facefed-client forget status --vault DIR [REQ] [--json]

Exit codes: 0 done; 1 done but something is left (share deletions pending in an unreachable store,
a head file that could not be checked); 2 bad input, nothing changed.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from facefed.client.state import NODE_STATE_SUBDIR, requests_path
from facefed.common.cli import fail

out = Console(highlight=False, soft_wrap=True)

app = typer.Typer(
    help="Forget a person at this site (erase now; the server unlearns and signs a receipt).",
    invoke_without_command=True,
    no_args_is_help=False,
)

VaultOpt = Annotated[
    Path | None,
    typer.Option("--vault", envvar="FACEFED_VAULT", file_okay=False, help="Vault directory (or set FACEFED_VAULT)."),
]


def _when(t: float | None) -> str:
    return "-" if t is None else dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _errors() -> tuple[type[Exception], ...]:
    from facefed.client.vault import VaultError
    from facefed.client.vault.stores.base import StoreError
    from facefed.common.errors import FacefedError

    return (FacefedError, VaultError, StoreError, ValueError)


@app.callback()
def request(
    ctx: typer.Context,
    vault: VaultOpt = None,
    person: Annotated[str | None, typer.Option("--person", help="The person id to forget (as enrolled).")] = None,
    reason: Annotated[
        str | None, typer.Option("--reason", help="Why (kept in the request log; must not name the person).")
    ] = None,
    state: Annotated[
        Path | None,
        typer.Option(
            "--state",
            file_okay=False,
            help=f"The site's state directory (default: VAULT/{NODE_STATE_SUBDIR}, as `facefed-client start` uses).",
        ),
    ] = None,
) -> None:
    """Erase a person's faces from every store now, delete their head rows and contribution records,
    and record the request (its id is printed). Repeating it is harmless."""
    if ctx.invoked_subcommand is not None:
        if person is not None:
            fail("--person goes with `forget`, not with a subcommand")
        return
    if vault is None or person is None:
        fail("give --vault DIR and --person ID (or `forget status --vault DIR` to see requests)")
    from facefed.client.forget.erase import run_forget

    try:
        o = run_forget(vault, state, person, reason)
    except _errors() as e:
        fail(str(e))
    except OSError as e:
        fail(f"{e.filename or ''}: {e.strerror or e}".lstrip(": "))
    r = o.request
    out.print(
        f"request {r.request_id} ({'repeated: already erased' if o.repeated else 'new'}), "
        f"person pseudonym {r.pseudonym}",
        markup=False,
    )
    if o.erased_now:
        out.print(
            f"data erased: {r.images} image(s), {r.shares_destroyed} share(s) destroyed in "
            f"{r.erase_seconds:.3f} s from request to data erased",
            markup=False,
        )
    else:
        out.print(
            f"data erased earlier ({_when(r.erased_at)}): {r.shares_destroyed} share(s) destroyed, "
            f"{r.erase_seconds:.3f} s from request to data erased; nothing new to destroy",
            markup=False,
        )
    if o.state_dir is not None and not o.state_dir.is_dir():
        out.print(
            f"[yellow]no site state at {escape(str(o.state_dir))}: no head or contribution log cleaned; "
            f"pass --state DIR if this site's node keeps its state elsewhere[/yellow]"
        )
    out.print(
        f"head rows removed: {o.head_rows_removed_now} now ({r.head_rows_removed} in all) from "
        f"{len(r.head_files)} head file(s); contribution rows deleted: {o.contribution_rows_now} now "
        f"({r.contribution_rows} in all)",
        markup=False,
    )
    for s in r.contributions:
        out.print(
            f"  run {s.run_id}: used in rounds {s.first_round}..{s.last_round} -> the server must roll back "
            f"to before round {s.first_round}",
            markup=False,
        )
    if not r.contributions:
        out.print("  no training round used this person: the model needs no replay", markup=False)
    out.print("stage: data_erased; the server unlearns on its next query (see `facefed-client forget status`)")
    left = False
    if r.shares_pending:
        out.print(
            f"[yellow]{r.shares_pending} share deletion(s) pending in unreachable store(s); they finish on the "
            f"next vault open, verify or repair[/yellow]"
        )
        left = True
    for p in o.problems:
        out.print(f"[yellow]{escape(p)}[/yellow]")
        left = True
    if left:
        raise typer.Exit(1)


@app.command()
def status(
    vault: VaultOpt = None,
    request_id: Annotated[str | None, typer.Argument(metavar="[REQ]", help="One request id (fr-...).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show each request's stages: received, data erased, model unlearned, receipt issued."""
    if vault is None:
        fail("give --vault DIR")
    from facefed.client.forget.requests import RequestLog, vault_key

    try:
        if not requests_path(vault).is_file():  # read-only: do not create the log just to look
            vault_key(vault)  # still say so if DIR is no vault at all
            if request_id is not None:
                fail(f"no forget request {request_id} at vault {vault} (no request was ever made there)")
            out.print("[]" if as_json else "no forget requests at this vault", markup=False)
            return
        with RequestLog(vault) as log:
            reqs = [log.get(request_id)] if request_id is not None else log.all()
            if any(r.shares_pending for r in reqs):  # deletions finished since? ask the vault
                from facefed.client.forget.erase import refresh_pending
                from facefed.client.vault import Vault

                with Vault.open(vault) as v:
                    reqs = [refresh_pending(v, log, r) for r in reqs]
    except _errors() as e:
        fail(str(e))
    receipts = {r.request_id: _read_receipt(r.receipt_path) for r in reqs if r.receipt_path}
    if as_json:
        out.print(
            json.dumps(
                [{**r.to_json(), "receipt": receipts.get(r.request_id)} for r in reqs], indent=2, sort_keys=True
            ),
            markup=False,
        )
        return
    if not reqs:
        out.print("no forget requests at this vault")
        return
    table = Table(title="forget requests")
    table.add_column("request", no_wrap=True)  # ids are copied from here: never split them
    for col in ("pseudonym", "received", "data erased", "model unlearned", "receipt"):
        table.add_column(col, overflow="fold")
    for r in reqs:
        erased = (
            "-"
            if r.erased_at is None
            else f"{_when(r.erased_at)}\n{r.shares_destroyed} shares destroyed ({r.erase_seconds:.3f} s)"
            + (f"\n{r.shares_pending} pending" if r.shares_pending else "")
        )
        unlearned = (
            "-"
            if r.unlearned_at is None
            else f"{_when(r.unlearned_at)}\nrun {r.run_id} round {r.round}\n{r.checkpoint_id}\n"
            f"sha256 {(r.checkpoint_sha256 or '')[:16]}..."
        )
        receipt = "-" if r.receipt_path is None else f"{_when(r.receipt_at)}\n{r.receipt_path}"
        table.add_row(
            r.request_id, r.pseudonym, _when(r.received_at), escape(erased), escape(unlearned), escape(receipt)
        )
    out.print(table)
    for rid, doc in receipts.items():
        out.print(f"receipt of {rid}:", markup=False)
        out.print(json.dumps(doc, indent=2, sort_keys=True), markup=False)


def _read_receipt(path: str | None) -> dict | str | None:
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        return f"unreadable receipt file {path}: {e}"


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="forget")
