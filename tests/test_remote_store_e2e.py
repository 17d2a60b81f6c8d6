"""A vault over three share holders on three "hosts": real `facefed-client store serve` processes,
each in its own network namespace with its own address when this machine lets the test create
namespaces (root, `ip netns`), else on separate 127.0.0.1 ports. Real LFW images go in; a holder
is killed (by PID) and everything still reads back; an erase while it is down stays pending and
completes when it returns; a holder that alters bytes is caught by the share tag; a client with a
certificate from another CA is refused and the holder logs who.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from vault_support import fresh_jpeg

from facefed.client.holder.procs import HolderProcess, start_all
from facefed.client.holder.tls import make_store_certs
from facefed.client.vault.errors import VaultError
from facefed.client.vault.stores.base import IDENTITY_ID, StoreError, StoreUnavailable
from facefed.client.vault.stores.grpc import GrpcStore, RemotePolicy
from facefed.client.vault.vault import Vault

pytestmark = pytest.mark.slow

PORT = 7001


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


@dataclass
class Net:
    """Three namespaces, each joined to the test's namespace by a veth pair on its own /30."""

    names: list[str]
    holder_addrs: list[str]
    host_addrs: list[str]

    def close(self) -> None:
        for ns in self.names:
            _ip("netns", "del", ns)  # deleting the namespace deletes its veth end, hence the pair


def _make_net(tag: str) -> Net | None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return None
    third = 100 + os.getpid() % 150  # 10.200.<third>.0/24, four /30 links per test run
    used = _ip("-4", "addr").stdout
    if f"10.200.{third}." in used:
        return None
    net = Net([], [], [])
    try:
        for i in range(3):
            ns, host_if, ns_if = f"ffh{tag}{i}", f"ffh{tag}{i}a", f"ffh{tag}{i}b"
            host_ip, ns_ip = f"10.200.{third}.{4 * i + 1}", f"10.200.{third}.{4 * i + 2}"
            steps = [
                ["netns", "add", ns],
                ["link", "add", host_if, "type", "veth", "peer", "name", ns_if],
                ["link", "set", ns_if, "netns", ns],
                ["addr", "add", f"{host_ip}/30", "dev", host_if],
                ["link", "set", host_if, "up"],
                ["netns", "exec", ns, "ip", "addr", "add", f"{ns_ip}/30", "dev", ns_if],
                ["netns", "exec", ns, "ip", "link", "set", ns_if, "up"],
                ["netns", "exec", ns, "ip", "link", "set", "lo", "up"],
            ]
            for step in steps:
                r = _ip(*step)
                if step[:2] == ["netns", "add"] and r.returncode == 0:
                    net.names.append(ns)
                if r.returncode != 0:
                    _ip("link", "del", host_if)
                    raise OSError(f"ip {' '.join(step)}: {r.stderr.strip()}")
            net.holder_addrs.append(ns_ip)
            net.host_addrs.append(host_ip)
    except OSError:
        net.close()
        return None
    return net


@dataclass
class Site:
    """Where holders run: three addresses (namespaces or loopback), and the site's TLS folder."""

    addrs: list[str]
    ports: list[int]
    netns: list[str | None]
    tls: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    net = _make_net(f"{os.getpid() % 10000:04d}")
    if net is not None:
        s = Site(net.holder_addrs, [PORT] * 3, list(net.names), tmp_path_factory.mktemp("tls"))
    else:
        s = Site(["127.0.0.1"] * 3, [0, 0, 0], [None] * 3, tmp_path_factory.mktemp("tls"))
    make_store_certs(s.tls, sorted(set(s.addrs)))
    try:
        yield s
    finally:
        if net is not None:
            net.close()


@pytest.fixture(scope="module")
def holders(site, tmp_path_factory):
    """Three holder processes, one per address, started together; shared by this module's tests
    (the vault story runs last: it kills and restarts them)."""
    base = tmp_path_factory.mktemp("holders")
    procs = []
    for i, (addr, port, ns) in enumerate(zip(site.addrs, site.ports, site.netns)):
        d = base / f"holder{i + 1}"
        d.mkdir()
        procs.append(HolderProcess(d, addr, port, site.tls, base / f"holder{i + 1}.log", netns=ns))
    start_all(procs)
    try:
        yield procs
    finally:
        for h in procs:
            h.stop()


@pytest.fixture(scope="module")
def people(lfw) -> dict[str, list[bytes]]:
    """Six real people with three LFW images each (early in the archive: one short read)."""
    names = sorted(n for n, c in lfw.counts().items() if c >= 3)[:6]
    keys = {n: lfw.keys(n)[:3] for n in names}
    images = lfw.load_images([k for ks in keys.values() for k in ks])
    return {n: [images[k] for k in ks] for n, ks in keys.items()}


def _share_files(h: HolderProcess) -> list[Path]:
    """The holder's share files, less the vault's store identity record (IDENTITY_ID)."""
    return sorted(p for p in (h.directory / "shares").rglob("*") if p.is_file() and p.name != IDENTITY_ID)


def _share_count(h: HolderProcess) -> int:
    return len(_share_files(h))


def test_holders_run_in_their_own_namespaces(site, holders):
    if site.netns[0] is None:
        pytest.skip("no network namespaces here (needs root and `ip netns`); holders share 127.0.0.1")
    for h in holders:
        inode = os.stat(f"/proc/{h.pid}/ns/net").st_ino
        assert inode != os.stat("/proc/self/ns/net").st_ino
        assert (Path("/run/netns") / h.netns).stat().st_ino == inode
    assert len({h.host for h in holders}) == 3


def test_client_with_certificate_from_another_ca_is_refused_and_the_holder_logs_who(site, holders, tmp_path):
    """A client with a certificate from another CA gets nothing and the holder logs who it was."""
    h = holders[1]
    outsider_tls = tmp_path / "outsider"
    make_store_certs(outsider_tls, ["127.0.0.1"], ca_name="outsider CA")
    (outsider_tls / "ca.pem").write_bytes((site.tls / "ca.pem").read_bytes())  # trusts the site; not trusted
    outsider = GrpcStore(h.url, tls_dir=outsider_tls, policy=RemotePolicy(read_attempts=1, write_attempts=1))
    with pytest.raises(StoreUnavailable):
        outsider.stat()
    with pytest.raises(StoreUnavailable):
        outsider.put("ab" * 16, b"planted")
    outsider.close()
    assert not (h.directory / "shares" / "ab" / ("ab" * 16)).exists()

    deadline = time.monotonic() + 10
    while "refused client" not in h.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    refused = [line for line in h.log().splitlines() if "refused client" in line]
    assert refused, h.log()
    # who: the address the outsider came from (the test's end of the veth link, or loopback)
    expected_from = "10.200." if site.netns[0] else "127.0.0.1:"
    assert expected_from in refused[-1] and "certificate not from this site's store CA" in refused[-1]
    assert "PRIVATE KEY" not in h.log()

    # the site's own vault client is still served
    insider = GrpcStore(h.url, tls_dir=site.tls)
    assert insider.stat().writable
    insider.close()


def test_vault_over_three_holders_survives_a_dead_one_and_finishes_a_pending_erase(site, holders, people, tmp_path):
    h1, h2, h3 = holders
    vault = Vault.create(tmp_path / "vault", [h.url for h in holders], 2, tls_dir=site.tls)
    ids: dict[str, list[str]] = {}
    for person, images in people.items():
        ids[person] = [vault.put(person, img) for img in images]
    n_images = sum(map(len, people.values()))
    assert [_share_count(h) for h in holders] == [n_images] * 3

    # One holder dies (SIGKILL by its PID): every image still reads back, byte for byte, from the other two.
    h3.kill()
    t0 = time.monotonic()
    got = {image_id: data for _, image_id, data in vault.iter_images()}
    assert time.monotonic() - t0 < 30
    for person, images in people.items():
        assert [got[i] for i in ids[person]] == images

    # A write needs all n holders: it fails clearly and leaves no half-written image behind.
    newcomer = fresh_jpeg(next(iter(people.values()))[0])  # bytes the vault has not seen
    with pytest.raises((StoreError, VaultError), match=h3.url):
        vault.put("newcomer", newcomer)
    assert [_share_count(h1), _share_count(h2)] == [n_images, n_images]
    assert "newcomer" not in {p.person_id for p in vault.people()}

    # Erase while it is down: destroyed on the live holders (already unrecoverable), pending for h3.
    victim = sorted(people)[0]
    report = vault.erase(victim)
    n_victim = len(people[victim])
    assert report.shares_destroyed == 2 * n_victim and report.shares_pending == n_victim
    assert report.unreachable_stores == [h3.url] and report.unrecoverable
    assert [_share_count(h1), _share_count(h2)] == [n_images - n_victim] * 2
    vault.close()

    # It comes back (same directory, same address): opening the vault finishes the erase there.
    h3.start()
    with Vault.open(tmp_path / "vault") as vault:
        assert _share_count(h3) == n_images - n_victim
        rep = vault.verify()
        assert rep.pending_deletions == 0 and not rep.orphans and not rep.missing and rep.ok, rep
        assert any(e.get("event") == "erase_resumed" for e in vault.audit_entries())

        # Holder 2 alters one share on its disk (a malicious or failing host): the tag catches it.
        person = sorted(people)[1]
        image_id = ids[person][0]
        target = _share_files(h2)[0]
        raw = bytearray(target.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        target.write_bytes(bytes(raw))
        assert {i: d for _, i, d in vault.iter_images()} == {
            i: d for p, imgs in people.items() if p != victim for i, d in zip(ids[p], imgs)
        }
        rep = vault.verify()
        assert [(p.x, p.problem) for p in rep.corrupt] == [(2, "corrupt")]
        assert len(vault.repair().regenerated) == 1 and vault.verify().ok
        assert vault.get(image_id) == people[person][0]

        # and h3 serves the remaining images: read them with h1 down
        h1.kill()
        remaining = {i: d for _, i, d in vault.iter_images()}
        assert len(remaining) == n_images - n_victim
        for person, images in people.items():
            if person != victim:
                assert [remaining[i] for i in ids[person]] == images
