"""Forget receipts at the server: the signing key, issuing a receipt, and checking one against the ledger.

The signing key is the Ed25519 pair `facefed-server certs` writes beside the CA (`receipts.key`,
`receipts.pub`). A server started with `--tls-dir` finds it there; an `--insecure` local server
makes one in `STATE/keys/` on first use. `--receipt-key` overrides both.

`verify_receipt` checks, beyond the signature (common/receipts.py), that the receipt's story is the
ledger's: the request is known with the same site and pseudonym; the model exists with that sha256
and was not deleted; its lineage runs through the rollback checkpoint (of the replay run's base),
which predates the person's first contribution; no checkpoint on that lineage comes from a round in
which the person was present, and every round after the rollback started after their data was
erased (so no later round could have used them); the checkpoints the receipt lists as deleted are
marked deleted in the ledger and their files are gone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from facefed.common import certs as certmod
from facefed.common.receipts import (
    Receipt,
    ReceiptError,
    key_fingerprint,
    load_public_key,
    sign_receipt,
    utc_timestamp,
    verify_receipt_signature,
)
from facefed.server.ledger.db import CheckpointRow, ForgetRow, Ledger, LedgerError
from facefed.server.state import StateDirError, StatePaths

KEY_NAME, PUB_NAME = "receipts.key", "receipts.pub"


def key_paths(paths: StatePaths, explicit: Path | None = None) -> tuple[Path, Path]:
    """(private, public) receipt key files for this server (see the module doc for the order)."""
    if explicit is not None:
        explicit = Path(explicit).expanduser().resolve()
        return explicit, explicit.with_name(PUB_NAME if explicit.name == KEY_NAME else explicit.stem + ".pub")
    try:
        ca = paths.server_info().ca_cert
    except (StateDirError, TypeError, ValueError):
        ca = None
    if ca and (Path(ca).parent / KEY_NAME).is_file():
        return Path(ca).parent / KEY_NAME, Path(ca).parent / PUB_NAME
    return paths.root / "keys" / KEY_NAME, paths.root / "keys" / PUB_NAME


def signing_key(private: Path, public: Path) -> Ed25519PrivateKey:
    """Load the signing key, making a local one if this (insecure, local) server has none yet."""
    if not private.exists():
        private.parent.mkdir(parents=True, exist_ok=True)
        return certmod.make_ed25519(private, public)
    key = certmod.load_private(private)
    from cryptography.hazmat.primitives.asymmetric import ed25519

    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ReceiptError(f"{private} is not an Ed25519 key; make one with `facefed-server certs`")
    return key


def issue(
    req: ForgetRow,
    *,
    replay_run: str,
    rollback: CheckpointRow,
    model: CheckpointRow,
    deleted: list[str],
    key: Ed25519PrivateKey,
    purged_at: float | None = None,
    runs_purged: list[int] | None = None,
) -> dict[str, Any]:
    receipt = Receipt(
        request_id=req.request_id,
        site=req.site,
        person_pseudonym=req.pseudonym,
        received_at=utc_timestamp(req.received_at),
        erased_at=utc_timestamp(req.erased_at),
        shares_destroyed=req.shares_destroyed,
        run_id=replay_run,
        rollback_round=rollback.round,
        replayed_rounds=list(range(rollback.round + 1, model.round + 1)),
        model_id=model.checkpoint_id,
        model_sha256=model.sha256,
        checkpoints_deleted=list(deleted),
        superlink_purged_at=None if purged_at is None else utc_timestamp(purged_at),
        superlink_runs_purged=sorted(runs_purged or []),
        issued_at=utc_timestamp(time.time()),
        server_key_fingerprint=key_fingerprint(key.public_key()),
    )
    return sign_receipt(receipt, key)


@dataclass(frozen=True)
class Check:
    what: str
    ok: bool
    detail: str = ""


def _ts(s: str) -> float:
    import datetime as dt

    return dt.datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC).timestamp()


def verify_receipt(doc: Any, public_pem: bytes, ledger: Ledger) -> tuple[Receipt | None, list[Check]]:
    """(receipt, checks): every check is listed; the receipt holds only if all are ok."""
    checks: list[Check] = []
    try:
        r = verify_receipt_signature(doc, load_public_key(public_pem))
    except ReceiptError as e:
        return None, [Check("signature", False, str(e))]
    checks.append(Check("signature", True, f"Ed25519, key {r.server_key_fingerprint[:23]}..."))

    try:
        req = ledger.request(r.request_id)
        same = (req.site, req.pseudonym) == (r.site, r.person_pseudonym)
        checks.append(
            Check(
                "request in the ledger",
                same,
                "" if same else f"the ledger has site {req.site}, pseudonym {req.pseudonym} for {r.request_id}",
            )
        )
    except LedgerError as e:
        return r, checks + [Check("request in the ledger", False, str(e))]
    erased = _ts(r.erased_at)
    first = {run: min(rounds) for run, rounds in req.contributions.items() if rounds}

    try:
        model = ledger.checkpoint(r.model_id)
        run = ledger.run(r.run_id)
    except LedgerError as e:
        return r, checks + [Check("model in the ledger", False, str(e))]
    ok = model.sha256 == r.model_sha256 and model.deleted_at is None and Path(model.path).is_file()
    checks.append(
        Check(
            "model in the ledger",
            ok,
            f"{model.checkpoint_id} sha256 {model.sha256[:16]}..."
            if ok
            else f"{model.checkpoint_id}: ledger sha256 {model.sha256[:16]}..., deleted "
            f"{model.deleted_at is not None}, file present {Path(model.path).is_file()}",
        )
    )

    lineage = ledger.lineage(model.checkpoint_id)  # newest first
    ids = [c.checkpoint_id for c in lineage]
    if r.replayed_rounds:  # a replay: the rollback is the replay run's base, on the model's lineage
        base = ledger.checkpoint(run.base_checkpoint)
        ok = run.kind == "replay" and base.checkpoint_id in ids and base.round == r.rollback_round
    else:  # no live model had been trained with the person: the model itself is the clean point
        base = model
        ok = model.round == r.rollback_round and model.run_id == r.run_id
    checks.append(
        Check(
            "descends from the rollback checkpoint",
            ok,
            f"{model.checkpoint_id} <- ... <- {base.checkpoint_id} (round {base.round})"
            if ok
            else f"run {r.run_id} (kind {run.kind}) base {base.checkpoint_id} round {base.round} is not on the "
            f"model's lineage at round {r.rollback_round}",
        )
    )
    before = [c for c in lineage[ids.index(base.checkpoint_id) :]] if base.checkpoint_id in ids else lineage
    used = [c.checkpoint_id for c in before if c.round >= first.get(c.run_id or "", 10**9)]
    checks.append(
        Check(
            "rollback predates the person's first contribution",
            not used,
            f"first contribution: {first or 'none recorded'}"
            if not used
            else f"checkpoints from rounds with the person: {used}",
        )
    )
    after = lineage[: ids.index(base.checkpoint_id)] if base.checkpoint_id in ids else []
    late = []
    for c in after:
        rnd = ledger.round_of_checkpoint(c.checkpoint_id)
        if rnd is None or rnd.started_at < erased or c.round >= first.get(c.run_id or "", 10**9):
            late.append(c.checkpoint_id)
    # Later rounds that descend from the model (training went on) must not have used them either.
    for run in ledger.runs():
        if run.run_id == r.run_id:
            for row in ledger.rounds(run.run_id, committed_only=True):
                if row.round > model.round and row.started_at < erased:
                    late.append(row.checkpoint_id or f"{run.run_id} round {row.round}")
    checks.append(
        Check(
            "no round after the rollback could use them",
            not late,
            f"{len(after)} replayed round(s), all started after the erasure at {r.erased_at}"
            if not late
            else f"rounds that started before the erasure or with the person: {late}",
        )
    )
    bad = []
    for cid in r.checkpoints_deleted:
        try:
            c = ledger.checkpoint(cid)
        except LedgerError:
            bad.append(f"{cid} (unknown)")
            continue
        if c.deleted_at is None or Path(c.path).exists():
            bad.append(f"{cid} (deleted_at {c.deleted_at}, file present {Path(c.path).exists()})")
    checks.append(
        Check(
            "listed checkpoints deleted",
            not bad,
            f"{len(r.checkpoints_deleted)} checkpoint(s) deleted, files gone" if not bad else "; ".join(bad),
        )
    )
    return r, checks
