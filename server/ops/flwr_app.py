"""The app `facefed-server train` submits: defined in common/flwr_app.py (the sites check it)."""

from facefed.common.flwr_app import PYPROJECT, fab_sha256, write_app_dir

__all__ = ["PYPROJECT", "fab_sha256", "write_app_dir"]
