"""What the operator sees: plain log files without routine polling, a phase line during every wait,
full-width tables when piped, and `--json` on every listing."""

from __future__ import annotations

import io
import json
import sys
from contextlib import redirect_stdout

from federation_support import TRAIN, LocalGrid, shifted_site
from typer.testing import CliRunner

from facefed.common.childproc import run_foreground
from facefed.common.config import validate_config
from facefed.common.fedconfig import FederationConfig
from facefed.server.app import Coordinator
from facefed.server.cli.main import app as server_cli
from facefed.server.ledger.db import Ledger
from facefed.server.ops.progress import PhaseTicker
from facefed.server.ops.submission import Submission
from facefed.server.ops.superlink import POLLING
from facefed.server.sites import Sites


def test_log_files_are_plain_and_quiet(tmp_path):
    script = (
        "print('\\x1b[32mINFO\\x1b[0m :      Starting SuperLink'); "
        "print('\\x1b[32mINFO\\x1b[0m :      ControlServicer.ListRuns'); print('done')"
    )
    echo = io.StringIO()
    log = tmp_path / "superlink.log"
    code, _ = run_foreground([sys.executable, "-c", script], {}, echo=echo, log_path=log, quiet=POLLING)
    assert code == 0
    text = log.read_text()
    assert "\x1b" not in text and "INFO :      Starting SuperLink" in text and "done" in text
    assert "ListRuns" not in text and "ListRuns" not in echo.getvalue()


def test_phases_cover_the_waits_and_listings_are_machine_readable(state, pretrained_file):
    cfg = validate_config(
        {"rounds": 1, "min_sites": 2, "wait_for_sites_s": 1.5, "evaluate": {"every": 0}, "train": TRAIN},
        FederationConfig,
    )
    # Waiting for sites: a phase line says how many are online.
    phases: list[str] = []
    with Ledger(state.ledger) as ledger:
        Sites(LocalGrid({1: ("", shifted_site("a", 0.0, 2))}), ledger, phase=phases.append).wait(cfg)
    assert phases and phases[0].startswith("waiting for sites: 1 online, min_sites=2")

    ticker = PhaseTicker(state, 0.0)
    grid = LocalGrid({1: ("", shifted_site("alpha", 0.1, 2)), 2: ("", shifted_site("beta", 0.1, 2))})
    long_id = "a-run-id-long-enough-to-be-cut-at-eighty-columns-in-a-table-0123456789"
    sub = Submission(name="sub-t", run_id=long_id, resume=False, config=cfg, lfw=None, pretrained=str(pretrained_file))
    Coordinator(grid, state, sub, log=lambda _m: None).run()
    buf = io.StringIO()
    with redirect_stdout(buf):
        ticker.tick()
    assert f"round 1/1 attempt 1 of run {long_id}: averaging 2 replies" in buf.getvalue()

    runner = CliRunner()
    out = runner.invoke(server_cli, ["status", "--state", str(state.root)])
    assert out.exit_code == 0 and long_id in out.output  # piped: full width, not cut to 80 columns
    for args in (["status"], ["sites", "ls"], ["runs", "ls"], ["requests"]):
        res = runner.invoke(server_cli, [*args, "--state", str(state.root), "--json"])
        assert res.exit_code == 0, (args, res.output)
        json.loads(res.output)
    runs = json.loads(runner.invoke(server_cli, ["runs", "ls", "--state", str(state.root), "--json"]).output)
    assert runs[0]["run"] == long_id and runs[0]["status"] == "completed" and runs[0]["model"] == f"{long_id}-r0001"
    sites = json.loads(runner.invoke(server_cli, ["sites", "ls", "--state", str(state.root), "--json"]).output)
    assert {s["site"] for s in sites} == {"alpha", "beta"} and all(s["delta"] == 1e-5 for s in sites)
    stop = runner.invoke(server_cli, ["runs", "stop", long_id, "--state", str(state.root)])
    assert stop.exit_code == 2 and "is completed, not running" in stop.output
