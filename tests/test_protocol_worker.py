"""Issue 11 item 10: the worker socket and the forget messages are typed, strict and size-bounded,
validated at both ends (common/protocol/worker.py, common/protocol/forget.py)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from facefed.client.site.round import Site
from facefed.client.site.worker import answer_call
from facefed.common.protocol.forget import BudgetAnswer, Delivery, QueryOrder
from facefed.common.protocol.worker import QueryCall, Refused, WorkerAnswer, WorkerCall


def test_worker_messages_refuse_what_they_do_not_know():
    ok = WorkerCall(call=QueryCall(order=QueryOrder()))
    assert WorkerCall.model_validate_json(ok.model_dump_json()) == ok
    for bad in (
        '{"call": {"kind": "exec", "order": {}}}',  # an unknown call
        '{"call": {"kind": "query", "order": {}}, "extra": 1}',  # an unknown key
        '{"call": {"kind": "query", "order": {"deliver": "x"}}}',  # a mistyped field
    ):
        with pytest.raises(ValidationError):
            WorkerCall.model_validate_json(bad)
    with pytest.raises(ValidationError):  # a refusal's reason is bounded, its kind closed
        WorkerAnswer(answer=Refused(refusal="crash", reason="x" * 1001))
    with pytest.raises(ValidationError):
        WorkerAnswer.model_validate_json('{"answer": {"kind": "refused", "refusal": "other", "reason": ""}}')


def test_the_worker_answers_garbage_with_a_refusal_never_a_crash(tmp_path):
    site = Site(name="north", state=tmp_path / "state", vault=tmp_path / "vault", pretrained=tmp_path / "w", threads=1)
    answer, tail = answer_call(site, b"\x80\x04not json, maybe pickle", b"")
    assert isinstance(answer.answer, Refused) and answer.answer.refusal == "config" and tail == b""
    answer, _ = answer_call(site, b'{"call": {"kind": "train", "order": {"round": "1"}}}', b"\0" * 8)
    assert isinstance(answer.answer, Refused) and "malformed worker call" in answer.answer.reason


def test_forget_messages_are_strict_and_bounded():
    with pytest.raises(ValidationError):  # no coercion of "1" to 1
        QueryOrder.model_validate_json('{"drop_heads": [{"run_id": "r", "from_round": "1"}]}')
    receipt = {"algorithm": "ed25519", "receipt": {"pad": "x" * 70_000}, "signature": ""}
    with pytest.raises(ValidationError, match="at most"):
        Delivery(
            request_id="fr-" + "0" * 16,
            run_id="r",
            round=1,
            checkpoint_id="c",
            checkpoint_sha256="0" * 64,
            receipt=receipt,
        )
    with pytest.raises(ValidationError):
        BudgetAnswer(
            fits=True, unit="person", delta=1e-5, epsilon_now=0, epsilon_planned=0, max_epsilon=1, detail="x" * 2001
        )
