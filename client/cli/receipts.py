"""`facefed-client receipts`: the server's receipt key pinned at this site, and receipts checked here.

facefed-client receipts pin    --vault V KEY.pub [--replace]
facefed-client receipts verify RECEIPT.json (--vault V | --key KEY.pub)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from facefed.common.cli import fail

app = typer.Typer(help="Forget receipts at this site: pin the server's key, verify a receipt.", no_args_is_help=True)


@app.command("pin")
def pin(
    key: Annotated[
        Path, typer.Argument(help="The server's receipt public key (receipts.pub from `facefed-server certs`).")
    ],
    vault: Annotated[Path, typer.Option("--vault", envvar="FACEFED_VAULT", file_okay=False)],
    replace: Annotated[bool, typer.Option("--replace", help="Replace a different pinned key.")] = False,
) -> None:
    """Pin the server's receipt key: receipts signed by any other key are never stored."""
    from facefed.client.forget.receipts import KeyPinError, ReceiptError, pin_server_key

    try:
        fp = pin_server_key(vault, key.read_bytes(), replace=replace)
    except (OSError, KeyPinError, ReceiptError) as e:
        fail(str(e))
    typer.echo(f"pinned server receipt key {fp} at {vault}")


@app.command("verify")
def verify(
    receipt: Annotated[Path, typer.Argument(help="A receipt (VAULT/receipts/fr-....json).")],
    vault: Annotated[Path | None, typer.Option("--vault", envvar="FACEFED_VAULT", file_okay=False)] = None,
    key: Annotated[Path | None, typer.Option("--key", help="The server's receipt public key.")] = None,
) -> None:
    """Check a receipt's signature with only the receipt and the server's key (the pinned one by default)."""
    from facefed.client.forget.receipts import KeyPinError, ReceiptError, verify_at_site

    if vault is None and key is None:
        fail("give --vault (its pinned server key) or --key receipts.pub")
    try:
        doc = json.loads(receipt.read_text())
        r = verify_at_site(doc, vault, key.read_bytes() if key else None)
    except (OSError, ValueError, KeyPinError, ReceiptError) as e:
        typer.echo(f"receipt {receipt}: INVALID: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(
        f"receipt {r.request_id}: signature valid (server key {r.server_key_fingerprint}); person "
        f"{r.person_pseudonym} unlearned in {r.run_id}, first model without them {r.model_id}"
    )


def register(main: typer.Typer) -> None:
    main.add_typer(app, name="receipts")
