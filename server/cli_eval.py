"""`facefed-server evaluate`: the LFW verification protocol on a model checkpoint."""

import typer


def register(app: typer.Typer) -> None:
    """Add the `evaluate` command to the main CLI."""
