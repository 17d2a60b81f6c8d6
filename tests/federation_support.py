"""Helpers for the federation tests.

`LocalGrid` is a Flower `Grid` that delivers messages to in-process sites instead of SuperNodes: it
stands in for Flower's transport only, so the round logic (`server.rounds.RoundRunner`), the averager,
the ledger and the checkpoints run for real, with real tensors, SQLite and files, and the timing cases
(a site that never answers, one that answers late, a crash between checkpoint and ledger) are quick
and deterministic. The end-to-end tests run the same code through real SuperLink/SuperNode processes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from facefed.common.config import validate_config
from facefed.common.fedconfig import FederationConfig
from facefed.common.protocol.forget import REPLY_KEY, QueryReply
from facefed.common.protocol.tail import NAMES, SHAPES, TAIL, pack, unpack

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the e2e tests drive demo/federation.py's harness
    sys.path.insert(0, str(ROOT))

# A site's behaviour: (message content) -> reply content, or None to never answer.
SiteFn = Callable[[RecordDict], RecordDict | None]


# What a site does to the tail it received: (tensors, the order's config record) -> tensors.
Change = Callable[[dict[str, np.ndarray], ConfigRecord], dict[str, np.ndarray]]


# The small federation the Coordinator tests drive through LocalGrid: two short rounds, fast timeouts.
TRAIN = {"privacy_unit": "person", "delta": 1e-5, "noise_multiplier": 1.0, "sample_rate": 0.5, "steps": 2}


def make_config(**over) -> FederationConfig:
    data = {
        "rounds": 2,
        "min_sites": 2,
        "round_timeout_s": 2.0,
        "wait_for_sites_s": 0.0,
        "max_round_attempts": 1,
        "evaluate": {"every": 0},
        "train": dict(TRAIN),
    }
    data.update(over)
    return validate_config(data, FederationConfig)


def shifted_site(
    name: str,
    shift: float,
    people: int,
    *,
    extra: dict[str, np.ndarray] | None = None,
    change: Change | None = None,
) -> SiteFn:
    """A site that returns the received tail plus `shift`, then `change`d (e.g. per round), and
    optionally extra arrays, with metrics."""

    def fn(content: RecordDict) -> RecordDict:
        cfg = content["config"]
        tensors = unpack(content["backbone"][TAIL].numpy(), list(cfg[NAMES]), list(cfg[SHAPES]))
        tensors = {k: v + np.float32(shift) for k, v in tensors.items()}
        tensors = (change(tensors, cfg) if change else tensors) | dict(extra or {})
        flat, names, shapes = pack(tensors)
        metrics = MetricRecord(
            {
                "num-people": people,
                "steps": 5,
                "epsilon": 0.5 * content["config"]["round"],
                "delta": 1e-5,
            }
        )
        return RecordDict(
            {
                "backbone": ArrayRecord({TAIL: Array(flat)}),
                "metrics": metrics,
                "site": ConfigRecord(
                    {"name": name, "unit": "person", "accountant": "rdp", NAMES: names, SHAPES: shapes}
                ),
            }
        )

    fn.site_name = name  # answers `query` messages with no forget requests
    return fn


def query_reply(fn: SiteFn, content: RecordDict) -> RecordDict | None:
    """A site's answer to a `query`: its own handler if it has one, else no requests (if it has a
    name; a nameless, silent site does not answer)."""
    if hasattr(fn, "query"):
        return fn.query(content)
    if not hasattr(fn, "site_name"):
        return None
    return RecordDict({"config": ConfigRecord({REPLY_KEY: QueryReply(site=fn.site_name).model_dump_json()})})


@dataclass
class LocalGrid(Grid):
    sites: dict[int, tuple[str, SiteFn]]  # node id -> (registered name or "", behaviour)
    run_id: int = 4242
    public_keys: dict[int, bytes] = field(default_factory=dict)
    pushed: list[Message] = field(default_factory=list)

    def __post_init__(self) -> None:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = self.run_id, 0, 1
        self._run = Run.create_empty(self.run_id)
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.sites)

    def get_nodes(self) -> Iterable[NodeInfo]:
        return [
            NodeInfo(node_id=n, name=name, public_key=self.public_keys.get(n, b""))
            for n, (name, _) in self.sites.items()
        ]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            self.pushed.append(msg)
            _, fn = self.sites[msg.metadata.dst_node_id]
            content = (
                query_reply(fn, msg.content) if msg.metadata.message_type == MessageType.QUERY else fn(msg.content)
            )
            if content is not None:
                reply = Message(content, reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
                self._replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(m) for m in list(message_ids) if m in self._replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))
