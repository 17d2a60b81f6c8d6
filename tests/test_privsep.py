"""Privilege separation at a site (issue 11, item 3): real users, real SuperLink, real SuperNode.

`facefed-client start --node-user U`, run as root, starts the SuperNode (and so every ClientApp) as U
and the training worker as the vault's owner. The test makes two throwaway users (the vault's owner
and the node user), runs a real federated round through the separated node, and then plays a hostile
ClientApp: code running as the node user (what a FAB would run if the site's FAB guard were
bypassed) tries to read the vault, its key, the heads, the accountant and the shares, and sends the
worker an order that asks for less privacy than the site's policy allows. It gets nothing but the
worker's typed refusal.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from federation_support import ROOT  # noqa: F401  (puts the repo root on sys.path for demo.federation)

from demo.federation import Federation, build_vault, pick_people, write_config  # noqa: E402
from facefed.client.site.privsep import Account, blocked, node_account  # noqa: E402
from facefed.client.training.privacy import Policy, write_policy  # noqa: E402
from facefed.server.ledger.db import Ledger  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("useradd") is None,
        reason="privilege separation needs root and useradd (to make throwaway users)",
    ),
]

# Runs as the node user. Every attempt is recorded; nothing is expected to succeed but the socket
# call, which must come back as the worker's refusal.
HOSTILE = r"""
import json, os, sys, tomllib
from pathlib import Path
vault, state, stores, node_dir = map(Path, sys.argv[1:5])
seen = {"uid": os.getuid(), "groups": os.getgroups()}
def attempt(name, fn):
    try:
        out = fn()
        seen[name] = "GOT " + (out.hex()[:32] if isinstance(out, bytes) else repr(out)[:200])
    except Exception as e:
        seen[name] = type(e).__name__
attempt("vault_key", lambda: (vault / "key").read_bytes())
attempt("vault_list", lambda: os.listdir(vault))
attempt("vault_toml", lambda: (vault / "vault.toml").read_bytes())
attempt("state_list", lambda: os.listdir(state))
attempt("heads", lambda: os.listdir(state / "heads"))
attempt("accountant", lambda: (vault / "accountant.json").read_bytes())
attempt("policy", lambda: (vault / "policy.json").read_bytes())
attempt("stores", lambda: [os.listdir(s) for s in sorted(stores.iterdir())])
attempt("node_config", lambda: tomllib.loads((node_dir / "node.toml").read_text()))

from facefed.client.site import worker
from facefed.common.protocol.train import TrainOrder
from facefed.common.protocol.worker import TrainCall, WorkerCall
from facefed.common.config import TrainConfig
greedy = TrainConfig(noise_multiplier=0.05, delta=1e-3, max_epsilon=50.0)
order = TrainOrder.from_config({
    "run-id": "t-run", "round": 1, "attempt": 1, "parent-checkpoint": "t-run-r0000",
    "parent-sha256": "cd" * 32, "base-sha256": "ef" * 32, "prefix-fingerprint": "01" * 32,
    "train-config": greedy.model_dump_json(), "steps": 50, "seed": 7, "weighting": "people",
    "head-round": 0, "head-attempt": 0, "layout-names": [], "layout-shapes": [],
})
got = worker.call(node_dir / "link", WorkerCall(call=TrainCall(order=order)))
seen["worker"] = None if got is None else got[0].answer.model_dump(mode="json")
print(json.dumps(seen))
"""


def _useradd(name: str) -> pwd.struct_passwd:
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group", name], check=True
    )
    return pwd.getpwnam(name)


def _userdel(name: str) -> None:
    subprocess.run(["userdel", name], check=False, capture_output=True)
    subprocess.run(["groupdel", name], check=False, capture_output=True)


def _chown_tree(path: Path, pw: pwd.struct_passwd) -> None:
    for base, dirs, files in os.walk(path):
        for n in [base, *(os.path.join(base, x) for x in dirs + files)]:
            os.chown(n, pw.pw_uid, pw.pw_gid, follow_symlinks=False)


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(pid)


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process under `pid`."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            try:
                cmd = (Path(f"/proc/{k}/cmdline").read_bytes().replace(b"\0", b" ")).decode(errors="replace")
            except OSError:
                continue
            out.append((k, cmd))
            todo.append(k)
    return out


def _let_run_python(who: list[Account]) -> list[tuple[Path, int]]:
    """This machine's Python may sit under a 0700 /root (pyenv): give the throwaway users passage
    (o+x, no listing) for the test's duration, as `start` itself tells an operator to do. Returns what
    to restore."""
    changed: list[tuple[Path, int]] = []
    for acct in who:
        for target in (Path(sys.executable), Path(sys.prefix)):
            while (stop := blocked(target, acct)) is not None:
                mode = stat.S_IMODE(stop.stat().st_mode)
                if mode & 0o001:
                    raise AssertionError(f"{stop} (mode {mode:o}) blocks {acct.name} for another reason")
                changed.append((stop, mode))
                stop.chmod(mode | 0o001)
    return changed


@pytest.fixture(scope="module")
def separated(lfw, pretrained_file):
    tag = secrets.token_hex(3)
    owner_name, node_name = f"ffvault{tag}", f"ffnode{tag}"
    owner, node = _useradd(owner_name), _useradd(node_name)
    restore = _let_run_python([node_account(owner_name), node_account(node_name)])
    # Not under pytest's basetemp (0700 root): the two users must be able to reach their own parts.
    root = Path(tempfile.mkdtemp(prefix="facefed-privsep-"))
    root.chmod(0o755)
    fed = Federation(root, ["north"])
    try:
        (names,) = pick_people(lfw, 1, 6)
        vault = build_vault(lfw, names, fed.site_dir("north"), max_images=4)
        write_policy(vault, Policy(delta=1e-3, max_epsilon=50.0))
        _chown_tree(vault, owner)
        _chown_tree(fed.site_dir("north") / "stores", owner)
        for d in (fed.site_dir("north") / "stores").iterdir():
            d.chmod(0o700)
        fed.setup(nodes=False)
        node_dir = root / "node-north"
        proc = fed.start_node("north", "--node-user", node_name, "--node-dir", str(node_dir))
        try:
            fed.wait_online(1, timeout=180)
        except RuntimeError as e:
            raise AssertionError(f"{e}:\n{proc.output()[-4000:]}") from None
        yield fed, owner, node, node_dir, proc
    finally:
        fed.stop_all()
        shutil.rmtree(root, ignore_errors=True)
        for path, mode in reversed(restore):
            path.chmod(mode)
        _userdel(owner_name)
        _userdel(node_name)


def test_the_supernode_runs_as_the_node_user_and_the_worker_as_the_vault_owner(separated, tmp_path):
    fed, owner, node, node_dir, proc = separated
    procs = _descendants(proc.popen.pid)
    supernodes = [p for p, cmd in procs if "flower-supernode" in cmd]
    workers = [p for p, cmd in procs if "facefed.client.site.worker" in cmd]
    assert supernodes and workers, procs
    assert {_uid_of(p) for p in supernodes} == {node.pw_uid}
    assert {_uid_of(p) for p in workers} == {owner.pw_uid}
    # Everything the SuperNode started (SuperExec, ClientApps) is the node user's too.
    under = [p for s in supernodes for p, _ in _descendants(s)]
    assert under and {_uid_of(p) for p in under} == {node.pw_uid}

    # A real round through the separated node: the ClientApp (node user) hands it to the worker.
    cfg = write_config(
        tmp_path / "fed.toml",
        rounds=1,
        min_sites=1,
        steps=2,
        probe_steps=1,
        sample_rate=0.5,
        noise=1.0,
        delta=1e-3,
        max_epsilon=50.0,
        max_pairs=100,
        wait_for_sites=60,
    )
    res = fed.train(cfg, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr + proc.output()[-3000:]
    with Ledger(fed.state / "ledger.sqlite") as ledger:
        (run,) = ledger.runs()
        (rnd,) = [r for r in ledger.rounds(run.run_id) if r.status == "committed"]
        assert rnd.participants == ["north"]
    # The worker wrote the site's files as the vault's owner; nothing under the vault is the node user's.
    vault = fed.vault("north")
    assert any((vault / "site").rglob("*.pt"))
    for p in [vault, *vault.rglob("*")]:
        assert p.lstat().st_uid == owner.pw_uid, p


def test_code_running_as_the_node_user_reads_nothing_and_gets_only_a_refusal(separated):
    fed, owner, node, node_dir, proc = separated
    vault = fed.vault("north")
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            HOSTILE,
            str(vault),
            str(vault / "site"),
            str(fed.site_dir("north") / "stores"),
            str(node_dir),
        ],
        user=node.pw_uid,
        group=node.pw_gid,
        extra_groups=[],
        env={**os.environ, "HOME": str(node_dir / "home")},
        capture_output=True,
        text=True,
        timeout=300,
        cwd="/",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["uid"] == node.pw_uid
    for what in ("vault_key", "vault_list", "vault_toml", "state_list", "heads", "accountant", "policy", "stores"):
        assert seen[what] == "PermissionError", (what, seen[what])
    assert seen["node_config"].startswith("GOT")  # paths only: readable, and nothing behind them is
    answer = seen["worker"]
    assert answer is not None and answer["kind"] == "refused", answer
    assert answer["refusal"] == "policy" and "noise" in answer["reason"], answer
    time.sleep(0.5)
    assert "round refused (policy)" in (fed.site_dir("north") / "vault" / "site" / "logs" / "worker.log").read_text()


def test_a_layout_the_node_user_could_read_is_refused_with_its_fix(separated):
    from facefed.client.site.privsep import PrivsepError, check, node_account, owner_of, prepare

    fed, owner, node, node_dir, proc = separated
    vault, state = fed.vault("north"), fed.vault("north") / "site"
    acct = node_account(node.pw_name)
    assert check(vault, state, acct).uid == owner.pw_uid
    vault.chmod(0o750)  # group-readable: refused, naming the chmod
    try:
        with pytest.raises(PrivsepError, match=r"chmod 700"):
            check(vault, state, acct)
    finally:
        vault.chmod(0o700)
    with pytest.raises(PrivsepError, match="the node user must own nothing"):
        check(vault, state, owner_of(vault))  # the vault's owner as the node user
    busy = Path(tempfile.mkdtemp(prefix="facefed-notnode-"))
    try:
        (busy / "precious.txt").write_text("x")  # a directory facefed did not make is never taken over
        with pytest.raises(PrivsepError, match="not a node directory facefed made"):
            prepare(busy, acct, owner_of(vault), config_text="", ca_cert=None, node_key=None)
        assert (busy / "precious.txt").read_text() == "x" and busy.stat().st_uid == 0
    finally:
        shutil.rmtree(busy)
