"""docker/: the compose file's trust boundaries (read statically, no engine needed), the healthcheck,
and `make docker-test` end to end (slow, opt-in: FACEFED_DOCKER_TEST=1, and an engine that runs or
can be started; CI runs `make docker-test` as its own step in .ci/run)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
SITES = ("north", "south", "east")
HOLDERS = 3


@pytest.fixture(scope="module")
def compose() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((DOCKER / "compose.yml").read_text())


def _mounts(service: dict) -> list[tuple[str, str, bool]]:
    """(source, destination, read-only) per volume entry; `${VAR:-default}` reads as `$VAR`."""
    out = []
    for v in service.get("volumes", []):
        parts = re.sub(r"\$\{([A-Z_]+)(:-[^}]*)?\}", r"$\1", v).split(":")
        out.append((parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
    return out


def test_services_and_volumes(compose):
    services = compose["services"]
    expected = {"server"} | {s for site in SITES for s in (site, f"{site}-init")}
    expected |= {f"{site}-holder{i}" for site in SITES for i in range(1, HOLDERS + 1)}
    assert set(services) == expected
    # n shares of a face lie in n volumes, each mounted by exactly one holder
    for site in SITES:
        share_volumes = [f"{site}-shares{i}" for i in range(1, HOLDERS + 1)]
        for vol in share_volumes:
            users = [name for name, s in services.items() if any(src == vol for src, _, _ in _mounts(s))]
            assert users == [f"{site}-holder{share_volumes.index(vol) + 1}"], (vol, users)
        vault_users = {name for name, s in services.items() if any(src == f"{site}-vault" for src, _, _ in _mounts(s))}
        assert vault_users == {site, f"{site}-init"}


def test_every_service_is_hardened(compose):
    for name, s in compose["services"].items():
        assert s.get("read_only") is True, name
        assert s.get("cap_drop") == ["ALL"], name
        assert "/tmp" in s.get("tmpfs", []), name
        assert "user" not in s, f"{name} overrides the image's non-root user"


def test_secrets_go_only_where_needed(compose):
    for name, s in compose["services"].items():
        for src, dest, ro in _mounts(s):
            assert "offline" not in src and "ca.key" not in src, f"{name} mounts {src}"
            if "FACEFED_SECRETS" in src:
                assert ro, f"{name}: {dest} is not read-only"
                folder = src.split("$FACEFED_SECRETS/", 1)[1]
                owner = folder.split("/")[0]
                # a service mounts only its own folder (a site's init shares the site's store bundle)
                assert owner == name.removesuffix("-init"), f"{name} mounts {folder}"
        if "holder" in name:
            assert len(_mounts(s)) == 2 and "networks" in s and len(s["networks"]) == 1, name


def test_holders_are_reachable_only_from_their_site(compose):
    services, networks = compose["services"], compose["networks"]
    for site in SITES:
        net = f"{site}-stores"
        assert networks[net].get("internal") is True
        on_net = {n for n, s in services.items() if net in s.get("networks", [])}
        assert on_net == {site, f"{site}-init"} | {f"{site}-holder{i}" for i in range(1, HOLDERS + 1)}
    assert "federation" not in str(
        [s.get("networks") for n, s in services.items() if "holder" in n or n.endswith("-init")]
    )


def test_server_publishes_only_the_fleet_port(compose):
    # `facefed-server start --port 8000` serves the Fleet API only there; the Control and Runtime
    # APIs get a loopback port inside the container (server/ops/linkd.py), never published
    server = compose["services"]["server"]
    cmd = server["command"]
    assert cmd[:2] == ["facefed-server", "start"] and cmd[cmd.index("--port") + 1] == "8000"
    assert "--control-port" not in cmd and "--insecure" not in cmd
    assert [p.rsplit(":", 1)[1] for p in server["ports"]] == ["8000"]
    assert all("ports" not in s for name, s in compose["services"].items() if name != "server")


def test_sites_pin_the_server_receipt_key(compose):
    for site in SITES:
        cmd = compose["services"][site]["command"]
        assert cmd[cmd.index("--receipt-key") + 1] == "/federation/receipts.pub", site
        assert any(d == "/federation" and ro for _, d, ro in _mounts(compose["services"][site])), site
    assert 'copy "$site/federation" $F/ca.crt $F/receipts.pub' in (DOCKER / "secrets.sh").read_text()


def test_no_data_weights_or_secrets_in_the_build_context():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {"**/*.tgz", "**/*.pth", "**/*.pt", "**/*.key", "**/*.sqlite*", ".git", "tests", "demo-state"} <= ignored
    assert "docker/*" in ignored  # compose secrets and photos (docker/secrets, docker/photos) stay out


def docker_commands() -> list[tuple[str, list[str], list[str]]]:
    """(cli, subcommand words, options) of every facefed-server/-client command line that docker/
    runs or shows: compose.yml's commands, site-init.sh, secrets.sh and docker/README.md's bash blocks."""
    yaml = pytest.importorskip("yaml")
    lines = []
    for f in ("compose.yml", "compose.holders.yml"):
        for svc in yaml.safe_load((DOCKER / f).read_text())["services"].values():
            if isinstance(svc.get("command"), list):
                lines.append(" ".join(svc["command"]))
    for f in ("site-init.sh", "secrets.sh"):
        lines += re.sub(r"\\\n\s*", " ", (DOCKER / f).read_text()).splitlines()
    for block in re.findall(r"```bash\n(.*?)```", (DOCKER / "README.md").read_text(), re.S):
        lines += re.sub(r"\\\n\s*", " ", block).splitlines()
    out = []
    for line in lines:
        m = re.search(r"(facefed-(?:server|client))\s+(.*)", line.split("#", 1)[0])
        if not m:
            continue
        cmd = []
        for w in m.group(2).split():
            if w.startswith(("-", "$", '"', "'", "<", ">", "|")) or w.isupper() or "/" in w or "." in w:
                break
            cmd.append(w)
        out.append((m.group(1), cmd, re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", m.group(2))))
    return out


def test_docker_commands_match_the_cli():
    """The CLI moves (e.g. `start --receipt-key`, `policy`): what docker/ runs must still exist."""
    from typer.testing import CliRunner

    from facefed.client.cli.main import app as client_cli
    from facefed.server.cli.main import app as server_cli

    clis = {"facefed-server": server_cli, "facefed-client": client_cli}
    commands = docker_commands()
    shown = {(cli, " ".join(cmd)) for cli, cmd, _ in commands}
    assert {("facefed-server", "start"), ("facefed-client", "start"), ("facefed-client", "store serve")} <= shown
    assert {
        ("facefed-client", "vault add"),
        ("facefed-client", "policy show"),
        ("facefed-client", "receipts verify"),
    } <= shown
    for cli, cmd, opts in commands:
        res = CliRunner().invoke(clis[cli], [*cmd[:2], "--help"], env={"COLUMNS": "200"}, terminal_width=200)
        assert res.exit_code == 0, f"{cli} {' '.join(cmd)}: {res.output[-500:]}"
        for opt in opts:
            assert opt in res.output, f"docker/ runs `{cli} {' '.join(cmd)} {opt}`, which --help does not list"


def test_site_init_script_parses():
    shell = shutil.which("sh")
    assert shell
    for script in ("site-init.sh", "secrets.sh"):
        subprocess.run([shell, "-n", str(DOCKER / script)], check=True)


def test_healthcheck_sees_a_listening_port(monkeypatch):
    spec = importlib.util.spec_from_file_location("facefed_healthcheck", DOCKER / "healthcheck.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not Path("/proc/net/tcp").exists():
        pytest.skip("no /proc/net/tcp (not Linux)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert mod.main([str(port)]) == 1  # bound, not listening
        s.listen()
        assert mod.main([str(port)]) == 0
        monkeypatch.setenv("FACEFED_HEALTH_PORT", str(port))
        assert mod.main([]) == 0
    # with no port given, the port of the command the container runs; one-shot commands are healthy
    py, bin_ = "/opt/facefed/bin/python", "/opt/facefed/bin/"
    assert mod.service_port([py, bin_ + "facefed-server", "start", "--state", "/state", "--port", "8001"]) == 8001
    assert mod.service_port([py, bin_ + "facefed-client", "store", "serve", "--listen", "0.0.0.0:7001"]) == 7001
    assert mod.service_port([py, bin_ + "facefed-client", "start", "--site", "north"]) == 9094
    assert mod.service_port(["/bin/sh", bin_ + "facefed-site-init"]) is None
    assert mod.service_port([py, bin_ + "facefed-server", "certs", "--out", "x"]) is None


def _engine_reason() -> str | None:
    """Why `make docker-test` cannot run here, or None."""
    if not os.environ.get("FACEFED_DOCKER_TEST"):
        return "set FACEFED_DOCKER_TEST=1 to run `make docker-test` (about 15 min; CI runs it in .ci/run)"
    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        return None
    tool = Path(os.environ.get("SHARED", REPO.parent / "shared")) / "tools" / "docker-engine"
    if tool.exists() and os.geteuid() == 0:
        return None
    return f"no Docker engine: `docker info` fails and {tool} cannot start one (missing, or not root)"


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_make_docker_test():
    reason = _engine_reason()
    if reason:
        pytest.skip(reason)
    proc = subprocess.run(["make", "-C", str(REPO), "docker-test"], capture_output=True, text=True, timeout=2300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "docker-test: PASSED" in proc.stdout
