"""Node authentication keys: what a site makes with `facefed-client keygen` and the operator registers.

Flower 1.41 authenticates a SuperNode by an EC key on a NIST curve: the SuperNode reads its private
key in OpenSSH format (`--auth-supernode-private-key`), and `flwr supernode register` reads the
public key in OpenSSH format (`ecdsa-sha2-nistp384 AAAA...`). The SuperLink stores the public key as
PEM SubjectPublicKeyInfo, so a fingerprint is taken over the DER SubjectPublicKeyInfo: the same
value whichever encoding the key arrived in. Both sides (site and server) print it so the two
operators can compare it out of band before registering.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from facefed.common.certs import write_private, write_public
from facefed.common.errors import FacefedError

CURVE = ec.SECP384R1()
PRIVATE_NAME = "node.key"
PUBLIC_NAME = "node.pub"
# Site names become ledger keys, node names in Flower and file names: keep them plain.
SITE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class NodeKeyError(FacefedError, ValueError):
    """A node key file that is missing or not an EC key on a NIST curve; the message names the file."""


@dataclass(frozen=True)
class NodeKeyPair:
    private_path: Path
    public_path: Path
    fingerprint: str


def check_site_name(name: str) -> str:
    if not isinstance(name, str) or not SITE_NAME_RE.match(name):
        raise ValueError(
            f"invalid site name {name!r}: use 1-63 letters, digits, '_', '.', '-', starting with a letter or digit"
        )
    return name


def fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """`SHA256:<hex>` of the DER SubjectPublicKeyInfo."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "SHA256:" + hashlib.sha256(der).hexdigest()


def fingerprint_pem(pem: bytes) -> str:
    """Fingerprint of a PEM public key, as the SuperLink reports it (NodeInfo.public_key)."""
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise NodeKeyError("public key is not an EC key")
    return fingerprint(key)


def make_node_keys(out: Path) -> NodeKeyPair:
    """A fresh P-384 pair: `node.key` (OpenSSH private, 0600) and `node.pub` (OpenSSH public)."""
    out = Path(out)
    priv_path, pub_path = out / PRIVATE_NAME, out / PUBLIC_NAME
    if priv_path.exists():
        raise FileExistsError(
            f"{priv_path} already exists; refusing to overwrite a node key "
            f"(remove it first if you really mean to replace this site's identity)"
        )
    key = ec.generate_private_key(CURVE)
    write_private(
        priv_path,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    write_public(
        pub_path,
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n",
    )
    return NodeKeyPair(priv_path, pub_path, fingerprint(key.public_key()))


def load_public(path: Path) -> ec.EllipticCurvePublicKey:
    """An OpenSSH (or PEM) EC public key on a NIST curve, as `flwr supernode register` accepts."""
    path = Path(path)
    if not path.is_file():
        raise NodeKeyError(f"public key file {path} does not exist")
    data = path.read_bytes()
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_ssh_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise NodeKeyError(f"{path}: not a public key ({e}); make one with `facefed-client keygen`") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise NodeKeyError(
            f"{path}: node keys must be EC keys on a NIST curve (P-384 from "
            f"`facefed-client keygen`), got {type(key).__name__}"
        )
    return key


def load_private(path: Path) -> ec.EllipticCurvePrivateKey:
    """The OpenSSH-format private key the SuperNode signs with; checked here for a clear message."""
    path = Path(path)
    if not path.is_file():
        raise NodeKeyError(f"node key file {path} does not exist; make one with `facefed-client keygen --out DIR`")
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise NodeKeyError(
            f"{path}: not an unencrypted OpenSSH private key ({e}); make one with `facefed-client keygen`"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise NodeKeyError(f"{path}: node keys must be EC keys on a NIST curve, got {type(key).__name__}")
    return key


def openssh_public(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
