#!/opt/facefed/bin/python
"""Container healthcheck: exit 0 when something in this container listens on each TCP port given.

Reads /proc/net/tcp and /proc/net/tcp6 instead of connecting, so a TLS server (the SuperLink, a
share holder) logs no refused handshake every interval. Usage: facefed-healthcheck PORT [PORT...]
"""

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
        except FileNotFoundError:
            pass
    return ports


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: facefed-healthcheck PORT [PORT...]", file=sys.stderr)
        return 2
    up = listening()
    missing = [p for p in map(int, argv) if p not in up]
    if missing:
        print(f"not listening on {', '.join(map(str, missing))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
