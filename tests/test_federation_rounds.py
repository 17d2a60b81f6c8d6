"""Round logic, ledger, checkpoints and strategy of the federation, on real tensors, SQLite and files.

Flower's transport is replaced by `LocalGrid` (tests/federation_support.py) so timeouts, bad replies
and crashes are quick and deterministic; the same code runs over real processes in
tests/test_federation.py.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from federation_support import ROOT, TRAIN, LocalGrid, make_config, shifted_site
from flwr.app import Array, ArrayRecord, Error, Message, MessageType, MetricRecord, RecordDict

from facefed.client.forget.contributions import ContributionLog
from facefed.common.config import ConfigError, load_config, validate_config
from facefed.common.fedconfig import FederationConfig
from facefed.common.model.mobilefacenet import build_embedder, sha256_file, shared_state
from facefed.server.app import Coordinator, Evaluator, RunFailed
from facefed.server.ledger.checkpoints import CheckpointCorrupt, CheckpointStore
from facefed.server.ledger.db import Ledger, LedgerError
from facefed.server.ops.submission import Submission, read_submission, write_submission
from facefed.server.state import StatePaths
from facefed.server.strategy import BackboneAverage, ReplyRejected


def coordinator(state, grid, cfg, pretrained_file, *, run_id="t-run", resume=False, evaluator=None) -> Coordinator:
    sub = Submission(
        name="sub-test", run_id=run_id, resume=resume, config=cfg, lfw=None, pretrained=str(pretrained_file)
    )
    return Coordinator(grid, state, sub, evaluator=evaluator, log=lambda _m: None)


def tails(state: StatePaths, cid: str) -> dict[str, torch.Tensor]:
    with Ledger(state.ledger) as ledger:
        model, _ = CheckpointStore(state.checkpoints).load(ledger.checkpoint(cid))
    return shared_state(model)


def test_two_rounds_average_by_people_and_fill_the_ledger(state, pretrained_file, lfw_file):
    grid = LocalGrid({1: ("", shifted_site("alpha", 0.3, people=1)), 2: ("", shifted_site("beta", -0.1, people=3))})
    evaluator = Evaluator(str(lfw_file), "pairsDevTest.txt", max_pairs=20)
    coordinator(
        state,
        grid,
        make_config(evaluate={"every": 1, "max_pairs": 20}),
        pretrained_file,
        evaluator=evaluator,
    ).run()

    with Ledger(state.ledger) as ledger:
        run = ledger.run("t-run")
        assert run.status == "completed"
        rounds = ledger.rounds("t-run")
        assert [(r.round, r.status, r.participants, r.missing) for r in rounds] == [
            (1, "committed", ["alpha", "beta"], []),
            (2, "committed", ["alpha", "beta"], []),
        ]
        # Lineage: r2 -> r1 -> r0 (base), each parent's sha256 recorded on the child.
        chain = ledger.lineage(rounds[1].checkpoint_id)
        assert [c.round for c in chain] == [2, 1, 0]
        assert rounds[1].parent_checkpoint == rounds[0].checkpoint_id
        assert rounds[1].parent_sha256 == ledger.checkpoint(rounds[0].checkpoint_id).sha256
        for c in chain:
            assert sha256_file(c.path) == c.sha256
        ok = {s.site: s for s in rounds[0].sites}
        assert ok["alpha"].weight == 1 and ok["beta"].weight == 3 and ok["beta"].epsilon == pytest.approx(0.5)
        assert ok["beta"].unit == "person" and ok["beta"].delta == pytest.approx(1e-5)
        assert ledger.site_head("t-run-r0002", "beta") == ("t-run", 2, 1)  # the head to continue from
        assert ledger.site_head("t-run-r0001", "beta") == ("t-run", 1, 1)
        assert ledger.site_head("t-run-r0000", "beta") is None  # before any round: a fresh head
        # The base model is evaluated once (round 0), then every committed round; same model, same score.
        assert run.base_metrics["lfw_pairs"] == 20
        assert rounds[1].metrics["lfw_accuracy"] == pytest.approx(run.base_metrics["lfw_accuracy"])
    # Weighted by people: (1 x 0.3 + 3 x -0.1) / 4 = 0 per round, so the tail is back where it started.
    base, r2 = tails(state, "t-run-r0000"), tails(state, "t-run-r0002")
    for k in base:
        assert torch.allclose(r2[k], base[k], atol=1e-5)  # +0.3 x1 and -0.1 x3 cancel exactly


def test_ledger_holds_no_loss_image_counts_or_timings_from_sites(state, pretrained_file):
    """Issue 11: a reply carries DP outputs and public facts; a site that sends more is rejected."""

    def leaky(content):
        out = shifted_site("beta", 0.0, people=1)(content)
        metrics = dict(out["metrics"])
        out["metrics"] = MetricRecord({**metrics, "loss": 0.7, "num-images": 40})  # what sites used to send
        return out

    grid = LocalGrid(
        {
            1: ("", shifted_site("alpha", 0.4, people=1)),
            2: ("", shifted_site("gamma", 0.0, people=1)),
            3: ("", leaky),
        }
    )
    coordinator(state, grid, make_config(rounds=1, min_sites=2), pretrained_file).run()
    with Ledger(state.ledger) as ledger:
        (r,) = ledger.rounds("t-run")
        ok = [s for s in r.sites if s.status == "ok"]
        assert len(ok) == 2 and [s.status for s in r.sites if s.site == "node-3"] == ["rejected"]
        assert all(s.images is None and s.loss is None and s.compute_s is None for s in ok)
        assert all(s.epsilon is not None and s.delta == 1e-5 for s in ok)  # the DP outputs are kept
    db = sqlite3.connect(state.ledger)
    assert db.execute("SELECT COUNT(*) FROM site_rounds WHERE loss IS NOT NULL OR images IS NOT NULL").fetchone() == (
        0,
    )
    db.close()


def test_a_reply_with_loss_or_image_counts_is_rejected(state, pretrained_file):
    def leaky(content):
        out = shifted_site("beta", 0.0, people=1)(content)
        out["metrics"] = MetricRecord({**dict(out["metrics"]), "loss": 0.7})
        return out

    grid = LocalGrid({1: ("", shifted_site("alpha", 0.4, people=1)), 2: ("", leaky)})
    coordinator(state, grid, make_config(rounds=1, min_sites=1), pretrained_file).run()
    with Ledger(state.ledger) as ledger:
        (r,) = ledger.rounds("t-run")
        bad = [s for s in r.sites if s.status == "rejected"]
        assert len(bad) == 1 and "loss" in (bad[0].detail or "") and bad[0].loss is None


def test_silent_site_is_missing_and_round_goes_on(state, pretrained_file):
    grid = LocalGrid(
        {1: ("", shifted_site("alpha", 0.1, 2)), 2: ("", shifted_site("beta", 0.1, 2)), 3: ("", lambda content: None)}
    )  # never answers
    coordinator(state, grid, make_config(rounds=1, round_timeout_s=1.0), pretrained_file).run()
    with Ledger(state.ledger) as ledger:
        (r,) = ledger.rounds("t-run")
        assert r.status == "committed" and r.participants == ["alpha", "beta"] and r.missing == ["node-3"]
        missing = next(s for s in r.sites if s.site == "node-3")
        assert missing.status == "missing" and "round_timeout_s" in missing.detail


def test_head_tensor_in_a_reply_is_rejected_and_recorded(state, pretrained_file):
    head_rows = np.zeros((7, 128), np.float32)  # what a leaked head would look like: (people, 128)
    grid = LocalGrid(
        {
            1: ("", shifted_site("alpha", 0.1, 2)),
            2: ("", shifted_site("beta", 0.1, 2)),
            3: ("", shifted_site("leaky", 0.1, 2, extra={"head.fc.weight": head_rows})),
        }
    )
    coordinator(state, grid, make_config(rounds=1), pretrained_file).run()
    with Ledger(state.ledger) as ledger:
        (r,) = ledger.rounds("t-run")
        leaky = next(s for s in r.sites if s.status == "rejected")
        assert "head.fc.weight" in leaky.detail and "head.fc.weight" in leaky.received_keys
        assert r.participants == ["alpha", "beta"]
        tail_keys = set(shared_state(build_embedder(pretrained_file)).keys())
        for s in r.sites:
            if s.status == "ok":
                assert set(s.received_keys) == tail_keys


def test_too_few_sites_fails_the_round_without_asking_anyone(state, pretrained_file):
    grid = LocalGrid({1: ("", shifted_site("alpha", 0.1, 2))})
    with pytest.raises(RunFailed, match="round 1 failed"):
        coordinator(state, grid, make_config(rounds=1, max_round_attempts=2), pretrained_file).run()
    # Nobody spent privacy budget on a round that could not count (a forget `query` spends none).
    assert [m for m in grid.pushed if m.metadata.message_type != MessageType.QUERY] == []
    with Ledger(state.ledger) as ledger:
        rows = ledger.rounds("t-run")
        assert [(r.round, r.attempt, r.status) for r in rows] == [(1, 1, "failed"), (1, 2, "failed")]
        assert "min_sites=2" in rows[0].detail
        assert ledger.run("t-run").status == "failed"


def test_crash_between_checkpoint_and_ledger_then_resume_counts_each_round_once(state, pretrained_file, monkeypatch):
    cfg = make_config(rounds=3)
    grid = LocalGrid({1: ("", shifted_site("alpha", 0.1, 2)), 2: ("", shifted_site("beta", 0.1, 2))})
    real_commit = Ledger.commit_round

    def crash_on_round_2(self, row, ckpt):
        if row.round == 2:
            raise KeyboardInterrupt  # the server dies after writing the r2 checkpoint, before the ledger row
        return real_commit(self, row, ckpt)

    monkeypatch.setattr(Ledger, "commit_round", crash_on_round_2)
    with pytest.raises(KeyboardInterrupt):
        coordinator(state, grid, cfg, pretrained_file).run()
    orphan = state.checkpoints / "t-run" / "r0002.pt"
    assert orphan.exists()
    with Ledger(state.ledger) as ledger:
        assert ledger.run("t-run").status == "stopped"
        assert ledger.head("t-run")[0] == 1

    monkeypatch.setattr(Ledger, "commit_round", real_commit)
    grid2 = LocalGrid({1: ("", shifted_site("alpha", 0.1, 2)), 2: ("", shifted_site("beta", 0.1, 2))}, run_id=4343)
    coordinator(state, grid2, cfg, pretrained_file, resume=True).run()
    with Ledger(state.ledger) as ledger:
        rows = ledger.rounds("t-run")
        assert [(r.round, r.status) for r in rows] == [(1, "committed"), (2, "committed"), (3, "committed")]
        assert [a["flwr_run_id"] for a in ledger.attempts("t-run")] == ["4242", "4343"]
        assert ledger.checkpoint("t-run-r0002").sha256 == sha256_file(orphan)  # rewritten by the resumed round
        with pytest.raises(LedgerError, match="never counted twice"):
            ledger.commit_round(rows[1], ledger.checkpoint("t-run-r0002"))
    # Three committed rounds of +0.1 each, from the base.
    base, r3 = tails(state, "t-run-r0000"), tails(state, "t-run-r0003")
    for k in base:
        assert torch.allclose(r3[k], base[k] + 0.3, atol=1e-5)


def test_resume_with_another_config_is_refused(state, pretrained_file):
    grid = LocalGrid({1: ("", shifted_site("a", 0.1, 2)), 2: ("", shifted_site("b", 0.1, 2))})
    coordinator(state, grid, make_config(rounds=1), pretrained_file).run()
    with pytest.raises(RunFailed, match="another configuration"):
        coordinator(state, grid, make_config(rounds=2), pretrained_file, resume=True).run()


def test_registered_identity_is_enforced(state, pretrained_file, tmp_path):
    from facefed.common.nodekeys import fingerprint, load_public, make_node_keys

    keys = {n: make_node_keys(tmp_path / n) for n in ("north", "south")}
    pems = {}
    from cryptography.hazmat.primitives import serialization

    with Ledger(state.ledger) as ledger:
        for n, pair in keys.items():
            pub = load_public(pair.public_path)
            ledger.add_site(n, fingerprint(pub), "ssh", None)
            pems[n] = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    # node 2 is registered as south but says it is north (misconfigured --site): rejected.
    grid = LocalGrid(
        {1: ("north", shifted_site("north", 0.1, 2)), 2: ("south", shifted_site("north", 0.1, 2))},
        public_keys={1: pems["north"], 2: pems["south"]},
    )
    with pytest.raises(RunFailed):
        coordinator(state, grid, make_config(rounds=1), pretrained_file).run()
    with Ledger(state.ledger) as ledger:
        (r,) = ledger.rounds("t-run")
        south = next(s for s in r.sites if s.site == "south")
        assert south.status == "rejected" and "start it with --site south" in south.detail
        assert r.status == "failed"


# -- strategy ---------------------------------------------------------------------------------
def test_strategy_checks_replies():
    from flwr.app import ConfigRecord, MetricRecord
    from flwr.supercore.task_identity import TaskIdentity

    from facefed.common.protocol.tail import NAMES, SHAPES, TAIL, pack

    TaskIdentity.run_id, TaskIdentity.node_id = 1, 0
    sent = {"w": np.array([1.0, 2.0], np.float32), "b": np.array([0.5], np.float32)}
    strat = BackboneAverage(weighting="people", expected=sent)
    msg = Message(RecordDict({}), dst_node_id=9, message_type="train")
    msg.metadata.__dict__["_message_id"] = msg.object_id

    def reply(tensors, people=2, flat=None):
        f, names, shapes = pack({k: np.asarray(v, np.float32) for k, v in tensors.items()})
        return Message(
            RecordDict(
                {
                    "backbone": ArrayRecord({TAIL: Array(f if flat is None else flat)}),
                    "metrics": MetricRecord({"num-people": people}),
                    "site": ConfigRecord({"name": "x", NAMES: names, SHAPES: shapes}),
                }
            ),
            reply_to=msg,
        )

    assert strat.check_reply(reply({"w": [0, 0], "b": [1]})).weight == 2
    for bad, why in [
        ({"w": [0, 0]}, "missing"),
        ({"w": [0, 0], "b": [1], "head": [[1, 2]]}, "extra .'head'"),
        ({"w": [0, 0, 0], "b": [1]}, "shape"),
        ({"w": [np.nan, 0], "b": [1]}, "NaN"),
        ({"b": [1], "w": [0, 0]}, "order"),
    ]:
        with pytest.raises(ReplyRejected, match=why):
            strat.check_reply(reply(bad))
    # A layout that tells the truth about names but carries more values (a smuggled block) is refused too.
    with pytest.raises(ReplyRejected, match="needs 3"):
        strat.check_reply(reply({"w": [0, 0], "b": [1]}, flat=np.zeros(3 + 128, np.float32)))
    with pytest.raises(ReplyRejected, match="trained on no one"):
        strat.check_reply(reply({"w": [0, 0], "b": [1]}, people=0))
    with pytest.raises(ReplyRejected, match="ClientApp failed: boom"):
        strat.check_reply(Message(Error(code=2, reason="boom"), reply_to=msg))
    agg = strat.aggregate(
        [
            strat.check_reply(reply({"w": [0, 4], "b": [1]}, people=1)),
            strat.check_reply(reply({"w": [4, 0], "b": [3]}, people=3)),
        ]
    )
    assert agg["w"].tolist() == [3.0, 1.0] and agg["b"].tolist() == [2.5]


# -- ledger, checkpoints, submission, config, contribution log ------------------------------------
def test_ledger_sites_and_concurrent_reader(tmp_path):
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as ledger:
        ledger.add_site("north", "SHA256:aa", "ssh-key", "11")
        with pytest.raises(LedgerError, match="already registered"):
            ledger.add_site("north", "SHA256:bb", "ssh-key", "12")
        with pytest.raises(LedgerError, match="already registered for site 'north'"):
            ledger.add_site("south", "SHA256:aa", "ssh-key", "13")
        ledger.revoke_site("north")
        assert not ledger.site("north").active
        assert ledger.site_by_fingerprint("SHA256:aa") is None
        ledger.add_site("north", "SHA256:cc", "ssh-key2", "14")  # re-register with a new key after revocation
        # A second connection (what `status` is while the ServerApp writes) sees committed rows.
        other = sqlite3.connect(path)
        assert other.execute("SELECT fingerprint FROM sites WHERE name='north'").fetchone()[0] == "SHA256:cc"
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_checkpoint_tampering_is_refused(tmp_path, pretrained_file):
    store = CheckpointStore(tmp_path / "ck")
    row = store.save(build_embedder(pretrained_file), run_id="r1", rnd=0, parent=None)
    model, meta = store.load(row)
    assert meta["checkpoint_id"] == "r1-r0000"
    data = bytearray(Path(row.path).read_bytes())
    data[-100] ^= 0xFF
    Path(row.path).write_bytes(bytes(data))
    with pytest.raises(CheckpointCorrupt, match="refusing to use a changed file"):
        store.load(row)
    with pytest.raises(ValueError, match="invalid run id"):
        store.path_for("../etc", 1)


def test_submission_round_trip_and_bad_names(state, pretrained_file):
    cfg = make_config()
    name = write_submission(state, cfg, run_id="x-1", resume=False, lfw=None, pretrained=str(pretrained_file))
    sub = read_submission(state, name)
    assert sub.config.sha256() == cfg.sha256() and sub.run_id == "x-1"
    for bad in ("../ledger.sqlite", "sub-x.json", "/etc/passwd"):
        with pytest.raises(ValueError, match="submission"):
            read_submission(state, bad)


def test_federation_configs_validate(tmp_path):
    for path in sorted((ROOT / "configs").glob("federation*.toml")):
        cfg = load_config(path, FederationConfig)
        assert cfg.rounds >= 1 and cfg.train.privacy_unit == "person"
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = 2\nmin_site = 2\n[train]\nnoise_multiplier = 1.0\n")
    with pytest.raises(ConfigError, match="key `min_site`: unknown key"):
        load_config(bad, FederationConfig)
    bad.write_text("rounds = 0\n[train]\nnoise_multiplier = 1.0\n")
    with pytest.raises(ConfigError, match="key `rounds`"):
        load_config(bad, FederationConfig)
    with pytest.raises(ConfigError, match="fewer than min_sites"):
        validate_config({"min_sites": 3, "sites": ["a", "b"], "train": TRAIN}, FederationConfig)
    with pytest.raises(ConfigError, match="target_epsilon calibrates one call"):
        validate_config({"rounds": 3, "train": {"target_epsilon": 2.0}}, FederationConfig)
    assert make_config(local_epochs=1.0).local_steps() == 2  # 1 / sample_rate 0.5
    assert json.loads(make_config().frozen_json())["train"]["steps"] == 2


def test_contribution_log(tmp_path):
    with ContributionLog(tmp_path / "c.sqlite") as log:
        log.record(
            run_id="r",
            rnd=1,
            attempt=1,
            parent_checkpoint="r-r0000",
            images={"ann": 3, "bob": 2},
            sampled={"ann"},
            head_file="heads/r/r0001-a1.pt",
        )
        log.record(
            run_id="r",
            rnd=1,
            attempt=1,
            parent_checkpoint="r-r0000",
            images={"ann": 3, "bob": 2},
            sampled={"ann"},
            head_file="heads/r/r0001-a1.pt",
        )  # a retried ClientApp: same rows
        log.record(
            run_id="r", rnd=2, attempt=1, parent_checkpoint="r-r0001", images={"bob": 2}, sampled=set(), head_file=None
        )
        assert [(c.round, c.sampled) for c in log.of_person("ann")] == [(1, True)]
        assert log.first_round("bob", "r") == 1 and log.people_in("r", 2) == ["bob"]
        with pytest.raises(ValueError, match="not in the training set"):
            log.record(
                run_id="r", rnd=3, attempt=1, parent_checkpoint="x", images={"ann": 1}, sampled={"eve"}, head_file=None
            )
        assert log.forget("bob") == 2 and log.first_round("bob", "r") is None


def test_run_lock_waits_for_a_previous_serverapp_then_gives_up(state):
    """After a SuperLink crash the old ServerApp can hold its run for seconds: the next one waits for it
    (bounded) instead of failing, and fails with a reason if it never lets go."""
    import threading
    import time

    from facefed.server.runs import run_lock

    released = threading.Event()
    said: list[str] = []

    def previous():
        with run_lock(state, "r"):
            released.wait(5)

    holder = threading.Thread(target=previous)
    holder.start()
    time.sleep(0.3)
    threading.Timer(1.0, released.set).start()
    t = time.monotonic()
    with run_lock(state, "r", wait_s=10, log=said.append):
        waited = time.monotonic() - t
    holder.join()
    assert 0.5 < waited < 5 and "held by another ServerApp" in said[0]

    released.clear()
    holder = threading.Thread(target=previous)
    holder.start()
    time.sleep(0.3)
    try:
        with (
            pytest.raises(RunFailed, match=r"being trained by another ServerApp \(waited 1 s\)"),
            run_lock(state, "r", wait_s=1.0, log=said.append),
        ):
            pass
    finally:
        released.set()
        holder.join()
