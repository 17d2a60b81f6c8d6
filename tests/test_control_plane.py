"""The control plane is closed (issue 11, item 2): real SuperLink (server/ops/linkd.py), real `flwr` CLI.

A hostile client holding only the federation's `ca.crt` (every site has it) points the stock `flwr`
CLI at the port the sites dial. It must not list, register or unregister nodes, submit a run, or reach
the Runtime API; the attempts are reported. A node key the SuperLink knows but facefed's ledger does
not (registered behind facefed's back) is unregistered by the reconciler, reported, and its node is
refused.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from federation_support import ROOT  # noqa: F401  (puts the repo root on sys.path for demo.federation)

from demo.federation import BIN, CLIENT, SERVER, Federation, free_port  # noqa: E402
from facefed.common.flwr_app import PYPROJECT  # noqa: E402

pytestmark = pytest.mark.slow
FLWR = str(BIN / "flwr")

# The hostile app names itself exactly as facefed's does (name, publisher): only its code differs.
HOSTILE_PYPROJECT = (
    PYPROJECT.replace("facefed.server.app:app", "hostile.server:app").replace(
        "facefed.client.site.app:app", "hostile.client:app"
    )
    + 'marker = ""\n'
)

# The hostile ServerApp: sends a train message to every node and records how each one answered.
HOSTILE_SERVER = """\
import json
from pathlib import Path
from flwr.app import Message, RecordDict
from flwr.serverapp import ServerApp
app = ServerApp()
@app.main()
def main(grid, context):
    marker = Path(context.run_config["marker"])
    marker.with_suffix(".server").write_text("the hostile ServerApp ran")
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in grid.get_node_ids()]
    replies = grid.send_and_receive(msgs, timeout=240)
    marker.with_suffix(".replies").write_text(
        json.dumps([r.error.reason if r.has_error() else "ok" for r in replies])
    )
"""

# The hostile ClientApp: tries to read the site's vault key and records what it saw.
HOSTILE_CLIENT = """\
import json, os, tomllib
from pathlib import Path
from flwr.clientapp import ClientApp
from flwr.app import Message, RecordDict
app = ClientApp()
@app.train()
def train(msg, context):
    seen = {"pid": os.getpid(), "uid": os.getuid(), "node_config": dict(context.node_config)}
    try:
        seen["key"] = (Path(context.node_config["vault"]) / "key").read_bytes().hex()
    except Exception as e:
        seen["key_error"] = repr(e)
    Path(context.run_config["marker"]).write_text(json.dumps(seen))
    return Message(RecordDict(), reply_to=msg)
"""


def hostile_app(root: Path) -> Path:
    app = root / "hostile-app"
    (app / "hostile").mkdir(parents=True, exist_ok=True)
    (app / "pyproject.toml").write_text(HOSTILE_PYPROJECT)
    (app / "hostile" / "__init__.py").write_text("")
    (app / "hostile" / "server.py").write_text(HOSTILE_SERVER)
    (app / "hostile" / "client.py").write_text(HOSTILE_CLIENT)
    return app


def flwr_json(home: Path, *args: str, timeout: float = 120) -> dict:
    proc = subprocess.run(
        [FLWR, *args, "--format", "json"],
        env={**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    out = proc.stdout
    try:
        return json.loads(out[out.find("{") :])
    except ValueError:
        return {"success": False, "error-message": out + proc.stderr, "returncode": proc.returncode}


def connection(home: Path, address: str, ca: Path) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "c"\n\n[superlink.c]\naddress = "{address}"\nroot-certificates = "{ca}"\n'
    )
    return home


def reports(fed: Federation) -> list[dict]:
    path = fed.state / "logs" / "control-plane.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    f = Federation(tmp_path_factory.mktemp("control"), ["north"])
    try:
        f.setup(nodes=False)
        yield f
    finally:
        f.stop_all()


def operator_nodes(fed: Federation) -> list[dict]:
    res = flwr_json(fed.state / "flwr", "supernode", "list")
    assert res.get("success"), res
    return res["nodes"]


def test_a_hostile_flwr_cli_with_ca_crt_gets_nothing_from_the_public_port(fed, tmp_path):
    hostile = connection(tmp_path / "hostile-home", fed.address, fed.tls / "ca.crt")
    (north,) = [n for n in operator_nodes(fed) if n.get("status") != "unregistered"]

    listed = flwr_json(hostile, "supernode", "list")
    assert listed.get("success") is False and "nodes" not in listed

    fed.run(CLIENT, "keygen", "--out", str(tmp_path / "rogue"))
    reg = flwr_json(hostile, "supernode", "register", str(tmp_path / "rogue" / "node.pub"), "--name", "rogue")
    assert reg.get("success") is False, reg

    unreg = flwr_json(hostile, "supernode", "unregister", str(north["node-id"]))
    assert unreg.get("success") is False, unreg

    marker = tmp_path / "pwned"
    run = flwr_json(hostile, "run", str(hostile_app(tmp_path)), "--run-config", f'marker="{marker}"')
    assert run.get("success") is False and "run-id" not in run, run

    # The Runtime API (what a ServerApp uses to push and pull site messages) is not there either.
    ctx = ssl.create_default_context(cafile=str(fed.tls / "ca.crt"))
    for path in ("/v1/runtime/get-run", "/v1/control/list-runs", "/docs"):
        req = urllib.request.Request(f"https://{fed.address}{path}", data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, context=ctx, timeout=30)
        assert err.value.code == 403, path

    # Nothing changed: north is still registered (and still the only node), no run exists, nothing ran.
    nodes = [n for n in operator_nodes(fed) if n.get("status") != "unregistered"]
    assert [n["node-id"] for n in nodes] == [north["node-id"]]
    runs = flwr_json(fed.state / "flwr", "ls")
    assert runs.get("success") and runs.get("runs", []) == [], runs
    assert not marker.exists() and not marker.with_suffix(".server").exists()
    refused = {r["path"] for r in reports(fed) if r["event"] == "public-port-refused"}
    assert {"/v1/control/list-nodes", "/v1/control/register-node", "/v1/runtime/get-run"} <= refused, refused
    # The operator's own commands keep working (they use the loopback control port).
    ls = fed.run(SERVER, "sites", "ls", "--state", str(fed.state)).stdout
    row = next(line for line in ls.splitlines() if "north" in line)
    assert "register" in row or "online" in row or "offline" in row, ls


def test_an_unknown_node_key_is_unregistered_reported_and_refused(fed, tmp_path):
    """A key registered with the SuperLink behind facefed's back (here through the operator's own
    control port, as a compromised older server would have it) does not stay."""
    fed.run(CLIENT, "keygen", "--out", str(tmp_path / "rogue"))
    res = flwr_json(fed.state / "flwr", "supernode", "register", str(tmp_path / "rogue" / "node.pub"), "--name", "x")
    assert res.get("success"), res
    rogue_id = str(res["node-id"])
    deadline = time.monotonic() + 90  # a key gets REGISTER_GRACE_S (20 s) for the ledger to catch up
    while not any(r.get("node_id") == rogue_id for r in reports(fed) if r["event"] == "unknown-node-unregistered"):
        assert time.monotonic() < deadline, reports(fed)
        time.sleep(1)
    live = {str(n["node-id"]) for n in operator_nodes(fed) if n.get("status") != "unregistered"}
    assert rogue_id not in live and len(live) == 1  # north only
    (rec,) = [r for r in reports(fed) if r.get("node_id") == rogue_id]
    assert rec["name"] == "x" and rec["fingerprint"].startswith("SHA256:")

    # Its SuperNode is refused (at the server: its own vault is a real one).
    vault = empty_vault(tmp_path / "rogue-site")
    out = fed.run(
        CLIENT,
        "start",
        "--site",
        "x",
        "--vault",
        str(vault),
        "--server",
        fed.address,
        "--root-cert",
        str(fed.tls / "ca.crt"),
        "--key",
        str(tmp_path / "rogue" / "node.key"),
        "--state",
        str(tmp_path / "st"),
        "--runtime-port",
        str(free_port()),
        "--max-retries",
        "1",
        "--no-worker",
        "--activation-wait",
        "0",
        timeout=120,
        check=False,
    )
    assert out.returncode != 0 and "not registered" in out.stderr, out.stderr[-2000:]


def empty_vault(root: Path) -> Path:
    """A real (empty) 2-of-3 vault under `root`: `facefed-client start` refuses anything else."""
    from facefed.client.vault import Vault

    stores = [root / f"store{i}" for i in range(3)]
    for store in stores:
        store.mkdir(parents=True)
    Vault.create(root / "vault", [str(s) for s in stores], 2).close()
    return root / "vault"


def test_a_run_of_foreign_code_is_refused_at_the_site_before_any_of_it_is_imported(fed, tmp_path):
    """The server is not trusted: here it (through its operator's own control port) submits an app
    whose ClientApp reads the site's vault key. The site's `flwr-clientapp` (client/site/guard.py)
    refuses the FAB; the code never runs, the key is not read, and the server gets an error reply."""
    vault = empty_vault(fed.site_dir("north"))
    secret = (vault / "key").read_bytes()
    node = fed.start_node("north", "--no-worker", "--state", str(fed.site_dir("north") / "site"))
    fed.wait_online(1, timeout=120)
    marker = tmp_path / "stolen.json"
    res = flwr_json(fed.state / "flwr", "run", str(hostile_app(tmp_path)), "--run-config", f'marker="{marker}"')
    assert res.get("success"), res
    replies = marker.with_suffix(".replies")
    deadline = time.monotonic() + 300
    while not replies.exists():
        assert time.monotonic() < deadline, node.output()[-3000:]
        time.sleep(1)
    (reply,) = json.loads(replies.read_text())
    assert reply != "ok" and "not facefed's own" in reply, reply
    assert not marker.exists()  # the hostile ClientApp never ran: nothing read, nothing written
    assert "refused a run whose app" in node.output()
    apps = fed.site_dir("north") / "site" / "flwr" / "apps"
    assert not apps.exists() or not list(apps.rglob("*.py"))  # nothing of the FAB was unpacked
    for f in fed.site_dir("north").rglob("*"):
        if f.is_file() and f != vault / "key":
            assert secret.hex().encode() not in f.read_bytes(), f
