"""`facefed-client train`: local (non-federated) training from a vault, for baselines."""

import typer


def register(app: typer.Typer) -> None:
    """Add the `train` command to the main CLI."""
