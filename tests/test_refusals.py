"""A site that does not train says why, and the server's operator reads it as one line.

The ClientApp answers with a `TrainRefusal` (kind + one-line reason) instead of failing the message;
the server records it per site in the ledger, prints `site NAME refused (KIND): REASON` in `train` and
`status`, and fails the run at once when the sites left cannot reach `min_sites`. The server refuses
what it can know before anyone trains (delta against 1/min_people and against each site's accountant).
Real ClientApp handler, real round logic, ledger and CLI; Flower's transport is `LocalGrid`.
"""

from __future__ import annotations

import json
import time

import pytest
from federation_support import TRAIN, LocalGrid, shifted_site
from federation_support import make_config as small_config
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from typer.testing import CliRunner

from facefed.client.site import app as client_app
from facefed.client.site.refusal import kind_of, reason_of
from facefed.common.accountant import AccountantMismatch, BudgetExceeded
from facefed.common.config import ConfigError
from facefed.common.fedconfig import FederationConfig
from facefed.common.paths import DataNotFound
from facefed.common.protocol.tail import NAMES, SHAPES, TAIL
from facefed.common.protocol.train import REFUSAL, SiteRefused, TrainRefusal
from facefed.server.app import Coordinator, RunFailed
from facefed.server.cli.main import app as server_cli
from facefed.server.ledger.db import Ledger
from facefed.server.ops.submission import Submission


def make_config(**over) -> FederationConfig:
    """Three attempts allowed: a refusal must still fail the run at once, not after retries."""
    return small_config(**{"max_round_attempts": 3, **over})


def refusing_site(name: str, kind: str, reason: str):
    def fn(content: RecordDict) -> RecordDict:
        return RecordDict({REFUSAL: ConfigRecord(TrainRefusal(site=name, kind=kind, reason=reason).wire())})

    fn.site_name = name
    return fn


def run(state, grid, cfg, pretrained_file, logs: list[str]):
    sub = Submission(
        name="sub-test", run_id="t-run", resume=False, config=cfg, lfw=None, pretrained=str(pretrained_file)
    )
    Coordinator(grid, state, sub, log=logs.append).run()


def test_refusals_reach_the_ledger_the_log_and_fail_the_run_fast(state, pretrained_file):
    reason = "the site's accountant uses delta 1e-05, the config says 0.001; delta is fixed per site"
    grid = LocalGrid(
        {1: ("", refusing_site("north", "config", reason)), 2: ("", refusing_site("south", "budget", "over budget"))}
    )
    logs: list[str] = []
    with pytest.raises(RunFailed) as e:
        run(state, grid, make_config(), pretrained_file, logs)
    assert f"site north refused (config): {reason}" in str(e.value)
    assert "site south refused (budget): over budget" in str(e.value)
    assert any(f"site north refused (config): {reason}" in m for m in logs)
    with Ledger(state.ledger) as ledger:
        rows = ledger.rounds("t-run")
        assert [(r.round, r.attempt, r.status) for r in rows] == [(1, 1, "failed")]  # no retries: it cannot succeed
        by = {s.site: s for s in rows[0].sites}
        assert by["north"].status == "error" and by["north"].detail == f"refused (config): {reason}"
        run_row = ledger.run("t-run")
        assert run_row.status == "failed" and "site north refused (config)" in run_row.detail

    # `status` (tables and --json) shows the same line.
    out = CliRunner().invoke(server_cli, ["status", "--state", str(state.root)])
    assert out.exit_code == 0, out.output
    assert f"round 1 attempt 1: site north refused (config): {reason}" in out.output
    doc = json.loads(CliRunner().invoke(server_cli, ["status", "--state", str(state.root), "--json"]).output)
    refusals = [x["refusal"] for r in doc["rounds"] for x in r["sites"] if x["refusal"]]
    assert f"site north refused (config): {reason}" in refusals
    assert doc["runs"][0]["status"] == "failed"


def test_one_refusal_with_enough_others_goes_on(state, pretrained_file):
    grid = LocalGrid(
        {
            1: ("", shifted_site("alpha", 0.1, 2)),
            2: ("", shifted_site("beta", 0.1, 2)),
            3: ("", refusing_site("gamma", "policy", "noise_multiplier 1 is below this site's minimum 2")),
        }
    )
    logs: list[str] = []
    run(state, grid, make_config(rounds=1), pretrained_file, logs)
    with Ledger(state.ledger) as ledger:
        (r,) = ledger.rounds("t-run")
        assert r.status == "committed" and r.participants == ["alpha", "beta"] and r.missing == ["gamma"]
    import io
    from contextlib import redirect_stdout

    from facefed.server.ops.progress import print_round

    buf = io.StringIO()
    with Ledger(state.ledger) as ledger, redirect_stdout(buf):
        (r,) = ledger.rounds("t-run")
        print_round(r, 1, ledger)
    assert "site gamma refused (policy): noise_multiplier 1 is below this site's minimum 2" in buf.getvalue()


def test_the_client_app_answers_a_refusal_instead_of_failing(tmp_path):
    """The real ClientApp handler: a node whose pretrained weights are missing answers `data`, one line."""
    order = ConfigRecord(
        {
            "run-id": "t-run",
            "round": 1,
            "attempt": 1,
            "parent-checkpoint": "t-run-r0000",
            "parent-sha256": "cd" * 32,
            "base-sha256": "ef" * 32,
            "prefix-fingerprint": "01" * 32,
            "train-config": '{"steps":1}',
            "steps": 1,
            "seed": 7,
            "weighting": "people",
            "expected-site": "north",
            "head-round": 0,
            "head-attempt": 0,
            NAMES: ["a"],
            SHAPES: ["1"],
        }
    )
    import numpy as np
    from flwr.app import Array, ArrayRecord

    msg = Message(
        RecordDict({"config": order, "backbone": ArrayRecord({TAIL: Array(np.zeros(1, np.float32))})}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    missing = tmp_path / "nope.pth"
    ctx = Context(
        run_id=1,
        node_id=1,
        node_config={
            "site": "north",
            "vault": str(tmp_path / "v"),
            "state": str(tmp_path / "s"),
            "pretrained": str(missing),
        },
        state=RecordDict(),
        run_config={},
    )
    reply = client_app.train(msg, ctx)
    rec = TrainRefusal.model_validate(dict(reply.content.config_records[REFUSAL]))
    assert rec.site == "north" and rec.kind == "data" and str(missing) in rec.reason
    assert "\n" not in rec.reason and "Traceback" not in rec.reason
    # A malformed order is the server's config problem, not a crash.
    bad = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type=MessageType.TRAIN)
    rec = TrainRefusal.model_validate(dict(client_app.train(bad, ctx).content.config_records[REFUSAL]))
    assert rec.kind == "config" and "the server's order is malformed" in rec.reason


def test_kinds_and_one_line_reasons():
    assert kind_of(SiteRefused("policy", "no")) == "policy"
    assert kind_of(BudgetExceeded(9.0, 7.0, 8.0, 1e-5, "person")) == "budget"
    assert kind_of(AccountantMismatch("delta is fixed per site")) == "config"
    assert kind_of(DataNotFound("no LFW")) == "data"
    assert kind_of(ValueError("delta 0.5 must be below 1/40")) == "config"
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError as e:
        assert kind_of(e) == "crash"
        why = reason_of(e)
        assert why.startswith("ZeroDivisionError: division by zero (at test_refusals.py:") and "\n" not in why
    assert reason_of(RuntimeError("a\nb\n  c")).startswith("RuntimeError: a b c")


def test_the_server_refuses_what_it_can_know_before_submitting(state, pretrained_file, tmp_path):
    with pytest.raises(ConfigError, match=r"delta 0.5 must be below 1/min_people"):
        make_config(train={**TRAIN, "delta": 0.5})
    # A site's accountant fixes delta: the ledger knows it from the site's last round.
    grid = LocalGrid({1: ("", shifted_site("alpha", 0.1, 2)), 2: ("", shifted_site("beta", 0.1, 2))})
    run(state, grid, make_config(rounds=1), pretrained_file, [])
    cfg = tmp_path / "fed.toml"
    cfg.write_text(
        "rounds = 1\n[evaluate]\nevery = 0\n[train]\nprivacy_unit = 'person'\ndelta = 1e-6\nnoise_multiplier = 1.0\n"
        f"pretrained = '{pretrained_file}'\n"
    )
    t0 = time.monotonic()
    out = CliRunner().invoke(server_cli, ["train", "--state", str(state.root), "--config", str(cfg)])
    assert out.exit_code == 2, out.output
    assert "site alpha's accountant uses delta 1e-05; train.delta = 1e-06 would be refused" in out.output
    assert "delta is fixed per site" in out.output and time.monotonic() - t0 < 30
