"""Certificates for share holders and the vault that talks to them (mutual TLS), and where they live.

`make_store_certs(out, hosts)` writes one TLS directory for a site:

    out/ca.pem                     the site's store CA certificate (public)
    out/ca.key                     its private key (0600): keep it offline; only needed to add hosts
    out/client.pem, client.key     the vault's client certificate (the site machine's --tls-dir is `out`)
    out/holders/<host>/ca.pem      one bundle per holder host: copy this folder to that host and
    out/holders/<host>/server.pem  pass it as `store serve --tls-dir` (or pass `out` itself with the
    out/holders/<host>/server.key  host name, as tests and single-machine demos do)

A holder serves only clients whose certificate this CA signed; the vault accepts only holders whose
certificate this CA signed for the host name it dials. Running it again with more hosts reuses the CA.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from facefed.client.holder.proto.shares import StoreError
from facefed.common import certs

CA_CERT, CA_KEY = "ca.pem", "ca.key"
CLIENT_CERT, CLIENT_KEY = "client.pem", "client.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
HOLDERS = "holders"
CLIENT_CN = "facefed-vault"

_DNS_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


def check_host(host: str) -> str:
    """A host name or IP address; it names a certificate and a folder, so nothing else passes."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _DNS_RE.match(host):
        raise ValueError(f"invalid holder host {host!r}: expected a DNS name or an IP address")
    return host.lower()


@dataclass(frozen=True)
class ClientTLS:
    """What the vault side loads: PEM bytes for grpc.ssl_channel_credentials."""

    ca: bytes
    cert: bytes
    key: bytes


@dataclass(frozen=True)
class ServerTLS:
    """What a holder loads; `folder` is where it came from (logged, never the key)."""

    ca: bytes
    cert: bytes
    key: bytes
    folder: Path


def _load_ca(out: Path) -> certs.Issued | None:
    ca_pem, ca_key = out / CA_CERT, out / CA_KEY
    if not ca_pem.exists():
        return None
    if not ca_key.exists():
        raise StoreError(
            f"{ca_pem} exists but {ca_key} does not: restore the CA key to add hosts, or use a new --out "
            "folder (then every holder and the vault need the new certificates)"
        )
    return certs.Issued(certs.load_ec_private(ca_key), certs.load_cert(ca_pem))


def make_store_certs(out: str | Path, hosts: list[str], *, ca_name: str = "facefed share-holder CA") -> list[Path]:
    """Create (or extend) a site's store TLS directory; returns the holder bundle folders written."""
    out = Path(out)
    hosts = [check_host(h.strip()) for h in hosts if h.strip()]
    if not hosts:
        raise ValueError("no holder hosts given: pass --hosts h1,h2,h3 (names or IP addresses the vault dials)")
    if len(set(hosts)) != len(hosts):
        raise ValueError(f"holder hosts repeat: {','.join(hosts)}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the TLS certificates (new, or one to extend)")
    out.mkdir(parents=True, exist_ok=True)
    ca = _load_ca(out)
    if ca is None:
        ca = certs.make_ca(ca_name)
        certs.write_private(out / CA_KEY, certs.pem_private(ca.key))
        certs.write_public(out / CA_CERT, certs.pem_cert(ca.cert))
    if not (out / CLIENT_CERT).exists():
        client = certs.issue(ca, CLIENT_CN, server=False, client=True)
        certs.write_private(out / CLIENT_KEY, certs.pem_private(client.key))
        certs.write_public(out / CLIENT_CERT, certs.pem_cert(client.cert))
    written = []
    for host in hosts:
        folder = out / HOLDERS / host
        server = certs.issue(ca, f"facefed-holder {host}", hosts=[host], server=True)
        certs.write_public(folder / CA_CERT, certs.pem_cert(ca.cert))
        certs.write_private(folder / SERVER_KEY, certs.pem_private(server.key))
        certs.write_public(folder / SERVER_CERT, certs.pem_cert(server.cert))
        written.append(folder)
    return written


def _read(path: Path, remedy: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise StoreError(f"{path} is missing: {remedy}") from None
    except OSError as e:
        raise StoreError(f"cannot read {path}: {e.strerror}") from e


def load_client_tls(tls_dir: str | Path | None, url: str) -> ClientTLS:
    if tls_dir is None:
        raise StoreError(
            f"store {url} is a remote share holder and needs a TLS directory: pass --tls-dir DIR "
            "(made by `facefed-client store certs --out DIR --hosts ...`)"
        )
    d = Path(tls_dir)
    remedy = f"make it with `facefed-client store certs --out {d} --hosts ...` or point --tls-dir at that folder"
    return ClientTLS(
        ca=_read(d / CA_CERT, remedy), cert=_read(d / CLIENT_CERT, remedy), key=_read(d / CLIENT_KEY, remedy)
    )


def server_folder(tls_dir: str | Path, host: str | None) -> Path:
    """A holder bundle: `tls_dir` itself if it holds server.pem, else `tls_dir/holders/<host>`."""
    d = Path(tls_dir)
    if (d / SERVER_CERT).exists():
        return d
    holders = d / HOLDERS
    known = sorted(p.name for p in holders.iterdir()) if holders.is_dir() else []
    if host is None or host in ("0.0.0.0", "::"):
        raise StoreError(
            f"{d} has no {SERVER_CERT}; name this holder's certificate with --cert-host "
            f"(one of: {', '.join(known) or 'none made yet'})"
        )
    host = check_host(host)
    if host not in known:
        raise StoreError(
            f"{d} has no certificate for holder host {host} (has: {', '.join(known) or 'none'}); "
            f"run `facefed-client store certs --out {d} --hosts {host}`"
        )
    return holders / host


def load_server_tls(tls_dir: str | Path, host: str | None) -> ServerTLS:
    folder = server_folder(tls_dir, host)
    remedy = f"copy the whole holders/<host>/ folder made by `facefed-client store certs` to {folder}"
    return ServerTLS(
        ca=_read(folder / CA_CERT, remedy),
        cert=_read(folder / SERVER_CERT, remedy),
        key=_read(folder / SERVER_KEY, remedy),
        folder=folder,
    )
