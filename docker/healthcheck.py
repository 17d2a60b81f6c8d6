#!/opt/facefed/bin/python
"""Container healthcheck: exit 0 when the container's service listens on its TCP port.

    facefed-healthcheck [PORT...]

With no PORT (the image's HEALTHCHECK), the port comes from $FACEFED_HEALTH_PORT, else from the
facefed command this container runs: `facefed-server start` -> --port (8000), `facefed-client store
serve` -> the --listen port, `facefed-client start` -> --runtime-port (9094, the node's runtime API).
Anything else (the site init, `certs`, `keygen`: one-shot commands) counts as healthy.

It reads /proc/net/tcp{,6} instead of connecting, so a TLS service (the SuperLink, a share holder)
logs no refused handshake every interval.
"""

from __future__ import annotations

import os
import sys

LISTEN = "0A"


def listening() -> set[int]:
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == LISTEN:
                        ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        except (FileNotFoundError, StopIteration):
            pass
    return ports


def _option(args: list[str], name: str, default: str) -> str:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return default


def service_port(argv: list[str]) -> int | None:
    """The port the facefed command in `argv` serves, or None for a one-shot command."""
    names = [os.path.basename(a) for a in argv[:2]]
    if "facefed-server" in names:
        args = argv[names.index("facefed-server") + 1 :]
        return int(_option(args, "--port", "8000")) if args[:1] == ["start"] else None
    if "facefed-client" in names:
        args = argv[names.index("facefed-client") + 1 :]
        if args[:2] == ["store", "serve"]:
            return int(_option(args, "--listen", ":7001").rsplit(":", 1)[1])
        if args[:1] == ["start"]:
            return int(_option(args, "--runtime-port", "9094"))
    return None


def main_command() -> list[str]:
    """The command line of the container's main process (PID 1, or the first facefed process)."""
    pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        heads = [os.path.basename(a) for a in argv[:2]]
        if any(h.startswith("facefed-") and h != "facefed-healthcheck" for h in heads):
            return argv
    return []


def main(argv: list[str]) -> int:
    if argv:
        ports = [int(p) for p in argv]
    elif os.environ.get("FACEFED_HEALTH_PORT"):
        ports = [int(os.environ["FACEFED_HEALTH_PORT"])]
    else:
        port = service_port(main_command())
        if port is None:
            return 0
        ports = [port]
    missing = [p for p in ports if p not in listening()]
    if missing:
        print(f"not listening on {', '.join(map(str, missing))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
