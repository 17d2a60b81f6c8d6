"""Run share holders as child processes (`facefed-client store serve`): for demos, benchmarks, tests.

Not part of the holder daemon itself (nothing in service/front/disk imports it): tests/test_remote_store_e2e.py,
bench/remote_stores.py and the demos use it to start real holders on one machine.

Each holder is its own process, optionally inside a network namespace (`ip netns exec NS ...`, which
execs in place, so the PID we hold is the holder's). Processes are stopped by their own PIDs.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

_READY_RE = re.compile(r"listening on (\S+):(\d+)$")


def client_command() -> list[str]:
    """`facefed-client` of this environment (the console script beside the interpreter, else -m)."""
    script = Path(sys.executable).with_name("facefed-client")
    return [str(script)] if script.exists() else [sys.executable, "-m", "facefed.client.cli.main"]


@dataclass
class HolderProcess:
    directory: Path
    host: str
    port: int
    tls_dir: Path
    log_path: Path
    netns: str | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _out: bytes = field(default=b"", repr=False)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"grpcs://{host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 60.0) -> HolderProcess:
        """Start (or restart on the same address) and wait for its ready line."""
        self.launch()
        return self.wait_ready(timeout)

    def launch(self) -> None:
        if self.alive():
            raise RuntimeError(f"holder {self.url} already runs (pid {self.pid})")
        cmd = client_command() + [
            "store",
            "serve",
            "--dir",
            str(self.directory),
            "--listen",
            f"{self.host}:{self.port}",
            "--tls-dir",
            str(self.tls_dir),
        ]
        if self.netns:
            cmd = [shutil.which("ip") or "ip", "netns", "exec", self.netns] + cmd
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        self._out = b""

    def wait_ready(self, timeout: float = 60.0) -> HolderProcess:
        assert self.proc is not None and self.proc.stdout is not None, "launch() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = self.proc.stdout.read()
            if chunk:
                self._out += chunk
                m = _READY_RE.search(self._out.decode(errors="replace").strip())
                if m:
                    self.port = int(m.group(2))
                    return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"holder on {self.host}:{self.port} did not start: {self.log()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL: the holder dies as a crashed or powered-off host would."""
        self._signal(signal.SIGKILL, 5.0)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not ended within 10 s."""
        if not self._signal(signal.SIGTERM, 10.0):
            self._signal(signal.SIGKILL, 5.0)

    def _signal(self, sig: int, wait: float) -> bool:
        if self.proc is None:
            return True
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                return False
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None
        return True


def start_all(holders: list[HolderProcess], timeout: float = 60.0) -> list[HolderProcess]:
    """Start several holders at once (their start-up overlaps); on any failure all are stopped."""
    try:
        for h in holders:
            h.launch()
        for h in holders:
            h.wait_ready(timeout)
    except BaseException:
        for h in holders:
            h.stop()
        raise
    return holders
