"""Exact unlearning at the server: requests in, rollback + replay, deletion, receipts, budget refusal.

The Coordinator, ledger, checkpoints and receipts run for real (real tensors, SQLite, files, Ed25519);
Flower's transport is `LocalGrid` and the sites are deterministic stand-ins that answer `query` the
way client/forget/sync.py does (its own behaviour is tested on a real vault in test_forget_sync.py;
the whole path over real processes in test_federation_forget.py).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from federation_support import LocalGrid, shifted_site
from flwr.app import ConfigRecord, RecordDict
from test_federation_rounds import coordinator, make_config

from facefed.common.protocol.forget import ORDER_KEY, REPLY_KEY, BudgetAnswer, PendingRequest, QueryOrder, QueryReply
from facefed.server.app import Coordinator, RunFailed
from facefed.server.forget.receipts import key_paths, verify_receipt
from facefed.server.forget.unlearn import plan_replays
from facefed.server.ledger.db import ForgetRow, Ledger
from facefed.server.ops.submission import Submission
from facefed.server.rounds import RoundRunner

PSEUDONYM = "0123456789abcdef0123456789abcdef"


class QuerySite:
    """A site stand-in for `query`: reports `pending` (until a receipt for it arrives), keeps what it gets."""

    def __init__(self, name: str, fits: bool = True):
        self.name, self.fits = name, fits
        self.pending: list[PendingRequest] = []
        self.orders: list[QueryOrder] = []
        self.receipts: dict[str, dict] = {}
        self.later: tuple[int, PendingRequest] | None = None  # (n, request): reported from the n-th query on

    def __call__(self, content: RecordDict) -> RecordDict:
        order = QueryOrder.model_validate_json(str(content["config"][ORDER_KEY]))
        self.orders.append(order)
        if self.later and len(self.orders) == self.later[0]:
            self.pending.append(self.later[1])
        for d in order.deliver:
            self.receipts[d.request_id] = d.receipt
        self.pending = [p for p in self.pending if p.request_id not in self.receipts]
        budget = None
        if order.budget:
            budget = BudgetAnswer(
                fits=self.fits,
                unit="person",
                delta=1e-5,
                epsilon_now=3.0,
                epsilon_planned=9.5 if not self.fits else 5.0,
                max_epsilon=8.0,
                detail="" if self.fits else "would reach 9.500 > max_epsilon 8",
            )
        reply = QueryReply(
            site=self.name, pending=self.pending, stored=[d.request_id for d in order.deliver], budget=budget
        )
        return RecordDict({"config": ConfigRecord({REPLY_KEY: reply.model_dump_json()})})


def request(rounds: dict[str, list[int]], rid: str = "fr-00000000000000aa") -> PendingRequest:
    return PendingRequest(
        request_id=rid,
        pseudonym=PSEUDONYM,
        received_at=1.7e9,
        erased_at=1.7e9 + 0.2,
        shares_destroyed=9,
        contributions=rounds,
    )


def sites(alpha_query: QuerySite) -> LocalGrid:
    alpha = shifted_site("alpha", 0.1, 2)
    alpha.query = alpha_query
    return LocalGrid({1: ("", alpha), 2: ("", shifted_site("beta", 0.2, 3))})


def unlearner(state, grid, pretrained_file) -> Coordinator:
    sub = Submission(
        name="sub-unlearn",
        run_id="",
        resume=False,
        config=None,
        lfw=None,
        pretrained=str(pretrained_file),
        mode="unlearn",
        wait_s=0.0,
    )
    return Coordinator(grid, state, sub, log=lambda _m: None)


def test_request_replays_from_before_first_round_and_receipt_verifies(state, pretrained_file, tmp_path):
    q = QuerySite("alpha")
    grid = sites(q)
    coordinator(state, grid, make_config(rounds=3), pretrained_file).run()
    q.pending = [request({"t-run": [2, 3]})]
    unlearner(state, grid, pretrained_file).run()

    with Ledger(state.ledger) as ledger:
        assert ledger.run("t-run").status == "superseded"
        replay = ledger.run("t-run-u1")
        assert (replay.kind, replay.parent_run_id, replay.base_checkpoint, replay.status) == (
            "replay",
            "t-run",
            "t-run-r0001",
            "completed",
        )
        assert [r.round for r in ledger.rounds("t-run-u1", committed_only=True)] == [2, 3]
        for cid in ("t-run-r0002", "t-run-r0003"):  # carried the person: deleted, and said so
            c = ledger.checkpoint(cid)
            assert c.deleted_at is not None and "fr-00000000000000aa" in c.deleted_reason
            assert not Path(c.path).exists()
        assert Path(ledger.checkpoint("t-run-r0001").path).exists()  # before them: kept
        req = ledger.request("fr-00000000000000aa")
        assert req.status == "unlearned" and req.model_checkpoint == "t-run-u1-r0003" and req.delivered_at
        assert req.checkpoints_deleted == ["t-run-r0002", "t-run-r0003"]
        # The site got its receipt and the order to drop its head files of the replaced rounds.
        assert set(q.receipts) == {"fr-00000000000000aa"}
        assert any(d.run_id == "t-run" and d.from_round == 2 for d in q.orders[-1].drop_heads)

        doc = q.receipts["fr-00000000000000aa"]
        body = doc["receipt"]
        assert (body["rollback_round"], body["replayed_rounds"], body["run_id"]) == (1, [2, 3], "t-run-u1")
        assert body["person_pseudonym"] == PSEUDONYM and body["site"] == "alpha"
        pub = key_paths(state)[1].read_bytes()
        receipt, checks = verify_receipt(doc, pub, ledger)
        assert all(c.ok for c in checks), checks

        tampered = copy.deepcopy(doc)
        tampered["receipt"]["rollback_round"] = 2
        _, checks = verify_receipt(tampered, pub, ledger)
        assert not checks[0].ok and "signature" in checks[0].detail

    # Training goes on from the replayed state: the same config resumes... nothing (it completed),
    # and a second query delivers nothing new and replays nothing.
    unlearner(state, grid, pretrained_file).run()
    with Ledger(state.ledger) as ledger:
        assert [r.run_id for r in ledger.runs()] == ["t-run", "t-run-u1"]


def test_lineage_check_catches_a_model_trained_with_the_person(state, pretrained_file):
    """A correctly signed receipt whose story the ledger contradicts fails verification."""
    q = QuerySite("alpha")
    grid = sites(q)
    coordinator(state, grid, make_config(rounds=2), pretrained_file).run()
    q.pending = [request({"t-run": [2]})]
    unlearner(state, grid, pretrained_file).run()
    doc = q.receipts["fr-00000000000000aa"]
    with Ledger(state.ledger) as ledger:
        # The site now says (another report) the person was also in round 1: the replay's base is tainted.
        ledger.report_request(
            ForgetRow(
                request_id="fr-00000000000000aa",
                site="alpha",
                pseudonym=PSEUDONYM,
                received_at=1.7e9,
                erased_at=1.7e9 + 0.2,
                shares_destroyed=9,
                contributions={"t-run": [1]},
            )
        )
        _, checks = verify_receipt(doc, key_paths(state)[1].read_bytes(), ledger)
        bad = [c for c in checks if not c.ok]
        assert [c.what for c in bad] == ["rollback predates the person's first contribution"]
        assert ledger.request("fr-00000000000000aa").status == "pending"  # and it will be replayed again


def test_request_between_rounds_replaces_the_running_run(state, pretrained_file):
    q = QuerySite("alpha")
    grid = sites(q)
    q.later = (3, request({"t-run": [2]}))  # queries: before round 1, after round 1, after round 2 <- here
    coordinator(state, grid, make_config(rounds=3), pretrained_file).run()
    with Ledger(state.ledger) as ledger:
        assert ledger.run("t-run").status == "superseded"
        replay = ledger.run("t-run-u1")
        assert replay.status == "completed" and replay.base_checkpoint == "t-run-r0001"
        assert [r.round for r in ledger.rounds("t-run-u1", committed_only=True)] == [2, 3]
        assert [r.round for r in ledger.rounds("t-run", committed_only=True)] == [1, 2]  # round 3 never ran on it
        assert ledger.request("fr-00000000000000aa").model_checkpoint == "t-run-u1-r0002"


def test_replay_over_budget_is_refused_and_training_stops(state, pretrained_file):
    q = QuerySite("alpha", fits=False)
    grid = sites(q)
    coordinator(state, grid, make_config(rounds=2), pretrained_file).run()
    q.pending = [request({"t-run": [1]})]
    unlearner(state, grid, pretrained_file).run()
    with Ledger(state.ledger) as ledger:
        req = ledger.request("fr-00000000000000aa")
        assert req.status == "refused" and "site alpha: would reach 9.500 > max_epsilon 8" in req.detail
        assert ledger.run("t-run").status == "completed" and len(ledger.runs()) == 1  # nothing replayed
        assert all(c.deleted_at is None for c in map(ledger.checkpoint, ["t-run-r0001", "t-run-r0002"]))
    # Training does not go on from the tainted model: resuming the run fails and says why.
    with Ledger(state.ledger) as ledger:
        ledger.set_run_status("t-run", "stopped")  # as if it had rounds to go
    with pytest.raises(RunFailed, match="refused"):
        coordinator(state, grid, make_config(rounds=2), pretrained_file, resume=True).run()


def test_plan_picks_the_newest_clean_checkpoint_and_groups_requests(state, pretrained_file):
    q = QuerySite("alpha")
    grid = sites(q)
    coordinator(state, grid, make_config(rounds=3), pretrained_file).run()
    with Ledger(state.ledger) as ledger:
        a = ForgetRow("fr-000000000000000a", "alpha", PSEUDONYM, 1.0, 2.0, 3, {"t-run": [3]})
        b = ForgetRow("fr-000000000000000b", "beta", PSEUDONYM, 1.0, 2.0, 3, {"t-run": [2, 3]})
        other = ForgetRow("fr-000000000000000c", "beta", PSEUDONYM, 1.0, 2.0, 3, {"another-run": [1]})
        (plan,) = plan_replays(ledger, [a, b, other])
        assert plan.rollback.checkpoint_id == "t-run-r0001" and plan.rounds == [2, 3]
        assert [r.request_id for r in plan.requests] == [a.request_id, b.request_id]
        (plan,) = plan_replays(ledger, [a])
        assert plan.rollback.checkpoint_id == "t-run-r0002" and plan.rounds == [3]
        assert plan_replays(ledger, [other]) == []


def test_interrupted_replay_resumes_and_finishes(state, pretrained_file):
    """A replay cut short (here: a site gone mid-replay, so a round cannot commit) stays tied to its
    requests; the next `unlearn` resumes it from its last committed round, not from scratch."""
    q = QuerySite("alpha")
    beta = shifted_site("beta", 0.2, 3)
    down = {"on": False}

    def flaky_beta(content):
        return None if down["on"] else beta(content)

    flaky_beta.site_name = "beta"
    alpha = shifted_site("alpha", 0.1, 2)
    alpha.query = q
    grid = LocalGrid({1: ("", alpha), 2: ("", flaky_beta)})
    coordinator(state, grid, make_config(rounds=3), pretrained_file).run()
    q.pending = [request({"t-run": [2]})]

    original_round = RoundRunner.round

    def round_then_drop(self, ctx, rnd, attempt, model, parent, prefix):
        out = original_round(self, ctx, rnd, attempt, model, parent, prefix)
        if ctx.run_id == "t-run-u1" and rnd == 2:
            down["on"] = True  # beta goes away after the replay's first round
        return out

    RoundRunner.round = round_then_drop
    try:
        with pytest.raises(RunFailed, match="round 3 failed"):
            unlearner(state, grid, pretrained_file).run()
    finally:
        RoundRunner.round = original_round
    with Ledger(state.ledger) as ledger:
        assert ledger.run("t-run-u1").status == "stopped"
        assert [r.round for r in ledger.rounds("t-run-u1", committed_only=True)] == [2]
        assert ledger.request("fr-00000000000000aa").status == "replaying"
        assert ledger.checkpoint("t-run-r0003").deleted_at is None  # not before the replay is done

    down["on"] = False
    unlearner(state, grid, pretrained_file).run()
    with Ledger(state.ledger) as ledger:
        assert [r.round for r in ledger.rounds("t-run-u1", committed_only=True)] == [2, 3]
        assert ledger.rounds("t-run-u1")[0].attempt == 1  # round 2 was not redone
        assert ledger.run("t-run-u1").status == "completed"
        assert ledger.request("fr-00000000000000aa").status == "unlearned"
        assert ledger.checkpoint("t-run-r0003").deleted_at is not None
    assert "fr-00000000000000aa" in q.receipts


def test_request_for_someone_no_live_model_saw_gets_a_receipt_without_replay(state, pretrained_file):
    """Enrolled but never trained on (or only in replaced runs): the current model already excludes
    them; the receipt names it, replays nothing, and verifies."""
    q = QuerySite("alpha")
    grid = sites(q)
    coordinator(state, grid, make_config(rounds=2), pretrained_file).run()
    q.pending = [request({"an-old-replaced-run": [1]})]
    unlearner(state, grid, pretrained_file).run()
    doc = q.receipts["fr-00000000000000aa"]
    assert (doc["receipt"]["replayed_rounds"], doc["receipt"]["model_id"], doc["receipt"]["rollback_round"]) == (
        [],
        "t-run-r0002",
        2,
    )
    with Ledger(state.ledger) as ledger:
        assert [r.run_id for r in ledger.runs()] == ["t-run"]  # nothing replayed
        _, checks = verify_receipt(doc, key_paths(state)[1].read_bytes(), ledger)
        assert all(c.ok for c in checks), checks
