"""Forget receipts: the signed statement that a person's data was erased and the model unlearned them.

The server signs a receipt with its Ed25519 key (`facefed-server certs`); the site stores it and shows
it in `facefed-client forget status`. This module is the pure document + signature part; checking the
lineage against the server's ledger lives in server/forget/receipts.py.

A signed receipt on disk is `{"algorithm": "ed25519", "receipt": {...}, "signature": "<base64>"}`.
The signature covers the canonical JSON of `receipt` (sorted keys, no whitespace, UTF-8). Verification
recomputes those bytes from the document *as received* and also requires that the document is exactly
what the model would write (no extra or missing key, no alternative spelling of a value): otherwise
two different byte strings could claim the same receipt.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import re
from typing import Annotated, Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from facefed.common.errors import FacefedError

RECEIPT_FORMAT = "facefed-receipt/2"
ALGORITHM = "ed25519"
_TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")

Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Ident = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$")]
Timestamp = Annotated[str, Field(pattern=_TIME_RE.pattern)]


class ReceiptError(FacefedError, ValueError):
    """A receipt that is malformed, tampered with, or signed by another key; the message says which."""


def utc_timestamp(t: float | dt.datetime | None = None) -> str:
    """The one spelling of a time in a receipt: UTC, microseconds, `Z` (e.g. 2026-11-23T17:00:00.000000Z)."""
    if t is None:
        t = dt.datetime.now(dt.UTC)
    elif isinstance(t, (int, float)):
        t = dt.datetime.fromtimestamp(float(t), dt.UTC)
    elif t.tzinfo is None:
        raise ReceiptError(f"time {t!r} has no timezone; give an aware datetime or epoch seconds")
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Receipt(BaseModel):
    """What the receipt states. The person appears only as the site's vault pseudonym."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    # /2 adds what was purged from the SuperLink's database; a /1 receipt (without them) still verifies.
    format: Literal["facefed-receipt/1", "facefed-receipt/2"] = "facefed-receipt/2"  # RECEIPT_FORMAT
    request_id: Annotated[str, Field(pattern=r"^fr-[0-9a-f]{16}$")]
    site: Ident
    person_pseudonym: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
    received_at: Timestamp
    erased_at: Timestamp
    shares_destroyed: Annotated[int, Field(ge=0)]
    run_id: Ident
    rollback_round: Annotated[int, Field(ge=0)]  # the checkpoint the replay started from (0: the base model)
    replayed_rounds: list[Annotated[int, Field(ge=1)]]
    model_id: Ident  # the first model that excludes the person
    model_sha256: Hex64
    checkpoints_deleted: list[Ident]
    # The Flower runs that released the deleted checkpoints (site updates, models sent out), cleaned
    # from the SuperLink's database, which was then vacuumed and its WAL truncated (server/ops/linkd.py)
    # at this time, before signing. None / []: no SuperLink database (a simulation), or the purge
    # did not complete in time.
    superlink_purged_at: Timestamp | None = None
    superlink_runs_purged: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list)
    issued_at: Timestamp
    server_key_fingerprint: Annotated[str, Field(pattern=r"^SHA256:[0-9a-f]{64}$")]

    @field_validator("replayed_rounds")
    @classmethod
    def _increasing(cls, rounds: list[int]) -> list[int]:
        if any(b <= a for a, b in zip(rounds, rounds[1:])):
            raise ValueError("replayed_rounds must be strictly increasing")
        return rounds


def canonical_json(doc: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the exact bytes that are signed."""
    try:
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
            "utf-8"
        )
    except (TypeError, ValueError) as e:
        raise ReceiptError(f"receipt is not plain JSON data ({e})") from None


def key_fingerprint(public_key: ed25519.Ed25519PublicKey) -> str:
    """`SHA256:<hex>` of the DER SubjectPublicKeyInfo (as common/nodekeys.py does for node keys)."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "SHA256:" + hashlib.sha256(der).hexdigest()


def sign_receipt(receipt: Receipt, private_key: ed25519.Ed25519PrivateKey) -> dict[str, Any]:
    """The signed document; refuses a receipt that names another key than the one signing it."""
    if not isinstance(private_key, ed25519.Ed25519PrivateKey):
        raise ReceiptError(
            f"receipts are signed with an Ed25519 key, got {type(private_key).__name__}; "
            f"make one with `facefed-server certs`"
        )
    fp = key_fingerprint(private_key.public_key())
    if receipt.server_key_fingerprint != fp:
        raise ReceiptError(
            f"receipt names server key {receipt.server_key_fingerprint} but is being signed "
            f"with {fp}; set server_key_fingerprint from the signing key"
        )
    body = receipt.model_dump(mode="json")
    signature = private_key.sign(canonical_json(body))
    return {"algorithm": ALGORITHM, "receipt": body, "signature": base64.b64encode(signature).decode("ascii")}


def verify_receipt_signature(doc: Any, public_key: ed25519.Ed25519PublicKey) -> Receipt:
    """The receipt, if `doc` is a well-formed receipt signed by `public_key`; ReceiptError otherwise."""
    if not isinstance(public_key, ed25519.Ed25519PublicKey):
        raise ReceiptError(f"expected the server's Ed25519 public key, got {type(public_key).__name__}")
    if not isinstance(doc, dict) or set(doc) != {"algorithm", "receipt", "signature"}:
        keys = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise ReceiptError(f"not a signed receipt: expected keys algorithm, receipt, signature; got {keys}")
    if doc["algorithm"] != ALGORITHM:
        raise ReceiptError(f"receipt algorithm {doc['algorithm']!r} is not supported (only {ALGORITHM})")
    body = doc["receipt"]
    try:
        receipt = Receipt.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "receipt"
        raise ReceiptError(f"receipt field `{where}`: {first['msg']} (receipt damaged or tampered with)") from None
    if receipt.model_dump(mode="json", exclude_unset=True) != body:  # every field of `body` is set
        raise ReceiptError("receipt is not in canonical form (a value was respelled); tampered with")
    sig = doc["signature"]
    try:
        raw = base64.b64decode(sig, validate=True) if isinstance(sig, str) else b""
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 64:
        raise ReceiptError("receipt signature is not a base64 Ed25519 signature (64 bytes)")
    fp = key_fingerprint(public_key)
    if receipt.server_key_fingerprint != fp:
        raise ReceiptError(
            f"receipt {receipt.request_id} names server key {receipt.server_key_fingerprint}, "
            f"not the key given ({fp}); verify with the key that signed it"
        )
    try:
        public_key.verify(raw, canonical_json(body))
    except InvalidSignature:
        raise ReceiptError(
            f"receipt {receipt.request_id}: signature does not match its content "
            f"(tampered with, or not signed by server key {fp})"
        ) from None
    return receipt


def load_public_key(pem: bytes) -> ed25519.Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as e:
        raise ReceiptError(f"not a PEM public key ({e})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ReceiptError(f"receipt key must be Ed25519, got {type(key).__name__}")
    return key
