"""Training that does not make the model worse: each evaluated round (and the base model) is scored on
the validation pairs (LFW pairsDevTrain, people disjoint from the test pairs), the ledger marks each
run's best live checkpoint by that score, `current` serves it, and `train` and `status` say when a
round made the model worse. Real Coordinator, ledger, checkpoints, LFW and CLI; `LocalGrid` stands in
for Flower's transport, and the sites return a tail damaged (or repaired) on purpose.

The damage: only the first k of the embedding's 128 output rows are kept (the others zeroed). On the
40 validation pairs these tests use, the pretrained model scores 97.5 %, k = 8 about 82 % and k = 2
about 70 % (a random perturbation of the last layer would not do: it is a random projection, which
keeps cosines).
"""

from __future__ import annotations

import json

import pytest
import torch
from federation_support import LocalGrid, make_config, shifted_site
from test_unlearn import QuerySite, request
from typer.testing import CliRunner

from facefed.common.model.mobilefacenet import PRETRAINED_PREFIX, build_embedder, sha256_file, shared_state
from facefed.server.app import Coordinator
from facefed.server.cli.main import app as server_cli
from facefed.server.ledger.db import Ledger
from facefed.server.ledger.models import resolve
from facefed.server.ops.progress import follow
from facefed.server.ops.submission import Submission

EVALUATED = {"evaluate": {"every": 1, "max_pairs": 40}}


def keep_rows(k: int, when=lambda run, rnd: True):
    """A site's change: keep the first k output rows of the tail (zero the rest) in the rounds `when` says."""

    def change(tensors, cfg):
        if not when(str(cfg["run-id"]), int(cfg["round"])):
            return tensors
        out = {}
        for name, v in tensors.items():
            v = v.copy()
            v[k:] = 0
            out[name] = v
        return out

    return change


def run(state, grid, cfg, pretrained, lfw_file, *, mode="train", run_id="t-run") -> list[str]:
    """Run the Coordinator to the end; its log lines (what the ServerApp prints)."""
    logs: list[str] = []
    sub = Submission(
        name=f"sub-{mode}",
        run_id=run_id if mode == "train" else "",
        resume=False,
        config=cfg if mode == "train" else None,
        lfw=str(lfw_file),
        pretrained=str(pretrained),
        mode=mode,
        wait_s=0.0,
    )
    Coordinator(grid, state, sub, log=logs.append).run()
    return logs


def cli(*args: str) -> tuple[int, str]:
    out = CliRunner().invoke(server_cli, list(args))
    return out.exit_code, out.output


def score(metrics) -> tuple[float, float]:
    return metrics["val_auc"], metrics["val_accuracy"]


def shown(metrics) -> str:
    return f"AUC {metrics['val_auc']:.4f}, {100 * metrics['val_accuracy']:.2f} %"


def test_a_round_that_makes_the_model_worse_is_not_served(state, pretrained_file, lfw_file, capsys, tmp_path):
    # Round 1 leaves the model as it is (the same score as the base: the newer one is the best), round 2
    # damages it, round 3 leaves the damage.
    damage = keep_rows(4, when=lambda _run, rnd: rnd == 2)
    grid = LocalGrid(
        {1: ("", shifted_site("alpha", 0.0, 1, change=damage)), 2: ("", shifted_site("beta", 0.0, 1, change=damage))}
    )
    logs = run(state, grid, make_config(rounds=3, **EVALUATED), pretrained_file, lfw_file)

    with Ledger(state.ledger) as ledger:
        base = ledger.run("t-run").base_metrics
        r1, r2, r3 = ledger.rounds("t-run")
        # Scored on the validation pairs, apart from the test pairs (which are reported, never chosen by).
        assert base["val_pairs"] == r1.metrics["val_pairs"] == 40 and r1.metrics["lfw_pairs"] == 40
        assert score(r1.metrics) == score(base)  # the same model, the same score: the newer is the best
        assert score(r2.metrics) < score(r1.metrics) and score(r3.metrics) == score(r2.metrics)
        assert ledger.run("t-run").best_checkpoint == "t-run-r0001" == ledger.best("t-run").checkpoint_id
        assert [resolve(ledger, n).ids for n in ("current", "best", "latest")] == [
            ["t-run-r0001"],
            ["t-run-r0001"],
            ["t-run-r0003"],
        ]
        best_sha = ledger.checkpoint("t-run-r0001").sha256
    was, now = (shown(m) for m in (r1.metrics, r2.metrics))
    for rnd in (2, 3):
        line = f"round {rnd} made the model worse on validation ({was} -> {now}); the served model stays t-run-r0001"
        assert f"[facefed] {line}" in logs  # the ServerApp's log
    assert not any("round 1 made" in m for m in logs)

    # `facefed-server train` follows the ledger: the same lines, under the rounds they concern.
    assert follow(state, "t-run", "4242") == 0
    out = capsys.readouterr().out.splitlines()
    warned = [i for i, m in enumerate(out) if "made the model worse" in m]
    assert [out[i] for i in warned] == [
        f"round {rnd} made the model worse on validation ({was} -> {now}); the served model stays t-run-r0001"
        for rnd in (2, 3)
    ]
    assert [out[i - 1].split(":")[0] for i in warned] == ["round 2/3", "round 3/3"]
    assert out[-1] == "run t-run completed; its best model: t-run-r0001"

    # `status` marks the best checkpoint (table and --json); `export --model current` writes it.
    code, text = cli("status", "--state", str(state.root))
    assert code == 0 and "t-run-r0001 (best)" in text and "(worse)" in text
    assert "best model of t-run on the validation pairs: t-run-r0001" in text
    code, text = cli("status", "--state", str(state.root), "--json")
    doc = json.loads(text)
    assert doc["best"] == "t-run-r0001" and doc["runs"][0]["best"] == "t-run-r0001"
    assert [(r["round"], r["best"], r["worse_than"]) for r in doc["rounds"]] == [
        (1, True, None),
        (2, False, "t-run-r0001"),
        (3, False, "t-run-r0001"),
    ]
    assert doc["rounds"][1]["val_accuracy"] == r2.metrics["val_accuracy"]
    dest = tmp_path / "model.pt"
    code, text = cli("export", "--state", str(state.root), "--model", "current", "--out", str(dest))
    assert code == 0 and f"exported t-run-r0001 to {dest}" in text and sha256_file(dest) == best_sha
    code, text = cli("export", "--state", str(state.root), "--model", "latest", "--out", str(dest), "--force")
    assert code == 0 and "exported t-run-r0003" in text

    # A deleted checkpoint is never served: the best among the live ones takes its place (the base).
    with Ledger(state.ledger) as ledger:
        ledger.mark_checkpoint_deleted("t-run-r0001", "tainted by request fr-1")
        assert ledger.run("t-run").best_checkpoint == "t-run-r0000"
        assert resolve(ledger, "current").ids == ["t-run-r0000"]


@pytest.fixture
def damaged_pretrained(pretrained_file, tmp_path):
    """The pretrained weights with all but the first 2 embedding rows zeroed (in the CASIA format)."""
    raw = torch.load(pretrained_file, map_location="cpu", weights_only=True)
    for key in ("features.weight", "last_bn.weight", "last_bn.bias"):
        raw[PRETRAINED_PREFIX + key][2:] = 0  # folded: rows 2.. of the tail's weight and bias are zero
    path = tmp_path / "damaged.pth"
    torch.save(raw, path)
    return path


def test_a_run_that_improves_serves_its_last_round(state, pretrained_file, damaged_pretrained, lfw_file, capsys):
    # From a damaged base, the sites repair the first 8 rows (round 1), then all of them (round 2).
    good = {k: v.numpy() for k, v in shared_state(build_embedder(pretrained_file)).items()}

    def repair(tensors, cfg):
        k = {1: 8, 2: 128}[int(cfg["round"])]
        out = {}
        for name, v in tensors.items():
            v = v.copy()
            v[:k] = good[name][:k]
            out[name] = v
        return out

    grid = LocalGrid(
        {1: ("", shifted_site("alpha", 0.0, 1, change=repair)), 2: ("", shifted_site("beta", 0.0, 1, change=repair))}
    )
    logs = run(state, grid, make_config(rounds=2, **EVALUATED), damaged_pretrained, lfw_file)
    with Ledger(state.ledger) as ledger:
        base = ledger.run("t-run").base_metrics
        r1, r2 = ledger.rounds("t-run")
        assert score(base) < score(r1.metrics) < score(r2.metrics)
        assert ledger.run("t-run").best_checkpoint == "t-run-r0002"
        assert resolve(ledger, "current").ids == resolve(ledger, "latest").ids == ["t-run-r0002"]
    assert not any("made the model worse" in m for m in logs)
    assert follow(state, "t-run", "4242") == 0
    out = capsys.readouterr().out
    assert "made the model worse" not in out and "run t-run completed; its best model: t-run-r0002" in out


def test_after_an_unlearning_replay_the_best_is_chosen_among_live_checkpoints(state, pretrained_file, lfw_file):
    """The best of the original run (round 1) carried the forgotten person: it is deleted, and the replay,
    whose rounds are worse, serves the base model (the pretrained one, which never saw anyone)."""
    damage = keep_rows(4, when=lambda run_id, rnd: run_id == "t-run-u1" or rnd == 2)
    q = QuerySite("alpha")
    alpha = shifted_site("alpha", 0.0, 1, change=damage)
    alpha.query = q
    grid = LocalGrid({1: ("", alpha), 2: ("", shifted_site("beta", 0.0, 1, change=damage))})
    cfg = make_config(rounds=2, **EVALUATED)
    run(state, grid, cfg, pretrained_file, lfw_file)
    with Ledger(state.ledger) as ledger:
        assert ledger.best("t-run").checkpoint_id == "t-run-r0001"

    q.pending = [request({"t-run": [1, 2]})]
    logs = run(state, grid, cfg, pretrained_file, lfw_file, mode="unlearn")
    with Ledger(state.ledger) as ledger:
        assert ledger.run("t-run-u1").status == "completed"
        assert all(ledger.checkpoint(f"t-run-r000{r}").deleted_at is not None for r in (1, 2))
        assert ledger.run("t-run-u1").best_checkpoint == "t-run-r0000"
        assert resolve(ledger, "current").ids == ["t-run-r0000"]
        assert resolve(ledger, "latest").ids == ["t-run-u1-r0002"]
        base = ledger.run("t-run").base_metrics
        (u1, _u2) = ledger.rounds("t-run-u1")
        was, now = (shown(m) for m in (base, u1.metrics))
    assert (
        f"[facefed] round 1 made the model worse on validation ({was} -> {now}); the served model stays t-run-r0000"
        in logs
    )
    code, text = cli("evaluate", "--state", str(state.root), "--model", "t-run-r0001")
    assert code == 2 and "was deleted" in text and "the current model is t-run-r0000" in text
