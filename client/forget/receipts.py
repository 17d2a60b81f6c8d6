"""The server's receipt key, pinned at the site, and receipts verified against it before they are kept.

`facefed-client start --receipt-key receipts.pub` (or `facefed-client receipts pin`) copies the server's
Ed25519 public key into the vault (`VAULT/server-receipts.pub`, client/state.py); a different key
later is refused (re-pinning is an explicit `receipts pin --replace`). A receipt the server delivers
is stored only if its signature verifies against the pinned key (client/forget/sync.py); with no
pinned key nothing is stored. `facefed-client receipts verify RECEIPT --vault V` (or `--key PUB`)
checks a stored receipt at the site with nothing but the receipt and that key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from facefed.client.state import server_key_path
from facefed.common.durable import atomic_write_bytes
from facefed.common.errors import FacefedError
from facefed.common.receipts import Receipt, ReceiptError, key_fingerprint, load_public_key, verify_receipt_signature


class KeyPinError(FacefedError, ValueError):
    """No server key is pinned, or another one is; the message says what to do."""


def pin_server_key(vault: Path, pem: bytes, *, replace: bool = False) -> str:
    """Pin the server's receipt key at this vault; returns its fingerprint."""
    key = load_public_key(pem)
    path = server_key_path(vault)
    if path.exists() and not replace:
        old = load_public_key(path.read_bytes())
        if key_fingerprint(old) != key_fingerprint(key):
            raise KeyPinError(
                f"this site pinned server key {key_fingerprint(old)}, not {key_fingerprint(key)}; if the "
                "federation really changed its key, `facefed-client receipts pin --replace`"
            )
        return key_fingerprint(old)
    atomic_write_bytes(path, pem)
    return key_fingerprint(key)


def pinned_key(vault: Path) -> ed25519.Ed25519PublicKey:
    path = server_key_path(vault)
    if not path.exists():
        raise KeyPinError(
            f"no server receipt key is pinned at {vault}; start the node with --receipt-key receipts.pub "
            "(or `facefed-client receipts pin`)"
        )
    return load_public_key(path.read_bytes())


def verify_at_site(doc: Any, vault: Path | None = None, key_pem: bytes | None = None) -> Receipt:
    """A receipt verified against the given key or the vault's pinned one; ReceiptError/KeyPinError otherwise."""
    key = load_public_key(key_pem) if key_pem is not None else pinned_key(Path(vault or "."))
    return verify_receipt_signature(doc, key)


__all__ = ["KeyPinError", "ReceiptError", "pin_server_key", "pinned_key", "verify_at_site"]
