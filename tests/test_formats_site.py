"""Known-answer tests of the site's persisted and wire formats.

Each literal below is what facefed writes today, pasted. A test that fails here means a format changed:
that is a decision (old files, old sites and old servers meet the new format), so bump the format's
version or write a migration, and then update the literal.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

from facefed.client.forget.contributions import ContributionLog
from facefed.client.forget.requests import RequestLog
from facefed.client.state import REQUESTS_NAME, SiteState, default_node_state, default_train_state, head_name
from facefed.client.vault import tombstones
from facefed.common.accountant import SiteAccountant
from facefed.common.model.heads import MarginHead
from facefed.common.protocol.forget import (
    BudgetAnswer,
    BudgetAsk,
    Delivery,
    DropHeads,
    PendingRequest,
    QueryOrder,
    QueryReply,
)
from facefed.common.protocol.tail import LayoutError, pack, unpack

# -- the shared tail on the wire (common/protocol/tail.py) --------------------------------------------

TAIL_HEX = "0000c03f000000c00000803e0000404000008040"  # float32 little-endian: 1.5 -2 0.25 3 4


def test_tail_pack_known_answer():
    flat, names, shapes = pack({"b": np.array([[1.5, -2.0]], dtype=np.float32), "a": np.array([0.25, 3.0, 4.0])})
    assert flat.dtype == np.float32
    assert flat.tobytes().hex() == TAIL_HEX
    assert (names, shapes) == (["b", "a"], ["1,2", "3"])  # insertion order, shapes as "d1,d2"


def test_tail_pack_of_torch_tensors_is_the_same():
    flat, names, shapes = pack({"b": torch.tensor([[1.5, -2.0]]), "a": torch.tensor([0.25, 3.0, 4.0])})
    assert (flat.tobytes().hex(), names, shapes) == (TAIL_HEX, ["b", "a"], ["1,2", "3"])


def test_tail_unpack_known_answer():
    flat = np.frombuffer(bytes.fromhex(TAIL_HEX), dtype=np.float32)
    out = unpack(flat, ["b", "a"], ["1,2", "3"])
    assert list(out) == ["b", "a"]
    assert out["b"].tolist() == [[1.5, -2.0]] and out["a"].tolist() == [0.25, 3.0, 4.0]
    with pytest.raises(LayoutError):
        unpack(flat, ["b", "a"], ["1,2", "2"])


# -- the forget query and reply (common/protocol/forget.py) -------------------------------------------

RID = "fr-0123456789abcdef"
ORDER_JSON = (
    '{"deliver":[{"request_id":"fr-0123456789abcdef","run_id":"run-1","round":3,"checkpoint_id":"ck-1",'
    '"checkpoint_sha256":"' + "ab" * 32 + '","receipt":{"receipt":{"request_id":"fr-0123456789abcdef"},'
    '"signature":"c2ln"}}],"drop_heads":[{"run_id":"run-1","from_round":2}],'
    '"budget":{"train_config":"{}","rounds":2,"steps":5,"shard":0,"shards":1}}'
)
REPLY_JSON = (
    '{"site":"site-a","pending":[{"request_id":"fr-0123456789abcdef","pseudonym":"' + "0f" * 16 + '",'
    '"received_at":1.5,"erased_at":2.5,"shares_destroyed":6,"contributions":{"run-1":[1,2]}}],'
    '"stored":["fr-0123456789abcdef"],"heads_dropped":2,"budget":{"fits":true,"unit":"person",'
    '"delta":0.00001,"epsilon_now":0.5,"epsilon_planned":1.25,"max_epsilon":8.0,"detail":""},"problems":["x"]}'
)


def _order() -> QueryOrder:
    return QueryOrder(
        deliver=[
            Delivery(
                request_id=RID,
                run_id="run-1",
                round=3,
                checkpoint_id="ck-1",
                checkpoint_sha256="ab" * 32,
                receipt={"receipt": {"request_id": RID}, "signature": "c2ln"},
            )
        ],
        drop_heads=[DropHeads(run_id="run-1", from_round=2)],
        budget=BudgetAsk(train_config="{}", rounds=2, steps=5),
    )


def _reply() -> QueryReply:
    return QueryReply(
        site="site-a",
        pending=[
            PendingRequest(
                request_id=RID,
                pseudonym="0f" * 16,
                received_at=1.5,
                erased_at=2.5,
                shares_destroyed=6,
                contributions={"run-1": [1, 2]},
            )
        ],
        stored=[RID],
        heads_dropped=2,
        budget=BudgetAnswer(
            fits=True, unit="person", delta=1e-5, epsilon_now=0.5, epsilon_planned=1.25, max_epsilon=8.0
        ),
        problems=["x"],
    )


def test_query_order_known_answer():
    assert _order().model_dump_json() == ORDER_JSON
    assert QueryOrder.model_validate_json(ORDER_JSON) == _order()


def test_query_reply_known_answer():
    assert _reply().model_dump_json() == REPLY_JSON
    assert QueryReply.model_validate_json(REPLY_JSON) == _reply()


def test_query_messages_refuse_unknown_fields():
    with pytest.raises(ValueError):
        QueryReply.model_validate_json(REPLY_JSON[:-1] + ',"extra":1}')
    with pytest.raises(ValueError):
        QueryOrder.model_validate_json(ORDER_JSON.replace('"from_round"', '"first_round"'))


# -- the privacy accountant's file (common/accountant.py) ---------------------------------------------

ACCOUNTANT_FILE = """{
 "format": "facefed-accountant/1",
 "accountant": "rdp",
 "unit": "person",
 "delta": 1e-05,
 "events": [
  {
   "noise_multiplier": 1.0,
   "sample_rate": 0.5,
   "steps": 3,
   "label": "round 1",
   "at": "AT"
  }
 ]
}"""
ACCOUNTANT_EPSILON = 6.482379916374285  # RDP of 3 subsampled Gaussian steps, sigma 1, q 0.5, delta 1e-5


def test_accountant_writes_the_known_file(tmp_path):
    acc = SiteAccountant(tmp_path / "accountant.json", 1e-5, 50.0, "person")
    eps = acc.record(1.0, 0.5, 3, label="round 1")
    text = (tmp_path / "accountant.json").read_text()
    at = json.loads(text)["events"][0]["at"]
    assert text == ACCOUNTANT_FILE.replace('"AT"', json.dumps(at))
    assert eps == pytest.approx(ACCOUNTANT_EPSILON, rel=1e-9)


def test_accountant_reads_the_known_file(tmp_path):
    (tmp_path / "accountant.json").write_text(ACCOUNTANT_FILE.replace('"AT"', '"2025-01-01T00:00:00+00:00"'))
    acc = SiteAccountant(tmp_path / "accountant.json", 1e-5, 50.0, "person")
    assert acc.steps == 3 and acc.history() == [(1.0, 0.5, 3)]
    assert acc.epsilon() == pytest.approx(ACCOUNTANT_EPSILON, rel=1e-9)


# -- the site's SQLite databases (client/forget/) -----------------------------------------------------

CONTRIBUTIONS_SCHEMA = [
    (
        "table",
        "contributions",
        "contributions",
        "CREATE TABLE contributions (\n    pseudonym         TEXT NOT NULL,\n    run_id            TEXT NOT NULL,\n"
        "    round             INTEGER NOT NULL,\n    attempt           INTEGER NOT NULL,\n"
        "    images            INTEGER NOT NULL,\n    sampled           INTEGER NOT NULL,\n"
        "    parent_checkpoint TEXT NOT NULL,\n    head_file         TEXT,\n    recorded_at       REAL NOT NULL,\n"
        "    PRIMARY KEY (pseudonym, run_id, round, attempt)\n)",  # issue 11: keyed by pseudonym
    ),
    (
        "index",
        "contributions_round",
        "contributions",
        "CREATE INDEX contributions_round ON contributions(run_id, round)",
    ),
    ("index", "sqlite_autoindex_contributions_1", "contributions", None),
]
REQUESTS_SCHEMA = [
    (
        "table",
        "requests",
        "requests",
        "CREATE TABLE requests (\n    request_id      TEXT PRIMARY KEY,\n    id_hash         TEXT NOT NULL,\n"
        "    pseudonym       TEXT NOT NULL,\n    reason          TEXT,\n    received_at     REAL NOT NULL,\n"
        "    contributions   TEXT NOT NULL,       -- JSON list of RunSpan: what the server needs to unlearn\n"
        "    erased_at       REAL,\n    shares_destroyed INTEGER,\n    shares_pending  INTEGER,\n"
        "    images          INTEGER,\n    head_rows_removed INTEGER,\n"
        "    head_files      TEXT,                -- JSON list of head files rewritten without the person\n"
        "    contribution_rows INTEGER,\n    unlearned_at    REAL,\n    run_id          TEXT,\n"
        "    round           INTEGER,\n    checkpoint_id   TEXT,\n    checkpoint_sha256 TEXT,\n"
        "    receipt_path    TEXT,\n    receipt_at      REAL\n)",
    ),
    ("index", "requests_by_hash", "requests", "CREATE INDEX requests_by_hash ON requests(id_hash)"),
    ("index", "sqlite_autoindex_requests_1", "requests", None),
    ("index", "sqlite_autoindex_tombstones_1", "tombstones", None),
    (
        "table",
        "tombstones",
        "tombstones",
        "CREATE TABLE tombstones (\n    id_hash   TEXT PRIMARY KEY,\n    request_id TEXT NOT NULL,\n"
        "    created   REAL NOT NULL\n)",
    ),
]


def _schema(path: Path) -> tuple[list[tuple[str, str, str, str | None]], str, int]:
    db = sqlite3.connect(path)
    try:
        rows = db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name").fetchall()
        return rows, db.execute("PRAGMA journal_mode").fetchone()[0], db.execute("PRAGMA user_version").fetchone()[0]
    finally:
        db.close()


def test_contributions_schema_known_answer(tmp_path):
    with ContributionLog(tmp_path / "contributions.sqlite"):
        pass
    assert _schema(tmp_path / "contributions.sqlite") == (CONTRIBUTIONS_SCHEMA, "wal", 0)


def test_requests_schema_known_answer(tmp_path):
    (tmp_path / "key").write_bytes(bytes(32))  # a vault's key (client/vault/tombstones.py)
    with RequestLog(tmp_path):
        pass
    # A rollback journal, never WAL: deleted rows must not linger in a -wal file.
    assert _schema(tmp_path / REQUESTS_NAME) == (REQUESTS_SCHEMA, "delete", 0)


# -- a head file (common/model/heads.py) ----------------------------------------------------------------

HEAD_STATE_KEYS = ["format", "ids", "weight", "dim", "scale", "margin", "seed", "probed"]


def test_head_file_known_answer(tmp_path):
    head = MarginHead(scale=32.0, margin=0.2, seed=7)
    head.add_people(["p1", "p2"])
    head.save(tmp_path / "r0001-a1.pt")
    state = torch.load(tmp_path / "r0001-a1.pt", map_location="cpu", weights_only=True)
    assert list(state) == HEAD_STATE_KEYS
    assert {k: v for k, v in state.items() if k != "weight"} == {
        "format": "facefed-head/1",
        "ids": ["p1", "p2"],
        "dim": 128,
        "scale": 32.0,
        "margin": 0.2,
        "seed": 7,
        "probed": False,
    }
    assert state["weight"].dtype == torch.float32 and tuple(state["weight"].shape) == (2, 128)


def test_head_file_from_literal_state_loads(tmp_path):
    weight = torch.nn.functional.normalize(torch.arange(256, dtype=torch.float32).view(2, 128) + 1, dim=1)
    state = {
        "format": "facefed-head/1",
        "ids": ["p1", "p2"],
        "weight": weight,
        "dim": 128,
        "scale": 32.0,
        "margin": 0.2,
        "seed": 7,
        "probed": True,
    }
    torch.save(state, tmp_path / "head.pt")
    head = MarginHead.load(tmp_path / "head.pt")
    assert head.ids == ["p1", "p2"] and head.probed and (head.scale, head.margin, head.seed) == (32.0, 0.2, 7)
    assert torch.equal(head.fc.weight.detach(), weight)


# -- where the site keeps what (client/state.py) ---------------------------------------------------------


def test_site_paths_known_answer(tmp_path):
    site = SiteState.of_node(tmp_path / "vault")
    rel = {k: str(p.relative_to(tmp_path)) for k, p in site.all_paths().items()}
    assert rel == {
        "node_config": "vault/site/node-config.toml",
        "heads": "vault/site/heads",
        "head": "vault/site/head.pt",
        "accountant": "vault/accountant.json",  # one accountant per vault (issue 11), not per state dir
        "contributions": "vault/site/contributions.sqlite",
        "worker_socket": "vault/site/worker.sock",
        "worker_key": "vault/site/worker.key",
        "logs": "vault/site/logs",
        "flwr": "vault/site/flwr",
        "requests": "vault/requests.sqlite",
        "receipts": "vault/receipts",
        "policy": "vault/policy.json",
    }
    assert site.head_path("run-1", 3, 2) == tmp_path / "vault/site/heads/run-1/r0003-a2.pt"
    assert head_name(12, 1) == "r0012-a1.pt"
    assert site.shard_accountant(1, 4).name == "accountant-s1of4.json"
    assert site.shard_accountant(0, 1).name == "accountant.json"
    assert default_node_state(tmp_path) == tmp_path / "site"
    assert default_train_state(tmp_path) == tmp_path / "train-state"
    # The vault's own put consults the same file for tombstones.
    assert tombstones.REQUESTS_NAME == REQUESTS_NAME
