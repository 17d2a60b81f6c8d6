"""End to end on real processes: one SuperLink and three SuperNodes on 127.0.0.1 with TLS and node
authentication, real vaults of real LFW faces, per-person DP training, started and stopped by PID.

One federation serves the module (setting it up is most of the cost): a two-round run in which the
server is killed (SIGKILL) after round 1 and restarted, and one site stays down, so the same run shows
training, restart safety and a site dropping out; then the refusals.
"""

from __future__ import annotations

import signal
import sqlite3
import time
from pathlib import Path

import pytest
import torch
from federation_support import ROOT  # noqa: F401  (puts the repo root on sys.path for demo.federation)

from demo.federation import CLIENT, SERVER, Federation, build_vault, free_port, pick_people, write_config  # noqa: E402
from facefed.client.training.privacy import Policy, write_policy  # noqa: E402
from facefed.common.accountant import SiteAccountant
from facefed.common.model.heads import MarginHead
from facefed.common.model.mobilefacenet import load_checkpoint, sha256_file, shared_state
from facefed.server.ledger.db import Ledger
from facefed.server.ops.stale import find_stale
from facefed.server.state import StatePaths

pytestmark = pytest.mark.slow
SITES = ["north", "south", "east"]
PEOPLE, IMAGES = 6, 4
JPEG_HEADER = b"\xff\xd8\xff\xe0\x00\x10JFIF"


@pytest.fixture(scope="module")
def fed(tmp_path_factory, lfw, pretrained_file):
    root = tmp_path_factory.mktemp("federation")
    people = dict(zip(SITES, pick_people(lfw, len(SITES), PEOPLE), strict=True))
    f = Federation(root, SITES)
    f.people = people
    for site in SITES:
        vault = build_vault(lfw, people[site], f.site_dir(site), max_images=IMAGES)
        # The sites' own policy (issue 11): these small sites allow delta 1e-3 and a budget of 50.
        write_policy(vault, Policy(delta=1e-3, max_epsilon=50.0))
    try:
        f.setup()
        f.wait_online(len(SITES), timeout=180)
        yield f
    finally:
        f.stop_all()


def committed_rounds(state: Path) -> int:
    try:
        with sqlite3.connect(state / "ledger.sqlite") as db:
            return db.execute("SELECT COUNT(*) FROM rounds WHERE status = 'committed'").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_two_rounds_survive_a_server_crash_and_a_site_dropout(fed, tmp_path):
    cfg = write_config(
        tmp_path / "fed.toml",
        rounds=2,
        min_sites=2,
        steps=3,
        probe_steps=2,
        sample_rate=0.5,
        noise=1.0,
        delta=1e-3,
        max_epsilon=50.0,
        max_pairs=100,
        round_timeout=600,
        wait_for_sites=60,
    )
    follower = fed.spawn("train-1", SERVER, "train", "--state", str(fed.state), "--config", str(cfg))
    deadline = time.monotonic() + 600
    while committed_rounds(fed.state) < 1:
        assert time.monotonic() < deadline, fed.procs["server"].output()[-3000:]
        assert follower.alive(), follower.output()
        time.sleep(1)
    # Crash: the SuperLink and everything in its process group die at once. Flower's SuperExec and the
    # ServerApp run in a session of their own, so they outlive it; the next `start` stops them.
    old_runtime = StatePaths(fed.state).server_info().address
    fed.procs["server"].stop(signal.SIGKILL)
    follower.stop()
    fed.procs["node-east"].stop()  # and one site goes away for good
    fed.start_server()
    assert find_stale(old_runtime) == []
    fed.wait_online(2, timeout=120)
    res = fed.train(cfg, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resuming run" in res.stdout and "round 2/2" in res.stdout

    with Ledger(fed.state / "ledger.sqlite") as ledger:
        (run,) = ledger.runs()
        assert run.status == "completed"
        rounds = ledger.rounds(run.run_id)
        committed = [r for r in rounds if r.status == "committed"]
        assert [r.round for r in committed] == [1, 2]  # each round counted once, none lost
        r1, r2 = committed
        assert r1.participants == sorted(SITES) and r1.missing == []
        assert r2.participants == ["north", "south"] and r2.missing == ["east"]
        assert next(s for s in r2.sites if s.site == "east").status == "missing"
        attempts = ledger.attempts(run.run_id)
        assert len({r1.flwr_run_id, r2.flwr_run_id}) == 2 and len(attempts) == 2
        # The killed attempt's end is recorded: by its ServerApp (interrupted) or by the one that resumed.
        assert (
            attempts[0]["outcome"]
            in ("interrupted", f"killed without recording its end; Flower run {r2.flwr_run_id} resumed the run")
            and attempts[1]["outcome"] == "completed"
        )

        # Checkpoints: on disk with the recorded sha256, each round's parent is the previous round.
        chain = ledger.lineage(r2.checkpoint_id)
        assert [c.round for c in chain] == [2, 1, 0]
        assert r2.parent_checkpoint == r1.checkpoint_id and r2.parent_sha256 == r1.checkpoint_sha256
        for c in chain:
            assert sha256_file(c.path) == c.sha256
        base, _ = load_checkpoint(chain[2].path)
        final, meta = load_checkpoint(chain[0].path)
        assert meta["parent_id"] == r1.checkpoint_id
        moved = [k for k, v in shared_state(final).items() if not torch.equal(v, shared_state(base)[k])]
        assert moved, "the global tail did not change in two rounds"
        for k, v in final.state_dict().items():  # the frozen prefix is never touched
            if k not in shared_state(final):
                assert torch.equal(v, base.state_dict()[k]), k

        # Evaluation and privacy are recorded per round.
        for r in committed:
            assert 0.0 <= r.metrics["lfw_accuracy"] <= 1.0 and r.metrics["lfw_pairs"] == 100
            for s in r.sites:
                if s.status == "ok":
                    assert s.unit == "person" and s.delta == pytest.approx(1e-3) and s.accountant == "rdp"
                    assert s.epsilon > 0 and s.people == PEOPLE and s.bytes_up == s.bytes_down > 0
        # What the server received: exactly the shared tail from every site, never a head.
        tail = shared_state(final)
        for r in committed:
            for s in r.sites:
                if s.status == "ok":
                    assert set(s.received_keys) == set(tail)
                    assert all(tail[k].shape[0] != PEOPLE for k in s.received_keys)
        eps = {s.site: s.epsilon for s in r2.sites if s.status == "ok"}

    # The sites' own records: heads per committed round, contribution logs, the accountant.
    for site in SITES:
        state = fed.vault(site) / "site"
        rounds_here = [1] if site == "east" else [1, 2]
        for rnd in rounds_here:
            head = MarginHead.load(state / "heads" / run.run_id / f"r{rnd:04d}-a1.pt")
            assert len(head) == PEOPLE and not set(head.ids) & set(fed.people[site])  # pseudonyms, not names
        from facefed.client.forget.contributions import ContributionLog
        from facefed.client.vault import Vault

        with Vault.open(fed.vault(site)) as v:
            pseudonyms = sorted(r.pseudonym for r in v.people())
        with ContributionLog(state / "contributions.sqlite") as log:  # keyed by pseudonym (issue 11)
            assert log.people_in(run.run_id, 1) == pseudonyms
            assert log.people_in(run.run_id, 2) == ([] if site == "east" else pseudonyms)
        if site in eps:  # the vault's one accountant (issue 11), not the node state's
            assert not (state / "accountant.json").exists()
            acc = SiteAccountant(fed.vault(site) / "accountant.json", 1e-3, 50.0, "person")
            assert acc.epsilon() == pytest.approx(eps[site], rel=1e-6)

    # No plain image was written anywhere by the server or a site's training.
    for where in [fed.state] + [fed.vault(s) / "site" for s in SITES]:
        for p in where.rglob("*"):
            if p.is_file():
                assert JPEG_HEADER not in p.read_bytes(), p

    status = fed.status()
    assert run.run_id[:12] in status and "completed" in status


def test_refusals_say_why(fed, tmp_path):
    vault = fed.vault("north")
    common = [
        "--vault",
        str(vault),
        "--server",
        fed.address,
        "--state",
        str(tmp_path / "st"),
        "--runtime-port",
        str(free_port()),
        "--max-retries",
        "2",
        "--no-worker",
        "--activation-wait",
        "0",
    ]

    def refused(*args: str) -> str:
        res = fed.run(CLIENT, "start", *args, *common, timeout=120, check=False)
        assert res.returncode != 0, res.stdout + res.stderr
        return res.stderr

    fed.run(CLIENT, "keygen", "--out", str(tmp_path / "stranger"))
    out = refused(
        "--site", "stranger", "--root-cert", str(fed.tls / "ca.crt"), "--key", str(tmp_path / "stranger" / "node.key")
    )
    assert "not registered" in out and "sites register" in out

    out = refused("--site", "north", "--key", str(fed.key("north")))
    assert "CA certificate" in out and "--root-cert" in out

    fed.run(SERVER, "certs", "--out", str(tmp_path / "other-ca"))
    out = refused(
        "--site", "north", "--root-cert", str(tmp_path / "other-ca" / "ca.crt"), "--key", str(fed.key("north"))
    )
    assert "not trusted" in out

    out = refused("--site", "north", "--insecure")
    assert "requires TLS" in out

    # A second server on the same state (its database, its ledger) is refused.
    second = fed.run(
        SERVER,
        "start",
        "--state",
        str(fed.state),
        "--tls-dir",
        str(fed.tls),
        "--port",
        str(free_port()),
        timeout=120,
        check=False,
    )
    assert second.returncode != 0 and "already running" in second.stderr

    # A revoked site's key is refused like an unknown one.
    fed.run(SERVER, "sites", "revoke", "east", "--state", str(fed.state))
    assert "revoked" in fed.run(SERVER, "sites", "ls", "--state", str(fed.state)).stdout
    out = refused("--site", "east", "--root-cert", str(fed.tls / "ca.crt"), "--key", str(fed.key("east")))
    assert "not registered" in out and "revoked" in out


def test_forget_unlearn_and_receipt_end_to_end(fed, tmp_path):
    """After the run above: a person at north is forgotten, the server replays without them, the
    receipt reaches the site and verifies, a tampered copy does not, and nothing of them is left."""
    import json
    import re

    from demo.federation import files_mentioning, head_rows_of, shares_of

    vault, state = fed.vault("north"), fed.vault("north") / "site"
    person = fed.people["north"][0]
    listing = json.loads(fed.run(CLIENT, "vault", "ls", "--vault", str(vault), "--json").stdout)
    pseudonym = next(p["pseudonym"] for p in listing["people"] if p["person_id"] == person)
    with Ledger(fed.state / "ledger.sqlite") as ledger:
        (run,) = [r for r in ledger.runs() if r.kind == "train"]
    assert head_rows_of(state, pseudonym, person)  # they were trained with

    # What the server released with them: distinctive bytes of the round-1 model (sent to every site
    # in round 2, so also in the SuperLink's messages) and of the round-2 model (its checkpoint).
    needles = {}
    for rnd in (1, 2):
        with Ledger(fed.state / "ledger.sqlite") as ledger:
            path = ledger.checkpoint(f"{run.run_id}-r{rnd:04d}").path
        tail = max(shared_state(load_checkpoint(path)[0]).values(), key=lambda t: t.numel())
        raw = tail.detach().numpy().astype("<f4").tobytes()
        needles[rnd] = raw[len(raw) // 2 : len(raw) // 2 + 64]
    out = fed.run(CLIENT, "forget", "--vault", str(vault), "--person", person, "--reason", "test").stdout
    rid = re.search(r"fr-[0-9a-f]{16}", out).group(0)
    res = fed.run(SERVER, "unlearn", "--state", str(fed.state), "--wait", "30", timeout=900, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"request {rid} from site north: unlearned" in res.stdout

    with Ledger(fed.state / "ledger.sqlite") as ledger:
        assert ledger.run(run.run_id).status == "superseded"
        replay = ledger.run(f"{run.run_id}-u1")
        # Present since round 1: the rollback is the base model, both rounds are replayed (without the
        # revoked site east), and the replaced checkpoints are deleted.
        assert (replay.kind, replay.base_checkpoint, replay.status) == ("replay", f"{run.run_id}-r0000", "completed")
        replayed = ledger.rounds(replay.run_id, committed_only=True)
        assert [r.round for r in replayed] == [1, 2] and all(r.participants == ["north", "south"] for r in replayed)
        for rnd in (1, 2):
            c = ledger.checkpoint(f"{run.run_id}-r{rnd:04d}")
            assert c.deleted_at is not None and rid in c.deleted_reason and not Path(c.path).exists()
        req = ledger.request(rid)
        assert req.status == "unlearned" and req.delivered_at and req.model_checkpoint == f"{replay.run_id}-r0002"
        # The replay is a new release: north's epsilon grew past what the original run had spent.
        eps_before = max(
            s.epsilon for r in ledger.rounds(run.run_id) for s in r.sites if s.site == "north" and s.epsilon
        )
        eps_after = max(s.epsilon for r in replayed for s in r.sites if s.site == "north")
        assert eps_after > eps_before

        flwr_runs = sorted(int(a["flwr_run_id"]) for a in ledger.attempts(run.run_id))
    # The server keeps no copy of what the replaced run released: not in the checkpoints, the ledger,
    # the SuperLink's database or its WAL; and the receipt says which Flower runs were purged.
    leaks = [
        (rnd, str(f.relative_to(fed.state)))
        for f in sorted(fed.state.rglob("*"))
        if f.is_file()
        for rnd, needle in needles.items()
        if needle in f.read_bytes()
    ]
    assert leaks == [], leaks
    body = json.loads((vault / "receipts" / f"{rid}.json").read_text())["receipt"]
    assert body["format"] == "facefed-receipt/2" and body["superlink_purged_at"]
    assert body["superlink_runs_purged"] and set(body["superlink_runs_purged"]) <= set(flwr_runs), body

    status = json.loads(fed.run(CLIENT, "forget", "status", "--vault", str(vault), "--json").stdout)
    (mine,) = [r for r in status if r["request_id"] == rid]
    assert mine["stage"] == "receipt_issued" and mine["receipt"]["receipt"]["model_id"] == f"{replay.run_id}-r0002"
    receipt = vault / "receipts" / f"{rid}.json"
    ok = fed.run(SERVER, "receipts", "verify", str(receipt), "--state", str(fed.state), check=False)
    assert ok.returncode == 0 and "VERIFIED" in ok.stdout, ok.stdout + ok.stderr
    doc = json.loads(receipt.read_text())
    doc["receipt"]["replayed_rounds"] = [2]
    (tmp_path / "tampered.json").write_text(json.dumps(doc))
    bad = fed.run(SERVER, "receipts", "verify", str(tmp_path / "tampered.json"), "--state", str(fed.state), check=False)
    assert bad.returncode == 1 and "signature" in bad.stdout
    # At the site, with only the receipt and the server key pinned at `start` (issue 11).
    here = fed.run(CLIENT, "receipts", "verify", str(receipt), "--vault", str(vault), check=False)
    assert here.returncode == 0 and "signature valid" in here.stdout, here.stdout + here.stderr
    there = fed.run(CLIENT, "receipts", "verify", str(tmp_path / "tampered.json"), "--vault", str(vault), check=False)
    assert there.returncode == 1 and "INVALID" in there.stderr

    # Nothing of them is left at the site: shares, head rows, raw bytes; the replaced run's heads are gone.
    stores = sorted((fed.site_dir("north") / "stores").iterdir())
    assert sum(shares_of(vault, stores, pseudonym).values()) == 0
    assert head_rows_of(state, pseudonym, person) == []
    assert files_mentioning(fed.site_dir("north"), person) == []
    # The pseudonym is kept only by the request's own record (the request log that reports it to the
    # server, and the signed receipt that names it): no head, contribution log, accountant or log has it.
    assert set(files_mentioning(fed.site_dir("north"), pseudonym)) <= {
        "vault/requests.sqlite",
        "vault/audit.log",
        f"vault/receipts/{rid}.json",
    }
    for site in ("north", "south"):
        old = fed.vault(site) / "site" / "heads" / run.run_id
        assert not list(old.glob("*.pt")) if old.exists() else True
        assert list((fed.vault(site) / "site" / "heads" / replay.run_id).glob("r0002-a*.pt"))


def test_a_hostile_order_is_refused_by_every_site_and_the_server_prints_why(fed, tmp_path):
    """A server config asking for less privacy than the sites' policies allow (noise 0.05): each site
    refuses before any training, its accountant is byte-identical, and the server's operator reads
    one line per site naming it and the reason; the run fails at once."""
    accountants = {s: (fed.vault(s) / "accountant.json").read_bytes() for s in ("north", "south")}
    cfg = write_config(
        tmp_path / "greedy.toml",
        rounds=1,
        min_sites=2,
        steps=3,
        probe_steps=2,
        sample_rate=0.5,
        noise=0.05,
        delta=1e-3,
        max_epsilon=50.0,
        max_pairs=100,
        wait_for_sites=60,
        max_attempts=1,
    )
    res = fed.train(cfg, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    for site in ("north", "south"):
        line = next((x for x in out.splitlines() if f"site {site} refused (policy)" in x), None)
        assert line is not None and "noise_multiplier: order asks 0.05" in line, out[-3000:]
        assert (fed.vault(site) / "accountant.json").read_bytes() == accountants[site]
    assert "Traceback" not in out
