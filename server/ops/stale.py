"""Flower processes a crashed server left behind, stopped before a new SuperLink starts.

`flower-superlink` starts `flower-superexec` in a session of its own (Flower's
`get_popen_detach_kwargs`), and that SuperExec starts each run's `flwr-serverapp` in the same
session. Killing the server (SIGKILL, an OOM kill) does not kill them: they notice their parent is
gone only through Flower's parent monitor (`kill(pid, 0)`), which a dead parent nobody reaped (a
zombie, under an init or child subreaper that does not reap) passes forever. Meanwhile a ServerApp
keeps holding its run's lock (server/runs.py), and the resumed run's new ServerApp fails waiting for
it. So `facefed-server start` stops them first, by process group, and says so; the SuperLink process
(server/ops/linkd.py) does the same for its own when it stops.

They are found by what the previous server recorded (STATE/server.json): its Control/Runtime address,
which every SuperExec and ServerApp of that server was started with (`--runtime-api-address`). The
address is on loopback with a port picked per start, so no other server's processes match.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

FLOWER_SERVER_SIDE = ("flower-superexec", "flwr-serverapp")


@dataclass(frozen=True)
class StaleProcess:
    pid: int
    pgid: int
    name: str  # flower-superexec / flwr-serverapp


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def find_stale(runtime_address: str) -> list[StaleProcess]:
    """Flower's server-side processes started against `runtime_address` (host:port), still alive."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        args = _cmdline(int(entry.name))
        name = next((n for n in FLOWER_SERVER_SIDE for a in args[:3] if Path(a).name == n), None)
        flag = "--runtime-api-address"
        pairs = list(zip(args, args[1:], strict=False))
        if name is None or not ((flag, runtime_address) in pairs or f"{flag}={runtime_address}" in args):
            continue
        try:
            found.append(StaleProcess(int(entry.name), os.getpgid(int(entry.name)), name))
        except ProcessLookupError:
            continue  # exited meanwhile
    return found


def stop_stale(
    runtime_address: str, *, grace_s: float = 15.0, log: Callable[[str], None] = print
) -> list[StaleProcess]:
    """SIGTERM the process groups of `find_stale` (a ServerApp ends gracefully: Flower's handler
    raises SystemExit, and the ServerApp records its run as interrupted), SIGKILL what is left after
    `grace_s`. Returns what was found."""
    stale = find_stale(runtime_address)
    if not stale:
        return []
    log(
        f"stopping {len(stale)} Flower process(es) left running by the SuperLink of {runtime_address} "
        f"({', '.join(f'{p.name} pid {p.pid}' for p in stale)})"
    )
    groups = {p.pgid for p in stale}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for g in groups:
            try:
                os.killpg(g, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline and find_stale(runtime_address):
            time.sleep(0.2)
        if not find_stale(runtime_address):
            break
    return stale
