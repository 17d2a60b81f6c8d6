"""`facefed-server simulate`: the same ServerApp and ClientApp on Flower's simulation engine (Ray)."""

from __future__ import annotations

import importlib.util

import pytest
from typer.testing import CliRunner

from facefed.server.cli.main import app as server_app
from facefed.server.ledger.db import Ledger

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="simulation needs ray (the `simulation` extra)"),
]

CONFIG = """
name = "sim"
rounds = 1
min_sites = 3
round_timeout_s = 600
[evaluate]
max_pairs = 40
[train]
delta = 1e-3
max_epsilon = 50.0
noise_multiplier = 1.0
sample_rate = 0.5
probe_steps = 1
steps = 2
"""


def test_simulated_sites_train_one_round(tmp_path, lfw_file, pretrained_file):
    cfg = tmp_path / "sim.toml"
    cfg.write_text(CONFIG)
    state = tmp_path / "sim-state"
    res = CliRunner().invoke(
        server_app,
        [
            "simulate",
            "--sites",
            "3",
            "--config",
            str(cfg),
            "--state",
            str(state),
            "--people-per-site",
            "3",
            "--max-images",
            "3",
            "--cpus",
            "2",
        ],
    )
    assert res.exit_code == 0, res.output
    with Ledger(state / "ledger.sqlite") as ledger:
        (run,) = ledger.runs()
        assert run.status == "completed"
        (r,) = ledger.rounds(run.run_id)
        assert r.status == "committed" and r.participants == ["sim-000", "sim-001", "sim-002"]
        assert all(s.people == 3 and s.epsilon > 0 for s in r.sites)
        assert 0.0 <= r.metrics["lfw_accuracy"] <= 1.0
    # Each virtual site keeps its own head and contribution log, like a real one.
    for i in range(3):
        assert (state / "sites" / f"sim-{i:03d}" / "contributions.sqlite").is_file()
