"""Fault injection: the vault's invariants, checked after every step of random operation sequences.

Invariants (issue 12):
  (a) every committed, non-erased image reads back exactly, from any k stores;
  (b) no erased person is listed or readable, and no share of theirs exists in any store;
  (c) no plain image bytes exist anywhere on disk (vault directory or stores);
  (d) `verify` reports exactly the damage injected (and nothing once it is repaired).

`VaultMachine` is a hypothesis state machine (a failure prints the shrunk step list that reproduces
it): puts, erases, forget, repairs, concurrent puts and erases from threads, damaged and deleted
shares, swapped stores, an emptied manifest, a store taken offline. The SIGKILL campaign runs the
mutations in child processes, kills them at a random point (seed printed), and checks the same
invariants on the reopened vault.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from vault_support import fresh_jpeg, header_fields, load_faces, make_stores, offline, share_files

from facefed.client.forget.erase import run_forget
from facefed.client.vault import InvalidConfig, Vault, VaultError
from facefed.client.vault.errors import StoreError
from facefed.common.shamir import Share, combine

REPO = Path(__file__).resolve().parents[1]
N, K = 3, 2


@pytest.fixture(scope="module")
def faces(lfw):
    return load_faces(lfw, 12)


class Model:
    """What the vault must hold: image id -> (person, bytes); erased pseudonyms."""

    def __init__(self) -> None:
        self.images: dict[str, tuple[str, bytes]] = {}
        self.erased: dict[str, str] = {}  # pseudonym -> person id

    def of(self, person: str) -> list[str]:
        return [i for i, (p, _) in self.images.items() if p == person]


def check_invariants(root: Path, stores: list[str], model: Model, *, damaged: frozenset = frozenset()) -> None:
    """`damaged`: the (image id, x) shares that were damaged on purpose (and not repaired yet)."""
    with Vault.open(root / "vault") as v:
        listed = {p.person_id: p.n_images for p in v.people()}
        expected: dict[str, int] = {}
        for p, _ in model.images.values():
            expected[p] = expected.get(p, 0) + 1
        assert listed == expected, (listed, expected)
        keys = v._core.keys
        # (a) exact bytes, from every choice of k stores
        for image_id, (_, data) in model.images.items():
            assert v.get(image_id) == data
        by_image: dict[str, dict[int, bytes]] = {}
        for x, s in enumerate(stores, start=1):
            for f in share_files(s):
                blob = f.read_bytes()
                by_image.setdefault(header_fields(blob)["image_id"], {})[x] = blob
        for image_id, (_, data) in model.images.items():
            shares = {x: b for x, b in by_image.get(image_id, {}).items() if (image_id, x) not in damaged}
            for xs in itertools.combinations(sorted(shares), K):
                parts = [Share(x, bytes(shares[x][60:-32])) for x in xs]
                secret = combine(parts)
                size = int.from_bytes(secret[:4], "big")
                assert secret[4 : 4 + size] == data, f"image {image_id} from stores {xs}"
        # (b) erased people: not listed, no share by owner tag
        dead_owners = {keys.owner(ps) for ps in model.erased}
        for s in stores:
            for f in share_files(s):
                assert header_fields(f.read_bytes())["owner"] not in dead_owners, f"share of an erased person in {s}"
        for person in model.erased.values():
            if person not in expected:
                assert person not in listed
        # (d) verify: exactly the damage injected
        report = v.verify()
        found = {(p.image_id, p.x) for p in report.missing + report.corrupt}
        assert found == set(damaged), report
        assert not report.unrecoverable and not report.orphans and not report.misplaced_stores, report
    # (c) no plain image bytes anywhere on disk (a 64-byte window of each image, past the JPEG header)
    needles = [data[len(data) // 2 : len(data) // 2 + 64] for _, data in model.images.values()]
    for top in [root / "vault", *map(Path, stores)]:
        for f in top.rglob("*"):
            if f.is_file():
                raw = f.read_bytes()
                assert not any(n in raw for n in needles), f"plain image bytes in {f}"


class VaultMachine(RuleBasedStateMachine):
    faces: dict = {}
    counter = itertools.count()

    @initialize()
    def make(self) -> None:
        self.root = Path(os.environ["VAULT_FAULTS_TMP"]) / f"m{next(self.counter)}"
        self.stores = make_stores(self.root, N)
        Vault.create(self.root / "vault", self.stores, K).close()
        self.model = Model()
        self.damaged: frozenset = frozenset()
        self.salt = itertools.count()
        self.people = list(self.faces)[:4]

    def _fresh(self, person: str) -> bytes:
        imgs = self.faces[person]
        i = next(self.salt)
        return fresh_jpeg(imgs[i % len(imgs)][1], i)

    @rule(who=st.integers(0, 3), count=st.integers(1, 3))
    def put(self, who: int, count: int) -> None:
        person = self.people[who]
        batch = [(person, self._fresh(person), None) for _ in range(count)]
        with Vault.open(self.root / "vault") as v:
            try:
                ids = v.put_many(batch)
            except VaultError as e:
                assert "forgotten" in str(e)
                return
        for i, (_, data, _) in zip(ids, batch):
            self.model.images[i] = (person, data)

    @rule(who=st.integers(0, 3))
    def duplicate_put(self, who: int) -> None:
        person = self.people[who]
        mine = self.model.of(person)
        if not mine:
            return
        with Vault.open(self.root / "vault") as v:
            assert v.put(person, self.model.images[mine[0]][1]) == mine[0]  # skipped, same id

    @rule(who=st.integers(0, 3))
    def forget(self, who: int) -> None:
        person = self.people[who]
        if not self.model.of(person):
            return
        with Vault.open(self.root / "vault") as v:
            pseudonym = v.person(person).pseudonym
        run_forget(self.root / "vault", None, person)
        self.model.erased[pseudonym] = person
        for i in self.model.of(person):
            del self.model.images[i]
        self._forgotten()

    @rule(who=st.integers(0, 3), other=st.integers(0, 3))
    def put_and_erase_race(self, who: int, other: int) -> None:
        """A put of one person in a thread while another person is erased (and the erased one's put)."""
        person, victim = self.people[who], self.people[other]
        if not self.model.of(victim):
            return
        data = self._fresh(person)
        result: dict[str, object] = {}

        def writer() -> None:
            with Vault.open(self.root / "vault") as w:
                try:
                    result["id"] = w.put(person, data)
                except VaultError as e:
                    result["err"] = e

        t = threading.Thread(target=writer)
        with Vault.open(self.root / "vault") as v:
            pseudonym = v.person(victim).pseudonym
            t.start()
            v.erase(victim)
        t.join()
        with Vault.open(self.root / "vault") as v:
            still = set(v.image_ids(victim)) if victim in {p.person_id for p in v.people()} else set()
        self.model.erased[pseudonym] = victim
        for i in self.model.of(victim):
            del self.model.images[i]
        if "id" in result and (person != victim or result["id"] in still):
            # the victim's own put committed after the erase: a new enrolment, new pseudonym
            self.model.images[str(result["id"])] = (person, data)
        assert still <= set(self.model.of(victim))
        self._forgotten()

    def _forgotten(self) -> None:  # damage to an erased image went with it
        self.damaged = frozenset(d for d in self.damaged if d[0] in self.model.images)

    @precondition(lambda self: self.model.images and not self.damaged)
    @rule(data=st.data())
    def damage_a_share(self, data) -> None:
        image_id = data.draw(st.sampled_from(sorted(self.model.images)))
        x = data.draw(st.integers(1, N))
        kind = data.draw(st.sampled_from(["flip", "delete"]))
        f = next(f for f in share_files(self.stores[x - 1]) if header_fields(f.read_bytes())["image_id"] == image_id)
        if kind == "delete":
            f.unlink()
        else:
            raw = bytearray(f.read_bytes())
            raw[len(raw) // 2] ^= 0x40
            f.write_bytes(bytes(raw))
        self.damaged = frozenset({(image_id, x)})

    @rule()
    def repair(self) -> None:
        with Vault.open(self.root / "vault") as v:
            rep = v.repair()
            assert {(p.image_id, p.x) for p in rep.regenerated} == set(self.damaged) and rep.ok, rep
        self.damaged = frozenset()

    @precondition(lambda self: not self.damaged)
    @rule(a=st.integers(1, N), b=st.integers(1, N))
    def swap_stores_and_remap(self, a: int, b: int) -> None:
        if a == b:
            return
        pa, pb, tmp = Path(self.stores[a - 1]), Path(self.stores[b - 1]), self.root / "swap"
        before = {s: sorted(f.name for f in share_files(s)) for s in self.stores}
        pa.rename(tmp), pb.rename(pa), tmp.rename(pb)
        with Vault.open(self.root / "vault") as v:
            v.people()
            assert len(v.verify().misplaced_stores) == 2
            v.repair()  # deletes nothing in a misplaced store
        pa.rename(tmp), pb.rename(pa), tmp.rename(pb)  # the operator mounts them back
        assert {s: sorted(f.name for f in share_files(s)) for s in self.stores} == before

    @rule()
    def empty_manifest(self) -> None:
        m = self.root / "vault" / "manifest.sqlite"
        saved = m.read_bytes()
        m.write_bytes(b"")
        try:
            Vault.open(self.root / "vault")
            raise AssertionError("an empty manifest opened")
        except InvalidConfig:
            pass
        m.write_bytes(saved)

    @rule(x=st.integers(1, N), who=st.integers(0, 3))
    def put_with_a_store_down(self, x: int, who: int) -> None:
        person = self.people[who]
        with offline(self.stores[x - 1]), Vault.open(self.root / "vault") as v:
            try:
                v.put(person, self._fresh(person))
                raise AssertionError("a put with a store down succeeded")
            except (StoreError, VaultError):
                pass

    @invariant()
    def invariants_hold(self) -> None:
        if hasattr(self, "model"):
            check_invariants(self.root, self.stores, self.model, damaged=self.damaged)


def test_vault_state_machine(faces, tmp_path, monkeypatch):
    monkeypatch.setenv("VAULT_FAULTS_TMP", str(tmp_path))
    VaultMachine.faces = faces
    run = VaultMachine.TestCase
    run.settings = settings(
        max_examples=int(os.environ.get("VAULT_FAULTS_EXAMPLES", "6")),
        stateful_step_count=8,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=os.environ.get("VAULT_FAULTS_RANDOM") is None,
        database=None,
    )
    run().runTest()


# -- SIGKILL at random points of each mutation ----------------------------------------------------------
CHILD = """
    import os, random, signal, sys, threading, time
    from pathlib import Path
    from facefed.client.vault import Vault
    from facefed.client.forget.erase import run_forget
    vault_dir, op, delay, *args = sys.argv[1:]
    threading.Timer(float(delay), lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
    if op == "put":
        person, *files = args
        with Vault.open(vault_dir) as v:
            for f in files:
                v.put(person, Path(f).read_bytes())
    elif op == "forget":
        run_forget(vault_dir, None, args[0])
    elif op == "repair":
        with Vault.open(vault_dir) as v:
            v.repair()
    print("done", flush=True)
    os._exit(0)
"""


@pytest.mark.slow
def test_sigkill_campaign(faces, tmp_path):
    seed = int(os.environ.get("VAULT_FAULTS_SEED", time.time_ns() % 100000))
    print(f"SIGKILL campaign seed {seed} (rerun: VAULT_FAULTS_SEED={seed})")
    rng = random.Random(seed)
    stores = make_stores(tmp_path, N)
    Vault.create(tmp_path / "vault", stores, K).close()
    model = Model()
    people = list(faces)[:4]
    tried = killed = 0
    for step in range(int(os.environ.get("VAULT_FAULTS_KILLS", "12"))):
        op = rng.choice(["put", "put", "forget", "repair"])
        person = rng.choice(people)
        with Vault.open(tmp_path / "vault") as v:
            known = {p.person_id: p.pseudonym for p in v.people()}
        files = []
        if op == "put":
            for j in range(rng.randint(1, 4)):
                f = tmp_path / f"in-{step}-{j}.jpg"
                f.write_bytes(fresh_jpeg(faces[person][j % len(faces[person])][1], step * 10 + j))
                files.append(str(f))
        elif op == "forget" and person not in known:
            continue
        delay = rng.uniform(0.0, 0.08)  # from the start of the operation (after imports): kills land inside it
        proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(CHILD), str(tmp_path / "vault"), op, str(delay), person, *files],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        tried += 1
        killed += proc.returncode == -signal.SIGKILL
        assert proc.returncode in (0, -signal.SIGKILL), err
        if op == "forget":  # whatever the kill interrupted, a rerun finishes the job
            run_forget(tmp_path / "vault", None, person)
            model.erased[known[person]] = person
            for i in model.of(person):
                del model.images[i]
        # Learn what committed from the vault (each put is one batch: all of it or nothing).
        with Vault.open(tmp_path / "vault") as v:
            if op == "put" and person in {p.person_id for p in v.people()}:
                contents = {Path(f).read_bytes() for f in files}
                for image_id in v.image_ids(person):
                    if image_id not in model.images:
                        data = v.get(image_id)
                        assert data in contents
                        model.images[image_id] = (person, data)
        check_invariants(tmp_path, stores, model)
    print(f"SIGKILL campaign: {tried} operations, {killed} killed, invariants held after each")
