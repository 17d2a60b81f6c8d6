"""`facefed-client start` / `keygen`: run this site's Flower SuperNode and make its node keys."""

import typer


def register(app: typer.Typer) -> None:
    """Add the `start` and `keygen` commands to the main CLI."""
