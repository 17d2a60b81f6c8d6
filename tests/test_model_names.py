"""Names, not paths, and one number per model: `evaluate --model current|latest|RUN|CHECKPOINT` reads the
same accuracy as the ledger's per-round evaluation (same protocol, flip included); `export` writes the
current model (the best on the validation pairs; tests/test_best_model.py); a deleted checkpoint is
refused with the current model's id; `unlearn`/`evaluate` need
no environment variables once `train` recorded the data. Real ledger, checkpoints, LFW and CLI."""

from __future__ import annotations

import json

import pytest
from federation_support import LocalGrid, make_config, shifted_site
from typer.testing import CliRunner

from facefed.common.model.mobilefacenet import sha256_file
from facefed.server.app import Coordinator
from facefed.server.cli.main import app as server_cli
from facefed.server.evaluation import roc_path
from facefed.server.ledger.db import Ledger
from facefed.server.ops.submission import Submission


@pytest.fixture
def trained(state, pretrained_file, lfw_file):
    cfg = make_config(evaluate={"every": 1, "max_pairs": 40}, max_round_attempts=2)
    grid = LocalGrid({1: ("", shifted_site("alpha", 0.01, 2)), 2: ("", shifted_site("beta", -0.02, 3))})
    sub = Submission(
        name="sub-test", run_id="t-run", resume=False, config=cfg, lfw=str(lfw_file), pretrained=str(pretrained_file)
    )
    Coordinator(grid, state, sub, log=lambda _m: None).run()
    state.record_data("t-run", lfw=str(lfw_file), pretrained=str(pretrained_file))
    return state


def cli(*args: str) -> tuple[int, str]:
    out = CliRunner().invoke(server_cli, list(args))
    return out.exit_code, out.output


def test_one_number_per_model_by_name(trained, monkeypatch):
    monkeypatch.delenv("FACEFED_LFW", raising=False)  # the state recorded it
    monkeypatch.delenv("FACEFED_PRETRAINED", raising=False)
    with Ledger(trained.ledger) as ledger:
        last = ledger.rounds("t-run")[-1]
        assert roc_path(ledger.checkpoint(last.checkpoint_id).path).is_file()  # for `report`
        best = ledger.best("t-run")
        best_metrics = (
            r.metrics if (r := ledger.round_of_checkpoint(best.checkpoint_id)) else ledger.run("t-run").base_metrics
        )
    assert last.checkpoint_id == "t-run-r0002"
    numbers = []
    for name in ("latest", "t-run", "t-run-r0002"):
        code, out = cli("evaluate", "--state", str(trained.root), "--model", name, "--max-pairs", "40", "--json")
        assert code == 0, out
        doc = json.loads(out[out.index("{") :])
        assert doc["model"] == "t-run-r0002" and doc["flip"] is True
        numbers.append(doc["accuracy_mean"])
    assert numbers == [pytest.approx(last.metrics["lfw_accuracy"])] * 3  # ledger and evaluate agree
    code, out = cli("evaluate", "--state", str(trained.root), "--model", "current", "--max-pairs", "40", "--json")
    doc = json.loads(out[out.index("{") :])
    assert doc["model"] == best.checkpoint_id and doc["accuracy_mean"] == pytest.approx(best_metrics["lfw_accuracy"])

    code, out = cli("evaluate", "--state", str(trained.root), "--model", "nope")
    assert code == 2 and "neither `current`, `latest`, a run id, a checkpoint id nor a file" in out


def test_export_current_and_deleted_checkpoints(trained, tmp_path):
    dest = tmp_path / "model.pt"
    code, out = cli("export", "--state", str(trained.root), "--model", "current", "--out", str(dest))
    assert code == 0, out
    with Ledger(trained.ledger) as ledger:
        row = ledger.best("t-run")
        assert sha256_file(dest) == row.sha256 and f"exported {row.checkpoint_id} to {dest}" in out
        ledger.mark_checkpoint_deleted("t-run-r0001", "tainted by request fr-1")
        now = ledger.best("t-run").checkpoint_id
    assert now != "t-run-r0001"
    code, out = cli("evaluate", "--state", str(trained.root), "--model", "t-run-r0001")
    assert code == 2 and "was deleted (tainted by request fr-1)" in out and f"the current model is {now}" in out


def test_unlearn_errors_name_only_options_that_exist(trained, monkeypatch, tmp_path):
    from facefed.server.state import StatePaths

    monkeypatch.delenv("FACEFED_LFW", raising=False)
    monkeypatch.delenv("FACEFED_PRETRAINED", raising=False)
    bare = StatePaths.at(tmp_path / "bare", create=True)
    Ledger(bare.ledger).close()  # a started server that has recorded no run: nothing to take paths from
    code, out = cli("unlearn", "--state", str(bare.root))
    assert code == 2 and "--pretrained PATH" in out and "in the config" not in out
    code, out = cli("unlearn", "--state", str(bare.root), "--help")
    assert "--lfw" in out and "--pretrained" in out
