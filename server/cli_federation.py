"""`facefed-server start/certs/sites/train/status/simulate`: run and steer the federation."""

import typer


def register(app: typer.Typer) -> None:
    """Add the federation commands to the main CLI."""
