"""Right to be forgotten at the site: a real vault of LFW faces, real head checkpoint files and a real
contribution log; after `forget` no share, head row, contribution row or clear id of the person remains."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner
from vault_support import header_fields, load_faces, make_stores, share_files

from facefed.client.forget.contributions import ContributionLog
from facefed.client.forget.erase import ForgetError, default_state_dir, forget, run_forget, settle
from facefed.client.forget.requests import REQUESTS_NAME, RequestError, RequestLog, RunSpan
from facefed.client.vault import UnknownPerson, Vault, VaultError, verify_audit_chain
from facefed.client.vault.sharefile import ShareKeys
from facefed.common.model.heads import MarginHead
from facefed.common.receipts import Receipt, key_fingerprint, sign_receipt, utc_timestamp

VICTIM = "Ahmed_Chalabi"  # 5 images; no other name of the 12 contains it, so byte scans are meaningful
HEAD_FILES = [
    "heads/run-a/r0001-a1.pt",
    "heads/run-a/r0002-a1.pt",
    "heads/run-a/r0002-a2.pt",
    "heads/run-a/r0003-a1.pt",
    "heads/run-b/r0001-a1.pt",
]


class Site:
    def __init__(self, root: Path, faces: dict):
        self.root = root
        self.stores = make_stores(root, 3)
        self.vault = root / "vault"
        self.faces = faces
        with Vault.create(self.vault, self.stores, 2) as v:
            v.put_many([(p, data, name) for p, imgs in faces.items() for name, data in imgs])
            self.pseudonyms = {r.person_id: r.pseudonym for r in v.people()}
        self.state = default_state_dir(self.vault)  # VAULT/site, where `facefed-client start` keeps it
        everyone = sorted(self.pseudonyms.values())
        for i, rel in enumerate(HEAD_FILES):
            head = MarginHead(everyone, seed=i)
            head.probed = True
            head.save(self.state / rel)
        # The victim first trained in run-a round 2 (round 1 had only the others), and in run-b round 1.
        # The contribution log is keyed by pseudonym (issue 11), never the operator's person id.
        others = {self.pseudonyms[p]: len(imgs) for p, imgs in faces.items() if p != VICTIM}
        allp = {self.pseudonyms[p]: len(imgs) for p, imgs in faces.items()}
        with ContributionLog(self.state / "contributions.sqlite") as log:
            log.record(
                run_id="run-a",
                rnd=1,
                attempt=1,
                parent_checkpoint="base",
                images=others,
                sampled=[],
                head_file=HEAD_FILES[0],
            )
            for rnd, att, rel in ((2, 1, HEAD_FILES[1]), (2, 2, HEAD_FILES[2]), (3, 1, HEAD_FILES[3])):
                log.record(
                    run_id="run-a",
                    rnd=rnd,
                    attempt=att,
                    parent_checkpoint=f"run-a-r{rnd - 1}",
                    images=allp,
                    sampled=[self.pseudonyms[VICTIM]],
                    head_file=rel,
                )
            log.record(
                run_id="run-b",
                rnd=1,
                attempt=1,
                parent_checkpoint="base",
                images=allp,
                sampled=[],
                head_file=HEAD_FILES[4],
            )

    def owner_tag(self, person: str) -> bytes:
        return ShareKeys((self.vault / "key").read_bytes()).owner(self.pseudonyms[person])

    def shares_of(self, person: str) -> list[Path]:
        tag = self.owner_tag(person)
        return [
            f
            for s in self.stores
            for f in Path(s).iterdir()
            if not f.name.startswith(".") and header_fields(f.read_bytes())["owner"] == tag
        ]

    def all_files(self) -> dict[str, str]:
        return {
            str(p.relative_to(self.root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(self.root.rglob("*"))
            if p.is_file()
        }

    def contribution_people(self) -> set[str]:
        """Person ids of the log's pseudonyms (the log itself holds no person id)."""
        with Vault.open(self.vault) as v:
            current = {r.pseudonym: r.person_id for r in v.people()}
        by_pseudonym = {ps: pid for pid, ps in self.pseudonyms.items()} | current
        db = sqlite3.connect(self.state / "contributions.sqlite")
        try:
            return {by_pseudonym.get(r[0], r[0]) for r in db.execute("SELECT pseudonym FROM contributions")}
        finally:
            db.close()


@pytest.fixture(scope="module")
def faces(lfw):
    return load_faces(lfw, 12)


@pytest.fixture()
def site(tmp_path, faces):
    return Site(tmp_path, faces)


def test_forget_leaves_no_share_head_row_contribution_or_clear_id(site):
    victim_ps = site.pseudonyms[VICTIM]
    n_victim = len(site.faces[VICTIM])
    assert len(site.shares_of(VICTIM)) == 3 * n_victim
    before = {rel: MarginHead.load(site.state / rel) for rel in HEAD_FILES}

    req = forget(site.vault, None, VICTIM, reason="data subject request, ticket 42")

    assert req.request_id.startswith("fr-") and len(req.request_id) == 19
    assert req.stage == "data_erased" and req.pseudonym == victim_ps
    assert req.shares_destroyed == 3 * n_victim and req.shares_pending == 0 and req.images == n_victim
    assert 0 <= req.erase_seconds < 5
    # What the server needs to roll back: the earliest round per run, keyed by pseudonym, not by id.
    assert req.contributions == [RunSpan("run-a", 2, 3, (2, 3)), RunSpan("run-b", 1, 1, (1,))]
    assert req.contribution_rows == 4 and req.head_rows_removed == len(HEAD_FILES)
    assert sorted(req.head_files) == sorted(HEAD_FILES)

    # Stores: no share of theirs (by owner tag), and the others' shares all remain.
    assert site.shares_of(VICTIM) == []
    total = sum(len(imgs) for imgs in site.faces.values())
    assert sum(len(share_files(s)) for s in site.stores) == 3 * (total - n_victim)
    # Heads: every checkpoint lost exactly that row; the other rows are bit-identical.
    for rel in HEAD_FILES:
        head = MarginHead.load(site.state / rel)
        assert victim_ps not in head.ids and len(head) == len(before[rel]) - 1 and head.probed
        old = before[rel]
        assert torch.equal(head.fc.weight, old.fc.weight[old.indices(head.ids)])
    # Contribution log: their rows gone, everyone else's kept.
    assert site.contribution_people() == set(site.faces) - {VICTIM}
    # Vault: manifest clean, audit chain intact, records the request under the pseudonym.
    with Vault.open(site.vault) as v:
        with pytest.raises(UnknownPerson):
            v.person(VICTIM)
        report = v.verify()
        assert report.ok and report.pending_deletions == 0
        last = v.audit_entries()[-1]
    assert last["event"] == "erase" and last["request_id"] == req.request_id and last["pseudonym"] == victim_ps
    assert verify_audit_chain(site.vault / "audit.log").entries >= 2
    # No file of the site (vault, request log, heads, contribution log, WAL/journal files) holds their id.
    for f in site.root.rglob("*"):
        if f.is_file():
            assert VICTIM.encode() not in f.read_bytes(), f
    # The request log shows it, and the reason was kept.
    with RequestLog(site.vault) as log:
        (stored,) = log.all()
    assert stored == req and stored.reason == "data subject request, ticket 42"


def test_repeat_is_harmless_and_returns_the_same_request(site):
    first = run_forget(site.vault, None, VICTIM)
    files = site.all_files()
    again = run_forget(site.vault, None, VICTIM)
    assert again.repeated and not again.erased_now and again.shares_destroyed_now == 0
    assert again.request.request_id == first.request.request_id
    assert again.request.shares_destroyed == first.request.shares_destroyed
    assert again.head_rows_removed_now == 0 and again.contribution_rows_now == 0
    with RequestLog(site.vault) as log:
        assert len(log.all()) == 1
    # Nothing of anyone else was touched by the repeat (only the request log and vault bookkeeping moved).
    changed = {k for k, v in site.all_files().items() if files.get(k) != v}
    assert changed <= {f"vault/{REQUESTS_NAME}", "vault/audit.log", "vault/manifest.sqlite"}, changed
    assert all(not k.startswith(("store", "vault/site/")) for k in changed)


def test_unknown_person_is_a_clear_error_that_changes_nothing(site):
    files = site.all_files()
    with pytest.raises(UnknownPerson, match="Nobody_Here.*nothing was changed"):
        forget(site.vault, None, "Nobody_Here")
    with pytest.raises(ValueError, match="person id"):
        forget(site.vault, None, " bad id")
    with pytest.raises(ForgetError, match="contains the person id"):
        forget(site.vault, None, VICTIM, reason=f"{VICTIM} asked")
    assert site.all_files() == files
    assert not (site.vault / REQUESTS_NAME).exists()
    # Also once a request log exists.
    forget(site.vault, None, "Aicha_El_Ouafi")
    files = site.all_files()
    with pytest.raises(UnknownPerson):
        forget(site.vault, None, "Nobody_Here")
    assert site.all_files() == files


def test_reenrolment_is_refused_by_the_tombstone_unless_allowed(site):
    req = forget(site.vault, None, VICTIM)
    name, data = site.faces[VICTIM][0]
    other, odata = site.faces["Aicha_El_Ouafi"][0]
    with Vault.open(site.vault) as v:
        n_before = sum(p.n_images for p in v.people())
        with pytest.raises(VaultError, match="asked to be forgotten.*--allow-reenrol"):
            v.put(VICTIM, data, source_name=name)
        with pytest.raises(VaultError, match="asked to be forgotten"):  # a batch with them stores nothing
            v.put_many([(other, odata, "again.jpg"), (VICTIM, data, name)])
        assert sum(p.n_images for p in v.people()) == n_before
        assert site.shares_of(VICTIM) == []
        v.put(VICTIM, data, source_name=name, allow_reenrol=True)  # new consent: the operator says so
        v.put(VICTIM, site.faces[VICTIM][1][1])  # the tombstone is lifted: no flag needed any more
        assert v.person(VICTIM).n_images == 2
    # Forgetting them again is a new request (the old one is finished with their first enrolment).
    second = forget(site.vault, None, VICTIM)
    assert second.request_id != req.request_id and second.shares_destroyed == 6
    with Vault.open(site.vault) as v, pytest.raises(VaultError, match="asked to be forgotten"):
        v.put(VICTIM, data)


def test_crash_between_erasure_and_the_log_is_resumed(site):
    """The request is recorded, the vault erases, the process dies before the log says so: the next
    `forget` finishes the same request from the vault's audit log."""
    pseudonym = site.pseudonyms[VICTIM]
    with RequestLog(site.vault) as log:
        opened = log.receive(VICTIM, pseudonym, [RunSpan("run-a", 2, 3, (2, 3))], None)
    with Vault.open(site.vault) as v:
        v.erase(VICTIM, request_id=opened.request_id)
    with RequestLog(site.vault) as log:
        assert log.get(opened.request_id).stage == "received"
        assert [r.request_id for r in log.all()] == [opened.request_id]
    done = forget(site.vault, None, VICTIM)
    assert done.request_id == opened.request_id and done.stage == "data_erased"
    assert done.shares_destroyed == 3 * len(site.faces[VICTIM]) and done.head_rows_removed == len(HEAD_FILES)
    assert VICTIM not in site.contribution_people()


def test_server_stages_and_receipt_are_recorded(site, tmp_path):
    from facefed.common.certs import make_ed25519

    req = forget(site.vault, None, VICTIM)
    key = make_ed25519(tmp_path / "srv.key", tmp_path / "srv.pub")
    with RequestLog(site.vault) as log:
        assert [r.request_id for r in log.pending_for_server()] == [req.request_id]
        with pytest.raises(RequestError, match="no receipt before"):
            log.store_receipt(req.request_id, {})
        sha = hashlib.sha256(b"replayed").hexdigest()
        log.mark_unlearned(
            req.request_id, run_id="run-a", rnd=3, checkpoint_id="run-a-r0003-replay", checkpoint_sha256=sha
        )
        receipt = Receipt(
            request_id=req.request_id,
            site="site-a",
            person_pseudonym=req.pseudonym,
            received_at=utc_timestamp(req.received_at),
            erased_at=utc_timestamp(req.erased_at),
            shares_destroyed=req.shares_destroyed,
            run_id="run-a",
            rollback_round=1,
            replayed_rounds=[2, 3],
            model_id="run-a-r0003-replay",
            model_sha256=sha,
            checkpoints_deleted=["run-a-r0002", "run-a-r0003"],
            issued_at=utc_timestamp(),
            server_key_fingerprint=key_fingerprint(key.public_key()),
        )
        done = log.store_receipt(req.request_id, sign_receipt(receipt, key))
        assert log.pending_for_server() == []
    assert done.stage == "receipt_issued" and Path(done.receipt_path).is_file()
    res = CliRunner().invoke(_cli(), ["forget", "status", "--vault", str(site.vault), req.request_id, "--json"])
    assert res.exit_code == 0, res.output
    (shown,) = json.loads(res.output)
    assert shown["stage"] == "receipt_issued" and shown["round"] == 3
    assert shown["receipt"]["receipt"]["model_sha256"] == sha
    table = CliRunner().invoke(_cli(), ["forget", "status", "--vault", str(site.vault)])
    assert table.exit_code == 0 and req.request_id in table.output and "round 3" in table.output
    assert '"model_sha256": "' + sha in table.output  # the receipt itself is shown


def _cli():
    import typer

    from facefed.client.cli import forget as cli_forget

    root = typer.Typer()
    root.command("noop")(lambda: None)  # a group needs two entries for typer to keep `forget` as a group
    cli_forget.register(root)
    return root


def test_cli_forget_prints_request_and_time_to_erase(site):
    run = CliRunner()
    empty = run.invoke(_cli(), ["forget", "status", "--vault", str(site.vault)])
    assert empty.exit_code == 0 and "no forget requests" in empty.output
    assert not (site.vault / REQUESTS_NAME).exists()  # looking does not create the log
    res = run.invoke(_cli(), ["forget", "--vault", str(site.vault), "--person", VICTIM])
    assert res.exit_code == 0, res.output
    assert "from request to data erased" in res.output and "rounds 2..3" in res.output
    with RequestLog(site.vault) as log:
        (req,) = log.all()
    assert req.request_id in res.output and f"{req.shares_destroyed} share(s) destroyed" in res.output
    again = run.invoke(_cli(), ["forget", "--vault", str(site.vault), "--person", VICTIM])
    assert again.exit_code == 0 and "repeated" in again.output and req.request_id in again.output
    unknown = run.invoke(_cli(), ["forget", "--vault", str(site.vault), "--person", "Nobody_Here"])
    assert unknown.exit_code == 2 and "unknown person" in unknown.output
    status = run.invoke(_cli(), ["forget", "status", "--vault", str(site.vault), "--json"])
    assert status.exit_code == 0
    (shown,) = json.loads(status.output)
    assert shown["stage"] == "data_erased" and shown["shares_destroyed"] == req.shares_destroyed
    assert VICTIM not in status.output
    bad = run.invoke(_cli(), ["forget", "status", "--vault", str(site.vault), "fr-nothex"])
    assert bad.exit_code == 2 and "not a forget request id" in bad.output


def test_settle_finishes_a_request_whose_process_died_before_erasing(site):
    """Recorded, then the process died: `settle` (node start-up) erases without the id being typed again."""
    with RequestLog(site.vault) as log:
        opened = log.receive(VICTIM, site.pseudonyms[VICTIM], [], None)
    assert settle(site.vault) and settle(site.vault) == []  # the second call finds nothing left to do
    with RequestLog(site.vault) as log:
        req = log.get(opened.request_id)
    assert req.stage == "data_erased" and req.shares_destroyed == 3 * len(site.faces[VICTIM])
    assert req.contributions == [RunSpan("run-a", 2, 3, (2, 3)), RunSpan("run-b", 1, 1, (1,))]
    assert site.shares_of(VICTIM) == [] and VICTIM not in site.contribution_people()
    assert all(site.pseudonyms[VICTIM] not in MarginHead.load(site.state / rel).ids for rel in HEAD_FILES)


def test_settle_removes_what_a_round_in_flight_wrote_after_the_erasure(site):
    """A round that read the faces before the erasure saves its head and logs its contributions after
    it: `settle` removes both and widens the rollback span the server will be told about."""
    req = forget(site.vault, None, VICTIM)
    late = MarginHead(sorted(site.pseudonyms.values()), seed=99)
    late.save(site.state / "heads/run-a/r0004-a1.pt")
    with ContributionLog(site.state / "contributions.sqlite") as log:
        log.record(
            run_id="run-a",
            rnd=4,
            attempt=1,
            parent_checkpoint="run-a-r3",
            images={site.pseudonyms[p]: len(i) for p, i in site.faces.items()},
            sampled=[site.pseudonyms[VICTIM]],
            head_file="heads/run-a/r0004-a1.pt",
        )
    (o,) = settle(site.vault)
    assert o.request.request_id == req.request_id and o.head_rows_removed_now == 1 and o.contribution_rows_now == 1
    assert o.request.contributions == [RunSpan("run-a", 2, 4, (2, 3, 4)), RunSpan("run-b", 1, 1, (1,))]
    assert site.pseudonyms[VICTIM] not in MarginHead.load(site.state / "heads/run-a/r0004-a1.pt").ids
    assert site.contribution_people() == set(site.faces) - {VICTIM}
    # Someone enrolled again keeps their new contributions; only the old pseudonym's rows would go.
    name, data = site.faces[VICTIM][0]
    with Vault.open(site.vault) as v:
        v.put(VICTIM, data, source_name=name, allow_reenrol=True)
        again = v.person(VICTIM).pseudonym
    assert again != site.pseudonyms[VICTIM]
    with ContributionLog(site.state / "contributions.sqlite") as log:
        log.record(
            run_id="run-c", rnd=1, attempt=1, parent_checkpoint="base", images={again: 1}, sampled=[], head_file=None
        )
    assert settle(site.vault) == [] and VICTIM in site.contribution_people()


def test_query_answer_reports_keeps_receipts_drops_heads_and_checks_budget(site, tmp_path):
    """client/forget/sync.py on a real vault: what the server's `query` gets back and what it changes."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from facefed.client.forget.sync import answer_query
    from facefed.client.training.privacy import Policy, write_policy
    from facefed.common.accountant import SiteAccountant
    from facefed.common.config import TrainConfig
    from facefed.common.protocol.forget import BudgetAsk, Delivery, DropHeads, QueryOrder

    req = forget(site.vault, None, VICTIM)
    reply = answer_query(site="north", vault_dir=site.vault, state_dir=site.state, order=QueryOrder())
    (p,) = reply.pending
    assert (p.request_id, p.pseudonym) == (req.request_id, site.pseudonyms[VICTIM])
    assert p.contributions == {"run-a": [2, 3], "run-b": [1]} and p.shares_destroyed == req.shares_destroyed
    assert VICTIM not in reply.model_dump_json()  # the person id never leaves the site

    # Budget: a replay of 2 rounds x 50 steps at sigma 1 fits a fresh accountant under 50 but not under 1.
    write_policy(site.vault, Policy(max_epsilon=50.0))  # the site's own policy allows a budget of 50
    cfg = TrainConfig(
        privacy_unit="person", delta=1e-5, noise_multiplier=1.0, sample_rate=0.2, steps=50, max_epsilon=50.0
    )
    ask = BudgetAsk(train_config=cfg.model_dump_json(), rounds=2, steps=50)
    ans = answer_query(site="north", vault_dir=site.vault, state_dir=site.state, order=QueryOrder(budget=ask)).budget
    assert ans.fits and 0 < ans.epsilon_planned < 50 and ans.epsilon_now == 0
    tight = BudgetAsk(train_config=cfg.model_copy(update={"max_epsilon": 1.0}).model_dump_json(), rounds=2, steps=50)
    ans = answer_query(site="north", vault_dir=site.vault, state_dir=site.state, order=QueryOrder(budget=tight)).budget
    assert not ans.fits and "over its max_epsilon 1" in ans.detail
    assert SiteAccountant(site.vault / "accountant.json", 1e-5, 50.0, "person").steps == 0  # asking spends nothing

    # A receipt for another pseudonym is refused; the right one is stored; tainted heads are dropped.
    key = ed25519.Ed25519PrivateKey.generate()

    def receipt(pseudonym: str) -> dict:
        t = utc_timestamp(req.received_at)
        return sign_receipt(
            Receipt(
                request_id=req.request_id,
                site="north",
                person_pseudonym=pseudonym,
                received_at=t,
                erased_at=t,
                shares_destroyed=req.shares_destroyed,
                run_id="run-a-u1",
                rollback_round=1,
                replayed_rounds=[2, 3],
                model_id="run-a-u1-r0003",
                model_sha256="ab" * 32,
                checkpoints_deleted=["run-a-r0002", "run-a-r0003"],
                issued_at=t,
                server_key_fingerprint=key_fingerprint(key.public_key()),
            ),
            key,
        )

    def delivery(doc: dict) -> Delivery:
        return Delivery(
            request_id=req.request_id,
            run_id="run-a-u1",
            round=3,
            checkpoint_id="run-a-u1-r0003",
            checkpoint_sha256="ab" * 32,
            receipt=doc,
        )

    def deliver(doc: dict):
        return answer_query(
            site="north", vault_dir=site.vault, state_dir=site.state, order=QueryOrder(deliver=[delivery(doc)])
        )

    # Issue 11: no pinned server key, nothing is stored; a receipt signed by another key is not stored.
    from cryptography.hazmat.primitives import serialization

    from facefed.client.forget.receipts import pin_server_key

    good = receipt(site.pseudonyms[VICTIM])
    unpinned = deliver(good)
    assert unpinned.stored == [] and "no server receipt key is pinned" in unpinned.problems[0]
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    pin_server_key(site.vault, pem)
    forged_key = ed25519.Ed25519PrivateKey.generate()
    forged = {
        **good,
        "signature": sign_receipt(Receipt.model_validate(good["receipt"]), key)["signature"][:-8] + "A" * 8,
    }
    bad = deliver(forged)
    assert bad.stored == [] and "not stored" in bad.problems[0]
    other = Receipt.model_validate(
        {**good["receipt"], "server_key_fingerprint": key_fingerprint(forged_key.public_key())}
    )
    assert deliver(sign_receipt(other, forged_key)).stored == []  # signed, but not by the pinned key
    wrong = deliver(receipt("f" * 32))
    assert wrong.stored == [] and "names another request or person" in wrong.problems[0]
    ok = answer_query(
        site="north",
        vault_dir=site.vault,
        state_dir=site.state,
        order=QueryOrder(
            deliver=[delivery(receipt(site.pseudonyms[VICTIM]))], drop_heads=[DropHeads(run_id="run-a", from_round=2)]
        ),
    )
    assert ok.stored == [req.request_id] and ok.pending == [] and ok.heads_dropped == 3
    assert sorted(p.name for p in (site.state / "heads" / "run-a").glob("*.pt")) == ["r0001-a1.pt"]
    with RequestLog(site.vault) as log:
        done = log.get(req.request_id)
    assert done.stage == "receipt_issued" and done.checkpoint_id == "run-a-u1-r0003"
    assert json.loads(Path(done.receipt_path).read_text())["receipt"]["person_pseudonym"] == site.pseudonyms[VICTIM]
