"""SISA shards in the federation: one run per shard, orders that name the shard, sites that train only
their people of that shard (real vault), per-shard accountants, a replay that touches only the shard
of the person forgotten, and the ensemble evaluation."""

from __future__ import annotations

import json

import pytest
import torch
from federation_support import LocalGrid, shifted_site
from test_federation_rounds import coordinator, make_config
from test_unlearn import QuerySite, request, unlearner
from vault_support import load_faces as lfw_faces
from vault_support import make_stores

from facefed.client.site.round import Site, load_faces
from facefed.client.state import SiteState
from facefed.client.training.shard_state import ShardStateError, accountant_path, shard_key
from facefed.client.vault import Vault
from facefed.client.vault.tombstones import vault_key
from facefed.common.evaluate import EvalCache
from facefed.common.model.mobilefacenet import build_embedder, load_shared_state, shared_state
from facefed.common.shards import shard_of
from facefed.server.ledger.db import Ledger


def test_sharded_job_trains_one_run_per_shard_and_replays_only_the_persons_shard(state, pretrained_file):
    q = QuerySite("alpha")
    alpha = shifted_site("alpha", 0.1, 2)
    alpha.query = q
    grid = LocalGrid({1: ("", alpha), 2: ("", shifted_site("beta", 0.2, 3))})
    coordinator(state, grid, make_config(rounds=2, shards=2), pretrained_file).run()
    trains = [json.loads(json.dumps(dict(m.content["config"]))) for m in grid.pushed if "backbone" in m.content]
    assert sorted({(c["run-id"], c["shard"], c["shards"]) for c in trains}) == [("t-run-s0", 0, 2), ("t-run-s1", 1, 2)]
    with Ledger(state.ledger) as ledger:
        runs = {r.run_id: r for r in ledger.runs()}
        assert set(runs) == {"t-run-s0", "t-run-s1"}
        assert all(r.family == "t-run" and r.status == "completed" for r in runs.values())
        assert [runs[f"t-run-s{k}"].shard for k in (0, 1)] == [0, 1]

    q.pending = [request({"t-run-s1": [2]})]  # the person is in shard 1 only
    unlearner(state, grid, pretrained_file).run()
    with Ledger(state.ledger) as ledger:
        assert ledger.run("t-run-s0").status == "completed"  # untouched: it never saw them
        assert ledger.run("t-run-s1").status == "superseded"
        replay = ledger.run("t-run-s1-u1")
        assert (replay.shard, replay.family, replay.base_checkpoint) == (1, "t-run", "t-run-s1-r0001")
        assert ledger.live_run("t-run", 1).run_id == "t-run-s1-u1"
        assert ledger.request("fr-00000000000000aa").checkpoints_deleted == ["t-run-s1-r0002"]
    replayed = [
        json.loads(json.dumps(dict(m.content["config"])))
        for m in grid.pushed
        if "backbone" in m.content and dict(m.content["config"])["run-id"] == "t-run-s1-u1"
    ]
    assert {c["shard"] for c in replayed} == {1} and {c["round"] for c in replayed} == {2}


def test_site_trains_only_its_people_of_the_shard_from_a_real_vault(tmp_path, lfw, pretrained_file):
    faces = lfw_faces(lfw, 12)
    stores = make_stores(tmp_path / "stores", 3)
    with Vault.create(tmp_path / "vault", stores, 2) as v:
        v.put_many([(p, data, name) for p, imgs in faces.items() for name, data in imgs])
    site = Site(name="north", state=tmp_path / "state", vault=tmp_path / "vault", pretrained=pretrained_file, threads=1)
    parts = [set(load_faces(site, k, 3).person_ids) for k in range(3)]
    assert set().union(*parts) == set(faces) and sum(map(len, parts)) == len(faces)  # a partition
    # Each person is in the shard that the keyed hash of their pseudonym names (the vault key is random,
    # so which shard that is, and whether one stays empty with 12 people, varies from vault to vault).
    key = shard_key(vault_key(tmp_path / "vault"))
    with Vault.open(tmp_path / "vault") as v:
        expected = {r.person_id: shard_of(key, r.pseudonym, 3) for r in v.people()}
    assert {p: k for k, part in enumerate(parts) for p in part} == expected
    assert set(load_faces(site, 1, 3).person_ids) == parts[1]  # stable


def test_accountant_per_shard_and_no_mixing_of_shard_counts(tmp_path):
    site = SiteState(tmp_path / "state", tmp_path / "vault")  # the vault keeps the accountants
    assert accountant_path(site, 0, 1) == tmp_path / "vault" / "accountant.json"
    p = accountant_path(site, 2, 4)
    assert p == tmp_path / "vault" / "accountant-s2of4.json"
    p.parent.mkdir()
    p.write_text('{"events": [{"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 3}]}')  # it trained
    assert accountant_path(site, 3, 4).name == "accountant-s3of4.json"
    with pytest.raises(ShardStateError, match="4 shards"):
        accountant_path(site, 0, 1)
    with pytest.raises(ShardStateError, match="4 shards"):
        accountant_path(site, 0, 2)
    with pytest.raises(ShardStateError):
        accountant_path(site, 4, 4)
    (tmp_path / "vault" / "accountant.json").write_text('{"events": []}')  # an untrained plain one: no conflict
    assert accountant_path(site, 1, 4).name == "accountant-s1of4.json"


def test_ensemble_of_shard_models_scores_the_mean_of_their_cosines(lfw, pretrained_file):
    cache = EvalCache(lfw, "pairsDevTest.txt", flip=False, max_pairs=60)
    a = build_embedder(pretrained_file)
    b = build_embedder(pretrained_file)
    g = torch.Generator().manual_seed(1)
    load_shared_state(b, {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in shared_state(b).items()})
    one = cache.evaluate(a)
    same = cache.evaluate_ensemble([a, a])
    assert same.auc == pytest.approx(one.auc) and same.accuracy_mean == pytest.approx(one.accuracy_mean)
    mixed = cache.evaluate_ensemble([a, b])
    mean_cos = (cache.scores(cache.embeddings(a)) + cache.scores(cache.embeddings(b))) / 2
    from facefed.common.evaluate import metrics_from_scores

    direct = metrics_from_scores(mean_cos, cache.same, cache.folds, pairs_file=cache.pairs_file, flip=False)
    assert mixed.auc == pytest.approx(direct.auc, abs=1e-6)
