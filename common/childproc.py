"""Run a Flower process (flower-superlink / flower-supernode) in the foreground under our CLI.

Our CLI stays the parent so it can read the child's output and turn Flower's terse connection errors
into messages that say why and what to do. Three rules keep the pair from leaving orphans:
- the child gets PR_SET_PDEATHSIG (Linux): if our process dies, even by SIGKILL, the kernel sends the
  child SIGTERM;
- SIGTERM/SIGINT/SIGHUP sent to us are forwarded to the child, and we wait for it to exit;
- the child's own children (SuperExec, ServerApp/ClientApp processes) watch their parent's PID and
  exit when it goes (Flower's `--parent-pid` monitor).
"""

from __future__ import annotations

import ctypes
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import TextIO

PR_SET_PDEATHSIG = 1
STOP_GRACE_S = 15.0
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def plain(line: str) -> str:
    """A log line without terminal colour codes (log files are read with less, grep and editors)."""
    return ANSI.sub("", line)


def venv_bin() -> str:
    """Directory of this interpreter's scripts: Flower launches `flower-superexec`,
    `flwr-serverapp` and `flwr-clientapp` by name, so they must come from the same environment."""
    return str(Path(sys.executable).parent)


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: offline-safe, no telemetry, our venv first on PATH."""
    env = dict(os.environ)
    env["PATH"] = venv_bin() + os.pathsep + env.get("PATH", "")
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    # Flower checks PyPI for a newer release at start; there may be no network at a site.
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


def die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: the signal forwarding below still applies
        pass


def run_foreground(
    cmd: Sequence[str],
    env: Mapping[str, str],
    *,
    on_line: Callable[[str], str | None] | None = None,
    echo: TextIO | None = None,
    log_path: Path | None = None,
    quiet: Sequence[str] = (),
    as_user: tuple[int, int] | None = None,
) -> tuple[int, str | None]:
    """Run `cmd` until it exits; return (exit code, the first diagnosis `on_line` produced).

    Every output line is echoed (to `echo`, default stderr) and appended to `log_path`. `on_line`
    may return a diagnosis for a line (e.g. "node key not registered"); the first one is returned
    and, when the child keeps running after a fatal diagnosis, the child is stopped. Lines containing
    one of `quiet` (routine polling) are neither echoed nor logged; the log file gets no colour codes.
    `as_user` = (uid, gid): the child runs as that user, without supplementary groups (needs root).
    """
    echo = echo or sys.stderr
    proc = subprocess.Popen(
        list(cmd),
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        bufsize=1,
        preexec_fn=die_with_parent,  # runs after the uid change (a change of uid clears PDEATHSIG)
        user=None if as_user is None else as_user[0],
        group=None if as_user is None else as_user[1],
        extra_groups=None if as_user is None else [],
    )
    diagnosis: list[str] = []
    log = open(log_path, "a", encoding="utf-8") if log_path else None  # noqa: SIM115 - closed below

    def forward(signum: int, _frame: FrameType | None) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)

    previous = {
        s: signal.signal(s, forward)
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        if threading.current_thread() is threading.main_thread()
    }
    # Read in a thread: Flower's own children (SuperExec) inherit the pipe and can hold it open after
    # the child exits, so end-of-file cannot be what tells us the child is gone.
    lines: queue.Queue[str | None] = queue.Queue()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=reader, name="child-output", daemon=True).start()

    def handle(line: str) -> None:
        if quiet and any(q in line for q in quiet):
            return
        echo.write(line)
        echo.flush()
        if log:
            log.write(plain(line))
            log.flush()
        if on_line and not diagnosis:
            found = on_line(line)
            if found:  # every diagnosis is a refusal: stop rather than retry it forever
                diagnosis.append(found)
                if proc.poll() is None:
                    proc.terminate()

    try:
        exited_at = None
        while True:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                line = ""
            if line is None:
                break
            if line:
                handle(line)
            if proc.poll() is not None:
                exited_at = exited_at or time.monotonic()
                if time.monotonic() - exited_at > 1.0:  # drain what the child wrote last, then stop
                    break
        code = proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for s, h in previous.items():
            signal.signal(s, h)
        if log:
            log.close()
    return code, (diagnosis[0] if diagnosis else None)
