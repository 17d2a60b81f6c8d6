"""`facefed-client`: everything a site operator runs. Each command group lives in its own module."""

from __future__ import annotations

import typer

from facefed.client.cli import embed as cli_embed
from facefed.client.cli import forget as cli_forget
from facefed.client.cli import node as cli_node
from facefed.client.cli import policy as cli_policy
from facefed.client.cli import receipts as cli_receipts
from facefed.client.cli import store as cli_store
from facefed.client.cli import train as cli_train
from facefed.client.cli import vault as cli_vault

app = typer.Typer(
    name="facefed-client",
    help="Site side of facefed: keep faces as secret shares, train locally with DP, join the federation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(cli_vault.app, name="vault")
app.add_typer(cli_store.app, name="store")
cli_train.register(app)
cli_node.register(app)
cli_forget.register(app)
cli_policy.register(app)
cli_receipts.register(app)
cli_embed.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
