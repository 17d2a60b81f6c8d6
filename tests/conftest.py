"""Shared fixtures: the real LFW archive and pretrained weights, found through the environment."""

from __future__ import annotations

import os

import pytest
import torch

from facefed.common.lfw import LFW
from facefed.common.paths import DataNotFound, lfw_path, pretrained_path

# Two cores on CI: keep each test process from oversubscribing them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")


def pytest_configure(config):
    # Landmarks of public LFW images (landmarks only, no image bytes) persist between test runs, so face
    # detection of the same LFW images runs once; subprocesses inherit the setting.
    cache = getattr(config, "cache", None)
    if "FACEFED_CACHE" not in os.environ and cache is not None:
        os.environ["FACEFED_CACHE"] = str(cache.mkdir("facefed"))


@pytest.fixture(scope="session")
def lfw_file():
    """Path of the LFW archive; tests fail (not skip) without it, saying where to put it."""
    try:
        return lfw_path()
    except DataNotFound as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def lfw(lfw_file) -> LFW:
    return LFW(lfw_file)


@pytest.fixture(scope="session")
def pretrained_file():
    try:
        return pretrained_path()
    except DataNotFound as e:
        pytest.fail(str(e))


@pytest.fixture
def state(tmp_path):
    """A fresh server state directory (ledger, checkpoints) for the federation and unlearning tests."""
    from facefed.server.state import StatePaths

    return StatePaths.at(tmp_path / "state", create=True)
