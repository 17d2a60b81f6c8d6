"""`facefed-server`: everything the federation operator runs. Command groups live in their own modules."""

from __future__ import annotations

import typer

from facefed.server.cli import evaluate as cli_eval
from facefed.server.cli import federation as cli_federation
from facefed.server.cli import forget as cli_forget

app = typer.Typer(
    name="facefed-server",
    help="Server side of facefed: run the SuperLink, submit training, keep the ledger, evaluate models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
cli_eval.register(app)
cli_federation.register(app)
cli_forget.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
