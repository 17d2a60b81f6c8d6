"""`facefed-server certs` and `facefed-client keygen`: the files, their modes, and that Flower accepts them."""

from __future__ import annotations

import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from typer.testing import CliRunner

from facefed.client.cli.main import app as client_app
from facefed.common.nodekeys import NodeKeyError, fingerprint, fingerprint_pem, load_public
from facefed.server.cli.main import app as server_app

runner = CliRunner()


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_certs_make_a_ca_signed_server_certificate(tmp_path):
    out = tmp_path / "tls"
    res = runner.invoke(server_app, ["certs", "--out", str(out), "--host", "server.example"])
    assert res.exit_code == 0, res.output
    for secret in ("ca.key", "server.key", "receipts.key"):
        assert mode(out / secret) == 0o600
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    leaf = x509.load_pem_x509_certificate((out / "server.crt").read_bytes())
    leaf.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "server.example" in san.get_values_for_type(x509.DNSName)
    assert any(str(ip) == "127.0.0.1" for ip in san.get_values_for_type(x509.IPAddress))
    key = serialization.load_pem_private_key((out / "receipts.key").read_bytes(), None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)

    again = runner.invoke(server_app, ["certs", "--out", str(out)])
    assert again.exit_code != 0 and "--force" in again.output
    assert runner.invoke(server_app, ["certs", "--out", str(out), "--force"]).exit_code == 0
    assert x509.load_pem_x509_certificate((out / "ca.crt").read_bytes()) != ca


def test_keygen_makes_keys_flower_accepts(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key

    res = runner.invoke(client_app, ["keygen", "--out", str(tmp_path / "k")])
    assert res.exit_code == 0, res.output
    priv_path, pub_path = tmp_path / "k" / "node.key", tmp_path / "k" / "node.pub"
    assert mode(priv_path) == 0o600
    # What flower-supernode does with --auth-supernode-private-key:
    priv = serialization.load_ssh_private_key(priv_path.read_bytes(), None)
    assert isinstance(priv, ec.EllipticCurvePrivateKey) and priv.curve.name == "secp384r1"
    # What `flwr supernode register` does with the public key (PEM bytes the SuperLink stores):
    pem = try_load_public_key(pub_path)
    assert fingerprint_pem(pem) == fingerprint(priv.public_key()) == fingerprint(load_public(pub_path))
    assert fingerprint(priv.public_key()) in res.output  # printed for the out-of-band check

    again = runner.invoke(client_app, ["keygen", "--out", str(tmp_path / "k")])
    assert again.exit_code != 0 and "refusing to overwrite" in again.output


def test_keys_that_flower_would_reject_are_refused_with_a_reason(tmp_path):
    other = tmp_path / "ed.pub"
    other.write_bytes(
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    with pytest.raises(NodeKeyError, match="EC keys on a NIST curve"):
        load_public(other)
    garbage = tmp_path / "junk.pub"
    garbage.write_text("not a key")
    with pytest.raises(NodeKeyError, match="facefed-client keygen"):
        load_public(garbage)
    with pytest.raises(NodeKeyError, match="does not exist"):
        load_public(tmp_path / "missing.pub")
