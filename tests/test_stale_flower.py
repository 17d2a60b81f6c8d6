"""`facefed-server start` stops the Flower processes a killed server left running (server/ops/stale.py).

Real processes named as Flower names them (`flower-superexec`, `flwr-serverapp`), in a session of
their own as Flower starts them: the ones started against the previous server's runtime address are
stopped by process group, a ServerApp child included; one started against another address survives.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from facefed.server.ops.stale import find_stale, stop_stale

# A stand-in SuperExec that starts a stand-in ServerApp in its own process group, then both sleep.
SUPEREXEC = """
import subprocess, sys, time
child = sys.argv[0].replace("flower-superexec", "flwr-serverapp")
subprocess.Popen([sys.executable, child, "--runtime-api-address", sys.argv[2], "--token", "t"])
time.sleep(600)
"""
SERVERAPP = "import time\ntime.sleep(600)\n"


def _script(tmp: Path, name: str, body: str) -> Path:
    p = tmp / name
    p.write_text(f"#!{sys.executable}\n{body}")
    p.chmod(0o755)
    return p


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/cmdline").read_bytes() != b""  # a zombie is not running


def test_the_previous_servers_flower_processes_are_stopped_and_no_one_elses(tmp_path):
    old, other = "127.0.0.1:1", "127.0.0.1:2"
    procs = []
    for addr, sub in ((old, "a"), (other, "b")):
        d = tmp_path / sub
        d.mkdir()
        _script(d, "flwr-serverapp", SERVERAPP)
        exe = _script(d, "flower-superexec", SUPEREXEC)
        procs.append(subprocess.Popen([str(exe), "--runtime-api-address", addr], start_new_session=True))
    try:
        deadline = time.monotonic() + 30
        while len(find_stale(old)) < 2 or len(find_stale(other)) < 2:
            assert time.monotonic() < deadline, (find_stale(old), find_stale(other))
            time.sleep(0.1)
        found = find_stale(old)
        assert sorted(p.name for p in found) == ["flower-superexec", "flwr-serverapp"]
        assert {p.pgid for p in found} == {procs[0].pid}  # the ServerApp is in the SuperExec's group

        lines: list[str] = []
        stopped = stop_stale(old, grace_s=5, log=lines.append)
        assert {p.pid for p in stopped} == {p.pid for p in found}
        assert len(lines) == 1 and "2 Flower process(es)" in lines[0] and "flwr-serverapp" in lines[0]
        assert procs[0].wait(timeout=10) == -signal.SIGTERM
        assert not any(_alive(p.pid) for p in found) and find_stale(old) == []
        # The other server's processes are untouched.
        assert procs[1].poll() is None and len(find_stale(other)) == 2
        assert stop_stale(old, log=lines.append) == [] and len(lines) == 1  # nothing left: silent
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
