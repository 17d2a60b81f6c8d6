"""Share holders over gRPC with mutual TLS: protocol, certificates, refusals, index, faults.

Holders here run in-process (a real gRPC server on a real socket, real TLS, real files); the
end-to-end test with holder processes in their own network namespaces and a real vault is
tests/test_remote_store_e2e.py.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from typer.testing import CliRunner

from facefed.client.cli.main import app as client_app
from facefed.client.holder import proto
from facefed.client.holder.disk import ShareDir
from facefed.client.holder.service import start_holder
from facefed.client.holder.tls import make_store_certs
from facefed.client.vault.stores import ShareNotFound, Store, StoreError, StoreUnavailable, open_store
from facefed.client.vault.stores.grpc import GrpcStore, RemotePolicy, parse_url
from facefed.common import certs

LOOPBACK = "127.0.0.1"


def _sid(i: int) -> str:
    return f"{i:032x}"


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tls")
    make_store_certs(out, [LOOPBACK])
    return out


@pytest.fixture(scope="module")
def foreign_tls(tmp_path_factory, tls) -> Path:
    """Certificates from another CA: an outsider who trusts the site's (public) CA certificate, so
    the handshake reaches the holder's check, but whose client certificate the site never signed."""
    out = tmp_path_factory.mktemp("foreign-tls")
    make_store_certs(out, [LOOPBACK], ca_name="someone else's CA")
    (out / "ca.pem").write_bytes((tls / "ca.pem").read_bytes())
    return out


def _wait_for(cond, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.fixture
def holder(tmp_path, tls):
    (tmp_path / "h").mkdir()
    h = start_holder(tmp_path / "h", f"{LOOPBACK}:0", tls)
    yield h
    h.stop(0)


@pytest.fixture(scope="module")
def face_bytes(lfw) -> list[bytes]:
    """Real LFW JPEG bytes stand in for share payloads: varied sizes, incompressible."""
    names = sorted(n for n, c in lfw.counts().items() if c >= 4)[:5]
    keys = [k for n in names for k in lfw.keys(n)[:4]]
    return list(lfw.load_images(keys).values())


def _url(h) -> str:
    return f"grpcs://{LOOPBACK}:{h.port}"


def test_runtime_messages_match_the_proto_file(tmp_path):
    """holder.proto is the spec; the descriptors built at run time must be exactly what protoc makes."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    proto_dir = Path(proto.__file__).parent
    out = tmp_path / "holder.pb"
    assert (
        protoc.main(["protoc", f"-I{proto_dir}", f"--descriptor_set_out={out}", str(proto_dir / "holder.proto")]) == 0
    )
    compiled = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    assert compiled == proto.file_descriptor()


def test_certs_cli_layout_modes_and_ca_reuse(tmp_path):
    runner = CliRunner()
    out = tmp_path / "tls"
    r = runner.invoke(client_app, ["store", "certs", "--out", str(out), "--hosts", "10.0.0.5,holder-b.site"])
    assert r.exit_code == 0, r.output
    for name in ("ca.pem", "ca.key", "client.pem", "client.key"):
        assert (out / name).is_file()
    for host in ("10.0.0.5", "holder-b.site"):
        for name in ("ca.pem", "server.pem", "server.key"):
            assert (out / "holders" / host / name).is_file()
        assert stat.S_IMODE((out / "holders" / host / "server.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "client.key").stat().st_mode) == 0o600

    ca = certs.load_cert(out / "ca.pem")
    server = certs.load_cert(out / "holders" / "10.0.0.5" / "server.pem")
    assert server.issuer == ca.subject
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    ca.public_key().verify(server.signature, server.tbs_certificate_bytes, server.signature_algorithm_parameters)

    # Adding a host later keeps the CA and the vault's client certificate: existing holders still trust it.
    ca_before, client_before = (out / "ca.pem").read_bytes(), (out / "client.pem").read_bytes()
    r = runner.invoke(client_app, ["store", "certs", "--out", str(out), "--hosts", "10.0.0.6"])
    assert r.exit_code == 0, r.output
    assert (out / "ca.pem").read_bytes() == ca_before and (out / "client.pem").read_bytes() == client_before
    assert certs.load_cert(out / "holders" / "10.0.0.6" / "server.pem").issuer == ca.subject


@pytest.mark.parametrize("hosts", ["../../etc", "a/b", "", "bad host", "-x"])
def test_certs_cli_refuses_bad_hosts(tmp_path, hosts):
    r = CliRunner().invoke(client_app, ["store", "certs", "--out", str(tmp_path / "t"), "--hosts", hosts])
    assert r.exit_code == 2
    assert "host" in r.output
    assert not (tmp_path / "t" / "holders").exists() or not any((tmp_path / "t" / "holders").iterdir())
    assert not (tmp_path / "etc").exists()


def test_round_trip_of_real_images_and_store_protocol(holder, tls, face_bytes):
    store = open_store(_url(holder), tls_dir=tls)
    assert isinstance(store, GrpcStore) and isinstance(store, Store)
    store.check()
    ids = [_sid(i + 1) for i in range(len(face_bytes))]
    for sid, data in zip(ids, face_bytes):
        store.put(sid, data)
    for sid, data in zip(ids, face_bytes):
        assert store.get(sid) == data
    assert sorted(store.list()) == sorted(ids)
    st = store.stat()
    assert (st.url, st.shares, st.bytes, st.writable) == (_url(holder), len(ids), sum(map(len, face_bytes)), True)
    # the bytes on the holder's disk are exactly what was sent, under the opaque id only
    on_disk = holder.store.root / "shares" / ids[0][:2] / ids[0]
    assert on_disk.read_bytes() == face_bytes[0]

    store.put(ids[0], face_bytes[1])  # overwrite is allowed
    assert store.get(ids[0]) == face_bytes[1]
    assert store.delete(ids[0]) is True
    assert store.delete(ids[0]) is False  # idempotent
    assert not on_disk.exists()
    with pytest.raises(ShareNotFound):
        store.get(ids[0])
    assert store.stat().shares == len(ids) - 1
    store.close()


def test_list_pages_through_many_ids(holder, tls, monkeypatch):
    import facefed.client.vault.stores.grpc as remote

    monkeypatch.setattr(remote, "LIST_PAGE", 7)  # many pages from few shares
    store = GrpcStore(_url(holder), tls_dir=tls)
    ids = [_sid(i) for i in range(1, 51)]
    with ThreadPoolExecutor(4) as ex:
        list(ex.map(lambda s: store.put(s, b"x"), ids))
    listed = list(store.list())
    assert listed == sorted(ids)  # in order, each id once, across 8 pages
    store.close()


def test_concurrent_use_of_one_store_from_many_threads(holder, tls, face_bytes):
    store = GrpcStore(_url(holder), tls_dir=tls)
    items = {_sid(1000 + i): face_bytes[i % len(face_bytes)] + bytes([i % 251]) for i in range(200)}
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda kv: store.put(*kv), items.items()))
        got = dict(zip(items, ex.map(store.get, items)))
    assert got == items
    store.close()


@pytest.mark.parametrize("bad", ["../../etc/passwd", "ab/cd" * 8, "/abs" + "0" * 30, "..", "A" * 32, "0" * 32 + "\x00"])
def test_share_id_with_path_characters_is_refused_by_client_and_holder(holder, tls, bad, tmp_path):
    store = GrpcStore(_url(holder), tls_dir=tls)
    for op in (
        lambda: store.get(bad),
        lambda: store.put(bad, b"x"),
        lambda: store.delete(bad),
        lambda: store.put_many([(_sid(1), b"ok"), (bad, b"x")]),
        lambda: store.get_many([bad]),
    ):
        with pytest.raises(ValueError, match="share id"):
            op()
    store.close()
    # A hand-made request that skips the client's check: the holder refuses it too and writes nothing.
    t = tls
    creds = grpc.ssl_channel_credentials(
        (t / "ca.pem").read_bytes(), (t / "client.key").read_bytes(), (t / "client.pem").read_bytes()
    )
    with grpc.secure_channel(f"{LOOPBACK}:{holder.port}", creds) as ch:
        for rpc, req in (
            ("Put", proto.PutRequest(share_id=bad, data=b"evil")),
            ("Get", proto.GetRequest(share_id=bad)),
            ("Delete", proto.DeleteRequest(share_id=bad)),
            ("GetMany", proto.GetManyRequest(share_ids=[_sid(1), bad])),
            # a batch with one bad id is refused whole: not even the good share is written
            (
                "PutMany",
                proto.PutManyRequest(
                    shares=[
                        proto.PutRequest(share_id=_sid(1), data=b"ok"),
                        proto.PutRequest(share_id=bad, data=b"evil"),
                    ]
                ),
            ),
        ):
            call = ch.unary_unary(
                proto.method_path(rpc),
                request_serializer=type(req).SerializeToString,
                response_deserializer=lambda b: b,
            )
            with pytest.raises(grpc.RpcError) as ei:
                call(req, timeout=5)
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    written = [
        p
        for p in holder.store.root.rglob("*")
        if p.is_file() and p.name != "index.sqlite" and "index.sqlite" not in p.name
    ]
    assert written == []
    assert holder.store.stat().shares == 0


def test_client_with_certificate_from_another_ca_is_refused_and_logged(holder, tls, foreign_tls, caplog):
    caplog.set_level(logging.INFO, logger="facefed.holder")
    outsider = GrpcStore(_url(holder), tls_dir=foreign_tls, policy=RemotePolicy(read_attempts=1, write_attempts=1))
    with pytest.raises(StoreUnavailable, match=_url(holder)):
        outsider.get(_sid(1))
    outsider.close()

    def refused_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused client")]

    _wait_for(refused_lines, "the holder logged no refusal")
    refused = refused_lines()
    assert refused[0].startswith(f"refused client {LOOPBACK}:")  # who: the peer's address and port
    assert "certificate not from this site's store CA" in refused[0]
    assert holder.front.accepted == 0 and holder.front.refused >= 1

    # The site's own vault is served, and logged with its certificate subject.
    insider = GrpcStore(_url(holder), tls_dir=tls)
    insider.put(_sid(1), b"ok")
    assert insider.get(_sid(1)) == b"ok"
    insider.close()
    assert any("accepted client" in r.getMessage() and "facefed-vault" in r.getMessage() for r in caplog.records)
    assert "PRIVATE KEY" not in caplog.text


def test_client_without_certificate_is_refused(holder, tls, caplog):
    caplog.set_level(logging.INFO, logger="facefed.holder")
    creds = grpc.ssl_channel_credentials((tls / "ca.pem").read_bytes())  # server auth only, no client cert
    with grpc.secure_channel(f"{LOOPBACK}:{holder.port}", creds) as ch:
        call = ch.unary_unary(
            proto.method_path("Stat"),
            request_serializer=proto.StatRequest.SerializeToString,
            response_deserializer=proto.StatReply.FromString,
        )
        with pytest.raises(grpc.RpcError) as ei:
            call(proto.StatRequest(), timeout=5)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
    _wait_for(
        lambda: any(
            r.getMessage().startswith(f"refused client {LOOPBACK}:") and "no client certificate" in r.getMessage()
            for r in caplog.records
        ),
        f"no refusal logged: {caplog.text}",
    )


def test_vault_refuses_a_holder_with_a_foreign_certificate(tmp_path, tls, foreign_tls):
    """Server authentication: a look-alike holder with another CA's certificate gets no shares."""
    (tmp_path / "h").mkdir()
    impostor = start_holder(tmp_path / "h", f"{LOOPBACK}:0", foreign_tls)
    try:
        store = GrpcStore(_url(impostor), tls_dir=tls, policy=RemotePolicy(read_attempts=1, write_attempts=1))
        with pytest.raises(StoreUnavailable):
            store.put(_sid(7), b"secret share")
        store.close()
        assert impostor.store.stat().shares == 0
    finally:
        impostor.stop(0)


def test_index_survives_restart_and_settles_an_interrupted_write_without_a_scan(tmp_path, tls, face_bytes):
    d = tmp_path / "h"
    d.mkdir()
    h = start_holder(d, f"{LOOPBACK}:0", tls)
    store = GrpcStore(_url(h), tls_dir=tls)
    ids = [_sid(i + 1) for i in range(6)]
    for sid, data in zip(ids, face_bytes):
        store.put(sid, data)
    store.close()
    h.stop(0)

    # Simulate a crash: a put that committed its pending row but died before the rename (no file),
    # a put that died after the rename (file present, row still pending), and a stray temp file.
    done_late = _sid(100)
    (d / "shares" / done_late[:2]).mkdir(exist_ok=True)
    (d / "shares" / done_late[:2] / done_late).write_bytes(face_bytes[0])
    db = sqlite3.connect(d / "index.sqlite")
    db.execute("INSERT INTO shares (id, size, pending) VALUES (?, 5, 1)", (_sid(99),))
    db.execute("INSERT INTO shares (id, size, pending) VALUES (?, 1, 1)", (done_late,))
    db.commit()
    db.close()
    (d / "tmp" / f"{_sid(98)}.123").write_bytes(b"half a share")
    # A file the index does not know: list and stat come from the index, not from a directory scan.
    stray = _sid(97)
    (d / "shares" / stray[:2]).mkdir(exist_ok=True)
    (d / "shares" / stray[:2] / stray).write_bytes(b"unindexed")

    sd = ShareDir(d)
    assert sd.recovered == 2
    assert sorted(sd.iter_ids()) == sorted(ids + [done_late])
    st = sd.stat()
    assert st.shares == 7 and st.bytes == sum(map(len, face_bytes[:6])) + len(face_bytes[0])
    assert list((d / "tmp").iterdir()) == []
    sd.close()


def test_dead_holder_fails_fast_and_is_used_again_when_back(tmp_path, tls):
    d = tmp_path / "h"
    d.mkdir()
    h = start_holder(d, f"{LOOPBACK}:0", tls)
    port = h.port
    store = GrpcStore(_url(h), tls_dir=tls)
    store.put(_sid(1), b"share")
    h.stop(0)

    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match=f"{LOOPBACK}:{port}"):
        store.get(_sid(1))
    first = time.monotonic() - t0
    assert first < 3.0  # bounded retries, not a connection stall
    t0 = time.monotonic()
    for _ in range(20):
        with pytest.raises(StoreUnavailable):
            store.get(_sid(1))
    assert time.monotonic() - t0 < 1.5  # known down: the vault's reads move on at once

    h2 = start_holder(d, f"{LOOPBACK}:{port}", tls)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                assert store.get(_sid(1)) == b"share"
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "holder back but not used again within 10 s"
                time.sleep(0.1)
    finally:
        store.close()
        h2.stop(0)


def test_oversized_share_is_refused_and_nothing_is_kept(tmp_path, tls):
    d = tmp_path / "h"
    d.mkdir()
    h = start_holder(d, f"{LOOPBACK}:0", tls, max_share_bytes=64 * 1024)
    store = GrpcStore(_url(h), tls_dir=tls)
    try:
        with pytest.raises(ValueError, match="at most 65536"):
            store.put(_sid(1), os.urandom(100 * 1024))  # within the message limit: the holder says why
        with pytest.raises(StoreError, match="RESOURCE_EXHAUSTED"):
            store.put(_sid(2), os.urandom(1024 * 1024))  # past the message limit: gRPC drops it unread
        assert store.stat().shares == 0
        assert list(store.list()) == []
    finally:
        store.close()
        h.stop(0)


@pytest.mark.parametrize(
    "url", ["grpc://h:1", "grpcs://h", "grpcs://h:0", "grpcs://h:99999", "grpcs://u@h:1", "grpcs://h:1/x", "grpcs://:1"]
)
def test_bad_urls_are_refused(url, tls):
    with pytest.raises(ValueError, match="URL"):
        GrpcStore(url, tls_dir=tls)
    with pytest.raises(ValueError, match="URL"):
        parse_url(url)


def test_remote_store_without_tls_dir_names_the_remedy(tmp_path):
    with pytest.raises(StoreError, match="--tls-dir"):
        GrpcStore("grpcs://127.0.0.1:7001")
    with pytest.raises(StoreError, match="client.pem is missing"):
        (tmp_path / "t").mkdir()
        (tmp_path / "t" / "ca.pem").write_text("x")
        GrpcStore("grpcs://127.0.0.1:7001", tls_dir=tmp_path / "t")


def test_serve_cli_errors_name_the_problem(tmp_path, tls):
    runner = CliRunner()
    r = runner.invoke(
        client_app,
        ["store", "serve", "--dir", str(tmp_path / "missing"), "--listen", "127.0.0.1:0", "--tls-dir", str(tls)],
    )
    assert r.exit_code == 2 and "does not exist" in r.output
    (tmp_path / "d").mkdir()
    r = runner.invoke(
        client_app, ["store", "serve", "--dir", str(tmp_path / "d"), "--listen", "10.9.9.9:7001", "--tls-dir", str(tls)]
    )
    assert r.exit_code == 2 and "no certificate for holder host 10.9.9.9" in r.output
    r = runner.invoke(
        client_app, ["store", "serve", "--dir", str(tmp_path / "d"), "--listen", "nonsense", "--tls-dir", str(tls)]
    )
    assert r.exit_code == 2 and "HOST:PORT" in r.output


def test_silent_holder_costs_one_deadline_then_fails_at_once(tls):
    """A host that accepts TCP but never answers (hung, or a black hole): no long stall per read."""
    import socket

    silent = socket.socket()
    silent.bind((LOOPBACK, 0))
    silent.listen(8)  # the kernel completes TCP handshakes; nobody ever reads
    port = silent.getsockname()[1]
    store = GrpcStore(
        f"grpcs://{LOOPBACK}:{port}", tls_dir=tls, policy=RemotePolicy(read_timeout_s=0.3, read_attempts=2)
    )
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable, match=f"{LOOPBACK}:{port}"):
            store.get(_sid(1))
        assert time.monotonic() - t0 < 1.5  # two 0.3 s attempts and a backoff, not gRPC's 20 s connect timeout
        t0 = time.monotonic()
        for _ in range(50):
            with pytest.raises(StoreUnavailable):
                store.get(_sid(1))
        assert time.monotonic() - t0 < 1.5  # probes are rationed; the other calls do not wait
    finally:
        store.close()
        silent.close()


def test_get_many_returns_found_shares_across_reply_size_limits(tmp_path, tls, face_bytes):
    """Batched reads: missing ids are left out, and a reply larger than the holder allows is split
    into several round trips without losing or reordering anything."""
    d = tmp_path / "h"
    d.mkdir()
    limit = max(map(len, face_bytes)) + 1  # a reply carries about one image's worth of share bytes
    h = start_holder(d, f"{LOOPBACK}:0", tls, max_share_bytes=limit)
    store = GrpcStore(_url(h), tls_dir=tls)
    try:
        ids = [_sid(i + 1) for i in range(len(face_bytes))]
        store.put_many(list(zip(ids, face_bytes)))
        absent = [_sid(500), _sid(501)]
        got = store.get_many(absent[:1] + ids + absent[1:])
        assert got == dict(zip(ids, face_bytes))
        assert store.get_many([]) == {}
        with pytest.raises(ValueError, match="share id"):
            store.get_many([ids[0], "../x"])
    finally:
        store.close()
        h.stop(0)


def test_concurrent_gets_are_coalesced_into_fewer_requests(holder, tls, face_bytes, monkeypatch):
    store = GrpcStore(_url(holder), tls_dir=tls)
    ids = [_sid(2000 + i) for i in range(64)]
    store.put_many([(sid, face_bytes[i % len(face_bytes)]) for i, sid in enumerate(ids)])
    requests = []
    real = store._get_many

    def counting(batch):
        requests.append(len(batch))
        return real(batch)

    monkeypatch.setattr(store, "_get_many", counting)
    with ThreadPoolExecutor(16) as ex:
        got = list(ex.map(store.get, ids))
    assert got == [face_bytes[i % len(face_bytes)] for i in range(64)]
    assert sum(requests) == 64 and len(requests) < 64  # some gets shared a round trip
    with pytest.raises(ShareNotFound):
        store.get(_sid(9999))
    store.close()
