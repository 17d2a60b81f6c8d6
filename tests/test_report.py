"""`facefed-server report`: a self-contained HTML page whose plots really render in a browser.

A real ledger (rounds through the real round logic on `LocalGrid`, one refusal, a forget request)
and real evaluations (ROC saved beside the checkpoint); the report is written by the CLI, then
headless Chromium (Debian's `chromium`, started here by PID and stopped by it) loads it from disk:
every plot must decode to its 900 x 400 size. The screenshot is kept in test-artifacts/ (CI artefact).
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from federation_support import ROOT, LocalGrid, make_config, shifted_site
from flwr.app import ConfigRecord, RecordDict
from typer.testing import CliRunner

from facefed.common.protocol.train import REFUSAL, TrainRefusal
from facefed.server.app import Coordinator
from facefed.server.cli.main import app as server_cli
from facefed.server.ledger.db import ForgetRow, Ledger
from facefed.server.ops.submission import Submission

ARTIFACTS = Path(os.environ.get("FACEFED_ARTIFACTS", ROOT / "test-artifacts"))
PLOTS = ("accuracy", "epsilon", "roc", "requests", "participation")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name) or name
    pytest.fail("headless Chromium is needed: apt-get install -y chromium (Debian); .ci/run installs it")


def browse(url: str, *args: str, timeout: float = 120.0) -> str:
    """Run headless Chromium on `url`; stopped by its PID if it outlives `timeout`."""
    cmd = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--virtual-time-budget=10000",
        *args,
        url,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the browser and its helpers only
            proc.wait()
    return out


def refusing(name: str):
    def fn(content):
        rec = TrainRefusal(site=name, kind="budget", reason="privacy budget exceeded: 9.1 > max_epsilon 8")
        return RecordDict({REFUSAL: ConfigRecord(rec.wire())})

    fn.site_name = name
    return fn


def test_report_renders_in_a_browser(state, pretrained_file, lfw_file, tmp_path):
    cfg = make_config(evaluate={"every": 1, "max_pairs": 40}, max_round_attempts=2)
    grid = LocalGrid(
        {
            1: ("", shifted_site("north", 0.01, 2)),
            2: ("", shifted_site("south", -0.01, 3)),
            3: ("", refusing("east")),
        }
    )
    sub = Submission(
        name="sub-test", run_id="t-run", resume=False, config=cfg, lfw=str(lfw_file), pretrained=str(pretrained_file)
    )
    Coordinator(grid, state, sub, log=lambda _m: None).run()
    now = time.time()
    with Ledger(state.ledger) as ledger:
        ledger.report_request(
            ForgetRow(
                request_id="fr-0001",
                site="north",
                pseudonym="ab" * 16,
                received_at=now - 30,
                erased_at=now - 29.7,
                shares_destroyed=6,
                contributions={"t-run": [1, 2]},
                reported_at=now - 20,
            )
        )

    out = tmp_path / "report"
    res = CliRunner().invoke(server_cli, ["report", "--state", str(state.root), "--out", str(out)])
    assert res.exit_code == 0, res.output
    page = out / "report.html"
    assert f"report: {page.resolve()}" in res.output
    text = page.read_text()
    assert "site east refused (budget): privacy budget exceeded" in text and "TAR at FAR 0.0001" in text
    assert 'src="http' not in text  # self-contained: nothing to fetch
    with open(out / "site_rounds.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["site"], r["status"]) for r in rows if r["round"] == "1"} == {
        ("north", "ok"),
        ("south", "ok"),
        ("east", "refused"),
    }
    with open(out / "roc.csv") as f:
        roc = list(csv.DictReader(f))
    assert roc[0] == {"far": "0.0", "tar": "0.0"} and float(roc[-1]["far"]) == 1.0
    assert (out / "requests.csv").read_text().count("fr-0001") == 1
    # The best checkpoint on the validation pairs is marked: one row of rounds.csv, and the page's header.
    with Ledger(state.ledger) as ledger:
        best = ledger.best("t-run").checkpoint_id
    with open(out / "rounds.csv") as f:
        marked = [(r["checkpoint"], r["val_accuracy"] != "") for r in csv.DictReader(f) if r["best"] == "True"]
    assert marked == [(best, True)] and f"<b>{best}</b>" in text

    dom = browse(page.resolve().as_uri(), "--dump-dom")
    check = dom.split('id="render-check">', 1)[1].split("</pre>", 1)[0].split()
    rendered = dict(zip(check[::2], check[1::2], strict=True))
    assert rendered == {p: "900x400" for p in PLOTS}, dom[-2000:]

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    browse(page.resolve().as_uri(), f"--screenshot={shot}", "--window-size=1000,2600", "--hide-scrollbars")
    assert shot.is_file() and shot.stat().st_size > 20_000
    with open(shot, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(head[16:20], "big") == 1000
