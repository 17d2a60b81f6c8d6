"""Known-answer tests for the server's formats: changing one is a visible decision, not an accident.

The literals below were generated once from the code and pasted; a changed table, column, checkpoint
key, receipt field or wire key fails here and must be updated on purpose (with a schema/format bump
where old files or peers exist).
"""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ed25519
from flwr.app import ConfigRecord, MetricRecord
from pydantic import ValidationError

from facefed.common.model.mobilefacenet import CHECKPOINT_FORMAT, MobileFaceNet
from facefed.common.protocol.tail import NAMES, SHAPES
from facefed.common.protocol.train import ARRAYS, CONFIG, METRICS, SITE, TrainOrder, TrainReply
from facefed.common.receipts import (
    Receipt,
    ReceiptError,
    canonical_json,
    key_fingerprint,
    sign_receipt,
    verify_receipt_signature,
)
from facefed.server.forget.receipts import issue
from facefed.server.ledger.checkpoints import CheckpointStore
from facefed.server.ledger.db import SCHEMA_VERSION, ForgetRow, Ledger

# -- the ledger ---------------------------------------------------------------------------------
LEDGER_VERSION = 2  # 2 (issue 13): runs.best_checkpoint
LEDGER_SCHEMA = {
    "attempts": ["run_id", "flwr_run_id", "started_at", "ended_at", "outcome"],
    "checkpoints": [
        "checkpoint_id", "run_id", "round", "path", "sha256", "parent_id", "created_at", "deleted_at", "deleted_reason",
    ],
    "ensembles": ["family", "created_at", "checkpoints", "metrics"],
    "forget_requests": [
        "request_id", "site", "pseudonym", "received_at", "erased_at", "shares_destroyed", "contributions",
        "reported_at", "status", "replay_run_id", "rollback_checkpoint", "model_checkpoint", "model_sha256",
        "checkpoints_deleted", "receipt", "delivered_at", "detail",
    ],
    "queries": ["site", "at", "ok", "pending", "detail"],
    "rounds": [
        "run_id", "round", "attempt", "status", "flwr_run_id", "started_at", "ended_at", "parent_checkpoint",
        "parent_sha256", "checkpoint_id", "checkpoint_sha256", "participants", "missing", "weighting",
        "total_weight", "metrics", "detail",
    ],
    "runs": [
        "run_id", "kind", "parent_run_id", "created_at", "ended_at", "status", "rounds_planned", "config_sha256",
        "config_json", "base_checkpoint", "base_metrics", "detail", "start_round", "family", "shard",
        "best_checkpoint",
    ],
    "site_rounds": [
        "run_id", "round", "attempt", "site", "node_id", "status", "weight", "people", "images", "steps", "loss",
        "epsilon", "delta", "unit", "accountant", "compute_s", "bytes_down", "bytes_up", "received_keys", "detail",
    ],
    "sites": ["name", "fingerprint", "public_key", "node_id", "registered_at", "revoked_at"],
    "rounds_one_commit": "index",
    "sites_active_fp": "index",
}  # fmt: skip


def ledger_schema(path) -> tuple[int, dict]:
    db = sqlite3.connect(path)
    try:
        out: dict = {}
        for name, kind in db.execute("SELECT name, type FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"):
            out[name] = [r[1] for r in db.execute(f"PRAGMA table_info({name})")] if kind == "table" else kind
        return db.execute("PRAGMA user_version").fetchone()[0], out
    finally:
        db.close()


def test_ledger_schema_is_the_known_one(tmp_path):
    Ledger(tmp_path / "ledger.sqlite").close()
    assert SCHEMA_VERSION == LEDGER_VERSION
    assert ledger_schema(tmp_path / "ledger.sqlite") == (LEDGER_VERSION, LEDGER_SCHEMA)
    Ledger(tmp_path / "ledger.sqlite").close()  # reopening changes nothing
    assert ledger_schema(tmp_path / "ledger.sqlite") == (LEDGER_VERSION, LEDGER_SCHEMA)


def test_ledger_refuses_a_newer_schema_and_the_literal_catches_a_change(tmp_path):
    path = tmp_path / "ledger.sqlite"
    Ledger(path).close()
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE runs ADD COLUMN extra TEXT")
    db.execute(f"PRAGMA user_version={LEDGER_VERSION + 1}")
    db.commit()
    db.close()
    assert ledger_schema(path) != (LEDGER_VERSION, LEDGER_SCHEMA)
    from facefed.common.errors import FacefedError
    from facefed.server.ledger.db import LedgerError

    with pytest.raises(LedgerError, match="newer than") as e:
        Ledger(path)
    assert isinstance(e.value, FacefedError)


def test_a_schema_1_ledger_is_migrated_and_marks_each_runs_best(tmp_path):
    """A ledger written before validation scores (schema 1, no runs.best_checkpoint) opens as schema 2
    with the same columns as a new one; its runs, unscored, serve their latest checkpoint as before."""
    from facefed.server.ledger.db import CheckpointRow, RoundRow

    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as ledger:
        base = CheckpointRow("old-r0000", "old", 0, "/x/r0000.pt", "a" * 64, None, 1.0)
        ledger.create_run("old", config_json="{}", config_sha256="c" * 64, rounds=1, base=base)
        r1 = CheckpointRow("old-r0001", "old", 1, "/x/r0001.pt", "b" * 64, "old-r0000", 2.0)
        ledger.commit_round(
            RoundRow(
                "old", 1, 1, "committed", "7", 1.0, 2.0, "old-r0000", "a" * 64, "old-r0001", "b" * 64,
                ["a"], [], "people", 1.0, {"lfw_accuracy": 0.99}, None,
            ),
            r1,
        )  # fmt: skip
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE runs DROP COLUMN best_checkpoint")  # what a schema-1 facefed wrote
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    with Ledger(path) as ledger:
        assert ledger.run("old").best_checkpoint == "old-r0001"
    assert ledger_schema(path) == (LEDGER_VERSION, LEDGER_SCHEMA)


# -- checkpoints ----------------------------------------------------------------------------------
def test_checkpoint_file_format(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints")
    base = store.save(MobileFaceNet(), run_id="t-run", rnd=0, parent=None, meta={"source": "pretrained"})
    threshold = {"threshold": 0.31, "far": 0.001, "n_impostor": 1100, "validation": "lfw/pairsDevTrain.txt"}
    row = store.save(
        MobileFaceNet(),
        run_id="t-run",
        rnd=1,
        parent=base,
        meta={"participants": ["a"], "threshold": threshold},
        base_sha256="b" * 64,
        sites={"a": {"epsilon": 0.5, "delta": 1e-05, "unit": "person"}},
    )
    assert row.checkpoint_id == "t-run-r0001" and row.path == str(tmp_path / "checkpoints" / "t-run" / "r0001.pt")
    payload = torch.load(row.path, map_location="cpu", weights_only=True)
    # /2 (issue 13): meta carries preprocessing, provenance and the decision threshold.
    assert CHECKPOINT_FORMAT == "facefed-embedder/2"
    assert sorted(payload) == ["format", "meta", "norm", "state_dict", "train_from"]
    assert (payload["format"], payload["norm"], payload["train_from"]) == ("facefed-embedder/2", "folded", "conv1")
    assert payload["meta"] == {
        "checkpoint_id": "t-run-r0001",
        "run_id": "t-run",
        "round": 1,
        "parent_id": "t-run-r0000",
        "parent_sha256": base.sha256,
        "participants": ["a"],
        "threshold": threshold,
        "preprocessing": {
            "layout": "aligned-112 from canonical-224",
            "aligner": "dlib-hog1-mmod320-sp5-v2",
            "input": "RGB 112x112",
            "normalisation": "RGB x/127.5 - 1 (== (x/255 - 0.5) / 0.5)",
            "flip_average": True,
        },
        "provenance": {
            "run_id": "t-run",
            "round": 1,
            "parent_sha256": base.sha256,
            "base_sha256": "b" * 64,
            "sites": {"a": {"epsilon": 0.5, "delta": 1e-05, "unit": "person"}},
            "facefed_version": "0.1.0",
        },
    }
    assert list(payload["meta"]) == [
        "checkpoint_id",
        "run_id",
        "round",
        "parent_id",
        "parent_sha256",
        "participants",
        "threshold",
        "preprocessing",
        "provenance",
    ]


# -- receipts -------------------------------------------------------------------------------------
KEY = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))  # a fixed test key, never a real one
KEY_FP = "SHA256:a050837d85070582ccf7394b0988847cc312cb88259b894899f6f239cf1791a5"
RECEIPT_BYTES = (
    b'{"checkpoints_deleted":["t-run-r0002","t-run-r0003"],"erased_at":"2024-01-02T03:05:00.000000Z",'
    b'"format":"facefed-receipt/2","issued_at":"2024-01-02T04:00:00.000000Z","model_id":"t-run-u1-r0003",'
    b'"model_sha256":"abababababababababababababababababababababababababababababababab",'
    b'"person_pseudonym":"0123456789abcdef0123456789abcdef","received_at":"2024-01-02T03:04:05.000000Z",'
    b'"replayed_rounds":[2,3],"request_id":"fr-00000000000000aa","rollback_round":1,"run_id":"t-run-u1",'
    b'"server_key_fingerprint":"SHA256:a050837d85070582ccf7394b0988847cc312cb88259b894899f6f239cf1791a5",'
    b'"shares_destroyed":3,"site":"alpha","superlink_purged_at":"2024-01-02T03:59:00.000000Z",'
    b'"superlink_runs_purged":[11,12]}'
)
SIGNATURE = "bLpolDRlbEMuzrf5NJp/PMYw/OgmIY51pJFBvGcYxjqH+LBMeK9iYn7qxp1siaQ5eg6TYqeEMPwGnuiSGRzkCw=="
# A receipt of the first format (no purge fields), as sites stored them: it must keep verifying.
RECEIPT_V1_BYTES = (
    b'{"checkpoints_deleted":["t-run-r0002","t-run-r0003"],"erased_at":"2024-01-02T03:05:00.000000Z",'
    b'"format":"facefed-receipt/1","issued_at":"2024-01-02T04:00:00.000000Z","model_id":"t-run-u1-r0003",'
    b'"model_sha256":"abababababababababababababababababababababababababababababababab",'
    b'"person_pseudonym":"0123456789abcdef0123456789abcdef","received_at":"2024-01-02T03:04:05.000000Z",'
    b'"replayed_rounds":[2,3],"request_id":"fr-00000000000000aa","rollback_round":1,"run_id":"t-run-u1",'
    b'"server_key_fingerprint":"SHA256:a050837d85070582ccf7394b0988847cc312cb88259b894899f6f239cf1791a5",'
    b'"shares_destroyed":3,"site":"alpha"}'
)
SIGNATURE_V1 = "FNqpcphmiWlUFz8Q0DXZ2zMRkZTgn/L7si6hXgfTzUUBHYUmMK1SHodTbfBAeYZ+e1UAKmMo6YOneaamvYb+AQ=="


def known_receipt() -> Receipt:
    return Receipt(
        request_id="fr-00000000000000aa",
        site="alpha",
        person_pseudonym="0123456789abcdef0123456789abcdef",
        received_at="2024-01-02T03:04:05.000000Z",
        erased_at="2024-01-02T03:05:00.000000Z",
        shares_destroyed=3,
        run_id="t-run-u1",
        rollback_round=1,
        replayed_rounds=[2, 3],
        model_id="t-run-u1-r0003",
        model_sha256="ab" * 32,
        checkpoints_deleted=["t-run-r0002", "t-run-r0003"],
        superlink_purged_at="2024-01-02T03:59:00.000000Z",
        superlink_runs_purged=[11, 12],
        issued_at="2024-01-02T04:00:00.000000Z",
        server_key_fingerprint=KEY_FP,
    )


def test_receipt_canonical_bytes_and_signature():
    assert key_fingerprint(KEY.public_key()) == KEY_FP
    doc = sign_receipt(known_receipt(), KEY)
    assert sorted(doc) == ["algorithm", "receipt", "signature"] and doc["algorithm"] == "ed25519"
    assert canonical_json(doc["receipt"]) == RECEIPT_BYTES
    assert doc["signature"] == SIGNATURE  # Ed25519 is deterministic: same key and bytes, same signature
    assert verify_receipt_signature(doc, KEY.public_key()) == known_receipt()
    # The pasted document verifies on its own (a stored receipt stays verifiable) ...
    pasted = {"algorithm": "ed25519", "receipt": json.loads(RECEIPT_BYTES), "signature": SIGNATURE}
    assert verify_receipt_signature(pasted, KEY.public_key()).request_id == "fr-00000000000000aa"
    # ... and one changed field does not.
    changed = {**pasted, "receipt": {**pasted["receipt"], "rollback_round": 0}}
    with pytest.raises(ReceiptError, match="signature does not match"):
        verify_receipt_signature(changed, KEY.public_key())
    # A first-format receipt still verifies, and a purge claim cannot be added to it.
    v1 = {"algorithm": "ed25519", "receipt": json.loads(RECEIPT_V1_BYTES), "signature": SIGNATURE_V1}
    assert verify_receipt_signature(v1, KEY.public_key()).superlink_runs_purged == []
    claimed = {**v1, "receipt": {**v1["receipt"], "superlink_runs_purged": [7]}}
    with pytest.raises(ReceiptError, match="signature does not match"):
        verify_receipt_signature(claimed, KEY.public_key())


def test_server_issues_receipts_of_the_known_shape(tmp_path):
    from facefed.server.ledger.db import CheckpointRow

    req = ForgetRow(
        request_id="fr-00000000000000aa",
        site="alpha",
        pseudonym="0123456789abcdef0123456789abcdef",
        received_at=1704164645.0,
        erased_at=1704164700.0,
        shares_destroyed=3,
        contributions={"t-run": [2, 3]},
    )
    rollback = CheckpointRow("t-run-r0001", "t-run", 1, "p1", "cd" * 32, "t-run-r0000", 0.0)
    model = CheckpointRow("t-run-u1-r0003", "t-run-u1", 3, "p3", "ab" * 32, "t-run-u1-r0002", 0.0)
    doc = issue(
        req,
        replay_run="t-run-u1",
        rollback=rollback,
        model=model,
        deleted=["t-run-r0002"],
        key=KEY,
        purged_at=1704167940.0,
        runs_purged=[12, 11],
    )
    body = doc["receipt"]
    assert sorted(body) == sorted(json.loads(RECEIPT_BYTES))
    assert {k: body[k] for k in ("received_at", "erased_at", "replayed_rounds", "rollback_round", "model_id")} == {
        "received_at": "2024-01-02T03:04:05.000000Z",
        "erased_at": "2024-01-02T03:05:00.000000Z",
        "replayed_rounds": [2, 3],
        "rollback_round": 1,
        "model_id": "t-run-u1-r0003",
    }
    assert body["superlink_purged_at"] == "2024-01-02T03:59:00.000000Z" and body["superlink_runs_purged"] == [11, 12]
    verify_receipt_signature(doc, KEY.public_key())


# -- the train protocol ---------------------------------------------------------------------------
ORDER_JSON = (
    '{"run-id":"t-run","round":2,"attempt":1,"parent-checkpoint":"t-run-r0001",'
    '"parent-sha256":"cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd",'
    '"base-sha256":"efefefefefefefefefefefefefefefefefefefefefefefefefefefefefefefef",'
    '"prefix-fingerprint":"0101010101010101010101010101010101010101010101010101010101010101",'
    '"train-config":"{\\"steps\\":5}","steps":5,"seed":7,"weighting":"people","expected-site":"alpha",'
    '"shard":0,"shards":1,"head-run":"t-run","head-round":1,"head-attempt":1,'
    '"layout-names":["w","b"],"layout-shapes":["2,3","3"]}'
)
# Issue 11: a reply carries DP outputs and public facts only (no loss, image or sampled counts, timings, pid).
REPLY_JSON = (
    '{"metrics":{"num-people":4,"steps":5,"probe-steps":1,'
    '"epsilon":0.25,"delta":0.00001,"noise-multiplier":1.1,"sample-rate":0.5},'
    '"site":{"name":"alpha","unit":"person","accountant":"rdp","head-from":"fresh","worker":"warm",'
    '"layout-names":["w","b"],"layout-shapes":["2,3","3"]}}'
)


def known_order() -> dict:
    return {
        "run-id": "t-run",
        "round": 2,
        "attempt": 1,
        "parent-checkpoint": "t-run-r0001",
        "parent-sha256": "cd" * 32,
        "base-sha256": "ef" * 32,
        "prefix-fingerprint": "01" * 32,
        "train-config": '{"steps":5}',
        "steps": 5,
        "seed": 7,
        "weighting": "people",
        "expected-site": "alpha",
        "shard": 0,
        "shards": 1,
        "head-run": "t-run",
        "head-round": 1,
        "head-attempt": 1,
        NAMES: ["w", "b"],
        SHAPES: ["2,3", "3"],
    }


def test_train_record_keys():
    assert (ARRAYS, CONFIG, METRICS, SITE) == ("backbone", "config", "metrics", "site")
    assert (NAMES, SHAPES) == ("layout-names", "layout-shapes")


def test_train_order_json_and_record_round_trip():
    order = TrainOrder.from_config(ConfigRecord(known_order()))
    assert order.model_dump_json(by_alias=True) == ORDER_JSON
    assert dict(order.to_config()) == known_order()
    assert TrainOrder.model_validate_json(ORDER_JSON) == order


@pytest.mark.parametrize(
    "change",
    [
        {"extra-key": 1},  # an unknown key
        {"round": "2"},  # no coercion
        {"round": 0},
        {"shards": 257},
        {"run-id": "../etc"},
        {"seed": True},
        {NAMES: ["w"] * 1025},
        {"train-config": "x" * 65537},
    ],
)
def test_train_order_refuses_what_it_does_not_know(change):
    with pytest.raises(ValidationError):
        TrainOrder.from_config(known_order() | change)
    missing = dict(known_order())
    del missing["prefix-fingerprint"]
    with pytest.raises(ValidationError):
        TrainOrder.from_config(missing)


def test_train_reply_json_and_records():
    reply = TrainReply.model_validate_json(REPLY_JSON)
    metrics, site = reply.to_records()
    assert isinstance(metrics, MetricRecord) and isinstance(site, ConfigRecord)
    assert TrainReply.from_records(metrics, site) == reply
    assert reply.model_dump_json(by_alias=True) == REPLY_JSON
    # Only the weight and the layout are required (what the server cannot do without) ...
    minimal = TrainReply.from_records({"num-people": 2}, {"name": "x", NAMES: [], SHAPES: []})
    assert minimal.metrics.epsilon is None
    for leak in ("loss", "num-images", "sampled-images", "people-sampled", "train-s", "compute-s", "handler-start"):
        with pytest.raises(ValidationError):  # what a reply used to carry is refused at the server
            TrainReply.from_records({**dict(metrics), leak: 1.0}, site)
    # ... and an unknown metric or a mistyped one is refused.
    with pytest.raises(ValidationError):
        TrainReply.from_records({**dict(metrics), "head-rows": 1.0}, site)
    with pytest.raises(ValidationError):
        TrainReply.from_records({**dict(metrics), "num-people": 4.0}, site)
