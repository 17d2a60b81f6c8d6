"""The site owns its privacy (issue 11, items 4, 5, 7): hostile train orders are refused before anything
runs, one accountant per vault shared by local `train` and the node, and a reply carries exactly the
allowed fields. A real vault of real LFW faces, real rounds (client/site/round.py), real files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from train_support import make_vault

from facefed.client.site.refusal import kind_of
from facefed.client.site.round import Order, Site, order_of, run_round
from facefed.client.training.privacy import Policy, policy_of, write_policy
from facefed.common.config import ConfigError, TrainConfig
from facefed.common.model.mobilefacenet import build_embedder, prefix_fingerprint, shared_state
from facefed.common.protocol.train import SiteRefused, TrainMetrics, TrainReply

POLICY = Policy(
    delta=1e-3, max_epsilon=20.0, min_noise_multiplier=0.8, max_sample_rate=0.5, max_steps=20, max_grad_norm=5.0
)
GOOD = dict(privacy_unit="person", delta=1e-3, max_epsilon=20.0, noise_multiplier=1.0, sample_rate=0.5, min_people=2)
ALLOWED_METRICS = {"num-people", "steps", "probe-steps", "epsilon", "delta", "noise-multiplier", "sample-rate"}
ALLOWED_SITE = {"name", "unit", "accountant", "head-from", "worker", "layout-names", "layout-shapes"}


@pytest.fixture(scope="module")
def site(tmp_path_factory, lfw, pretrained_file):
    root = tmp_path_factory.mktemp("policy")
    vault, _ = make_vault(root, lfw, 10, max_per_person=2)
    write_policy(vault, POLICY)
    model = build_embedder(pretrained_file, train_from="conv_5")
    tail = {k: v.detach().numpy() for k, v in shared_state(model).items()}
    return Site(name="north", state=vault / "site", vault=vault, pretrained=pretrained_file, threads=1), model, tail


def order(model, steps: int = 3, **train) -> Order:
    cfg = TrainConfig.model_validate({**GOOD, "train_from": "conv_5", "steps": steps, **train})
    return Order(
        run_id="run-1",
        round=1,
        attempt=1,
        parent_checkpoint="run-1-r0000",
        prefix=prefix_fingerprint(model),
        train=cfg,
        steps=steps,
        seed=0,
        head_round=0,
        head_attempt=0,
        expected_site="north",
    )


HOSTILE = [
    ({"privacy_unit": "none"}, "privacy_unit"),  # no noise at all
    ({"noise_multiplier": 0.05, "max_epsilon": 20.0}, "noise_multiplier"),  # below the floor
    ({"max_epsilon": 1e9}, "max_epsilon"),  # a budget above the policy's
    ({"delta": 0.1}, "delta"),  # above the policy's 1e-3 (0.5 is refused earlier, below)
    ({"steps": 1000}, "max_steps"),  # more steps than one order may take
    ({"sample_rate": 1.0}, "sample_rate"),
    ({"max_grad_norm": 100.0}, "max_grad_norm"),
    ({"center_noise": 0.1}, "center_noise"),
]


def test_hostile_orders_are_refused_before_anything_runs(site, tmp_path):
    s, model, tail = site
    acc = s.vault / "accountant.json"
    before = acc.read_bytes()
    # Take the shares away: an order that read a single image would fail with a store error, not a refusal.
    hidden = tmp_path / "hidden"
    shutil.move(str(s.vault.parent / "store0"), hidden)
    try:
        for change, field in HOSTILE:
            steps = change.pop("steps", 3)
            with pytest.raises(SiteRefused) as e:
                run_round(s, order(model, steps=steps, **change), tail)
            assert e.value.kind == "policy" and e.value.reason.startswith(f"{field}: order asks"), e.value.reason
            assert "policy allows" in e.value.reason and "facefed-client policy set" in e.value.reason
            assert acc.read_bytes() == before  # the accountant is unchanged
        assert not (s.state / "heads").exists() and not (s.state / "contributions.sqlite").exists()
        # delta 0.5 (not below 1/min_people) does not even parse as a training config at the site.
        wire = {
            "run-id": "run-1",
            "round": 1,
            "attempt": 1,
            "parent-checkpoint": "run-1-r0000",
            "parent-sha256": "cd" * 32,
            "base-sha256": "ef" * 32,
            "prefix-fingerprint": prefix_fingerprint(model),
            "train-config": json.dumps({**GOOD, "delta": 0.5}),
            "steps": 3,
            "seed": 0,
            "weighting": "people",
            "head-round": 0,
            "head-attempt": 0,
            "layout-names": [],
            "layout-shapes": [],
        }
        with pytest.raises(ConfigError, match="delta 0.5 must be below 1/min_people") as bad:
            order_of(wire)
        assert kind_of(bad.value) == "config"  # what the ClientApp answers the server
        assert acc.read_bytes() == before
    finally:
        shutil.move(str(hidden), s.vault.parent / "store0")


def test_over_budget_and_missing_accountant_are_refused(site):
    s, model, tail = site
    acc = s.vault / "accountant.json"
    before = acc.read_bytes()
    with pytest.raises(SiteRefused) as e:  # allowed by every policy field, but over the 0.5 budget it asks for
        run_round(s, order(model, steps=20, max_epsilon=0.5), tail)
    assert e.value.kind == "budget" and "privacy budget exceeded" in e.value.reason
    assert acc.read_bytes() == before
    acc.rename(acc.with_suffix(".bak"))  # a missing accountant never reads as epsilon 0
    try:
        with pytest.raises(SiteRefused) as e:
            run_round(s, order(model), tail)
        assert e.value.kind == "data" and "never read as 0" in e.value.reason
        assert not acc.exists()
    finally:
        acc.with_suffix(".bak").rename(acc)


def test_a_round_replies_exactly_the_allowed_fields_and_spends_the_vault_accountant(site):
    s, model, tail = site
    res = run_round(s, order(model, steps=3, noise_multiplier=2.0, max_epsilon=5.0), tail)  # more privacy: fine
    assert set(res.metrics) == ALLOWED_METRICS
    assert set(res.info) | {"worker", "layout-names", "layout-shapes"} == ALLOWED_SITE
    assert set(TrainMetrics.model_fields) == {k.replace("-", "_") for k in ALLOWED_METRICS}
    reply = TrainReply.from_records(res.metrics, {**res.info, "layout-names": [], "layout-shapes": []})
    assert reply.metrics.steps == 3 and reply.metrics.noise_multiplier == 2.0 and reply.metrics.delta == 1e-3
    events = json.loads((s.vault / "accountant.json").read_text())["events"]
    assert sum(e["steps"] for e in events) == 3  # recorded in THE vault accountant
    assert not (s.state / "accountant.json").exists()
    # What the server no longer sees stays in the site's own log.
    (line,) = (s.state / "logs" / "rounds.jsonl").read_text().splitlines()
    assert {"loss", "images", "sampled_images", "people_sampled", "train_s"} <= set(json.loads(line))


def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "facefed.client.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def test_policy_cli_status_and_preview(tmp_path, lfw):
    vault, _ = make_vault(tmp_path, lfw, 10, max_per_person=2)
    r = _cli("policy", "set", "--vault", str(vault), "--delta", "1e-3", "--max-epsilon", "12", "--max-steps", "50")
    assert r.returncode == 0, r.stderr
    assert (vault / "policy.json").stat().st_mode & 0o777 == 0o600
    assert policy_of(vault).max_epsilon == 12.0 and (vault / "accountant.json").exists()
    r = _cli("policy", "set", "--vault", str(vault), "--delta", "0.5")  # not below 1/people
    assert r.returncode == 2 and "below 1/10" in r.stderr
    r = _cli("status", "--vault", str(vault))
    assert r.returncode == 0 and "epsilon spent 0.000, left 12.000" in r.stdout
    assert "delta 0.001" in r.stdout and "add/remove one person" in r.stdout and "RDP" in r.stdout
    cfg = tmp_path / "fed.toml"
    cfg.write_text(
        "rounds = 3\n[train]\ndelta = 1e-3\nmax_epsilon = 12.0\nnoise_multiplier = 1.0\nsample_rate = 0.5\nsteps = 10\n"
    )
    r = _cli("policy", "preview", "--vault", str(vault), "--config", str(cfg), "--json")
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    assert p["rounds"] == 3 and p["steps"] == 30 and p["epsilon_after"] > 0 and p["delta"] == 1e-3
    cfg.write_text(cfg.read_text().replace("noise_multiplier = 1.0", "noise_multiplier = 0.1"))
    r = _cli("policy", "preview", "--vault", str(vault), "--config", str(cfg))
    assert r.returncode == 2 and "refused (policy): noise_multiplier" in r.stderr
    # Missing accountant: status says so and training is refused.
    (vault / "accountant.json").unlink()
    r = _cli("status", "--vault", str(vault))
    assert r.returncode == 1 and "missing" in r.stdout
    assert np.isfinite(policy_of(vault).delta)
