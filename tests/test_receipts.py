"""Receipts: canonical JSON, Ed25519 signature, and every kind of tampering refused."""

from __future__ import annotations

import base64
import copy
import hashlib
import json

import pytest
from cryptography.hazmat.primitives import serialization

from facefed.common.certs import load_private, make_ed25519
from facefed.common.receipts import (
    Receipt,
    ReceiptError,
    canonical_json,
    key_fingerprint,
    load_public_key,
    sign_receipt,
    utc_timestamp,
    verify_receipt_signature,
)


@pytest.fixture()
def server_key(tmp_path):
    make_ed25519(tmp_path / "receipts.key", tmp_path / "receipts.pub")
    # Read back from the files, as the server and a verifier would.
    return load_private(tmp_path / "receipts.key"), load_public_key((tmp_path / "receipts.pub").read_bytes())


def _receipt(public_key, **over) -> Receipt:
    fields = dict(
        request_id="fr-0123456789abcdef",
        site="site-a",
        person_pseudonym="ab" * 16,
        received_at=utc_timestamp(1_790_000_000.25),
        erased_at=utc_timestamp(1_790_000_000.5),
        shares_destroyed=9,
        run_id="run-1",
        rollback_round=1,
        replayed_rounds=[2, 3],
        model_id="run-1-r0003-replay",
        model_sha256=hashlib.sha256(b"model").hexdigest(),
        checkpoints_deleted=["run-1-r0002", "run-1-r0003"],
        issued_at=utc_timestamp(1_790_000_100.0),
        server_key_fingerprint=key_fingerprint(public_key),
    )
    fields.update(over)
    return Receipt(**fields)


def test_signed_receipt_verifies_after_a_round_trip_through_a_file(server_key, tmp_path):
    priv, pub = server_key
    signed = sign_receipt(_receipt(pub), priv)
    path = tmp_path / "fr-0123456789abcdef.json"
    path.write_text(json.dumps(signed, indent=2))  # pretty-printed on disk: the signature covers canonical form
    back = verify_receipt_signature(json.loads(path.read_text()), pub)
    assert back.request_id == "fr-0123456789abcdef" and back.replayed_rounds == [2, 3]
    assert (
        canonical_json(signed["receipt"])
        == json.dumps(signed["receipt"], sort_keys=True, separators=(",", ":")).encode()
    )
    assert b" " not in canonical_json(signed["receipt"])


def _mutations(body: dict):
    """One changed copy per field (and a few structural edits)."""
    for key, value in body.items():
        doc = copy.deepcopy(body)
        if isinstance(value, bool):
            raise AssertionError(key)
        if value is None:  # an optional claim added (superlink_purged_at)
            doc[key] = "2024-01-01T00:00:00.000000Z"
        elif isinstance(value, int):
            doc[key] = value + 1
        elif isinstance(value, list):
            doc[key] = value[:-1] if value else ([1] if key in ("replayed_rounds", "superlink_runs_purged") else ["x"])
        elif key.endswith("_at"):
            doc[key] = value[:-7] + "000001Z"
        elif key in ("model_sha256",):
            doc[key] = ("0" if value[0] != "0" else "1") + value[1:]
        elif key == "person_pseudonym":
            doc[key] = "cd" * 16
        elif key == "server_key_fingerprint":
            doc[key] = "SHA256:" + "0" * 64
        elif key == "request_id":
            doc[key] = "fr-fedcba9876543210"
        else:
            doc[key] = value + "x"
        assert doc[key] != value, key
        yield key, doc
    extra = copy.deepcopy(body)
    extra["note"] = "added"
    yield "extra key", extra
    missing = copy.deepcopy(body)
    del missing["checkpoints_deleted"]
    yield "missing key", missing


def test_any_changed_field_fails(server_key):
    priv, pub = server_key
    signed = sign_receipt(_receipt(pub), priv)
    tried = 0
    for what, body in _mutations(signed["receipt"]):
        doc = {**signed, "receipt": body}
        # A well-formed edit must be caught by the signature itself, not only by the schema.
        expect = {
            "format": "format",
            "extra key": "note",
            "missing key": "checkpoints_deleted",
            "server_key_fingerprint": "names server key",
        }.get(what, "signature does not match")
        with pytest.raises(ReceiptError, match=expect):
            verify_receipt_signature(doc, pub)
        tried += 1
    assert tried == len(Receipt.model_fields) + 2
    verify_receipt_signature(signed, pub)  # the original still verifies


def test_signature_of_another_key_fails(server_key, tmp_path):
    priv, pub = server_key
    other = make_ed25519(tmp_path / "other.key", tmp_path / "other.pub")
    # Signed by another key that claims to be the server: fingerprint mismatch.
    forged = sign_receipt(_receipt(other.public_key()), other)
    with pytest.raises(ReceiptError, match="names server key"):
        verify_receipt_signature(forged, pub)
    # Another key's signature pasted onto a receipt that names the right key: signature mismatch.
    genuine = sign_receipt(_receipt(pub), priv)
    body = genuine["receipt"]
    pasted = {**genuine, "signature": base64.b64encode(other.sign(canonical_json(body))).decode()}
    with pytest.raises(ReceiptError, match="signature does not match"):
        verify_receipt_signature(pasted, pub)


def test_damaged_signature_and_wrong_shapes_fail(server_key):
    priv, pub = server_key
    signed = sign_receipt(_receipt(pub), priv)
    sig = bytearray(base64.b64decode(signed["signature"]))
    sig[0] ^= 1
    with pytest.raises(ReceiptError, match="signature does not match"):
        verify_receipt_signature({**signed, "signature": base64.b64encode(bytes(sig)).decode()}, pub)
    with pytest.raises(ReceiptError, match="64 bytes"):
        verify_receipt_signature({**signed, "signature": "not base64!"}, pub)
    with pytest.raises(ReceiptError, match="algorithm"):
        verify_receipt_signature({**signed, "algorithm": "rsa"}, pub)
    with pytest.raises(ReceiptError, match="expected keys"):
        verify_receipt_signature(signed["receipt"], pub)
    # A respelled but equal value (an int written as a float) is not the signed document.
    respelled = {**signed, "receipt": {**signed["receipt"], "shares_destroyed": 9.0}}
    with pytest.raises(ReceiptError):
        verify_receipt_signature(respelled, pub)


def test_receipt_model_refuses_bad_content(server_key):
    priv, pub = server_key
    with pytest.raises(ValueError):
        _receipt(pub, person_pseudonym="Aaron_Peirsol")  # a name is not a pseudonym
    with pytest.raises(ValueError):
        _receipt(pub, replayed_rounds=[3, 2])
    with pytest.raises(ValueError):
        _receipt(pub, unknown_field=1)
    with pytest.raises(ReceiptError, match="being signed with"):
        sign_receipt(_receipt(pub, server_key_fingerprint="SHA256:" + "1" * 64), priv)
    der = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert key_fingerprint(pub) == "SHA256:" + hashlib.sha256(der).hexdigest()
