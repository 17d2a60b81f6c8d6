"""`make demo`, the main job: a federation of one server and three sites on real faces, ending with a
deletion request at one site.

1. `demo/federation.py`: three site vaults from disjoint LFW peopleDevTrain people (Shamir 2-of-3), the
   server and three site nodes as real processes on 127.0.0.1 with TLS and node authentication, a few
   rounds of per-person DP training, per-round LFW pairsDevTest accuracy and each site's epsilon.
2. At site `north`, the operator runs `facefed-client forget --person ID`: the person's shares are
   destroyed in every store, their rows leave every stored head checkpoint and the contribution log.
   The demo then scans every file the site has (share headers by owner tag, head checkpoints by row
   id, raw bytes of the manifest, request log and contribution log) to show nothing of them is left,
   and prints the request's stages with `forget status`.

LFW and the pretrained weights come from $FACEFED_LFW / $FACEFED_PRETRAINED (the Makefile points
them at ../shared when present). `python demo/vault_walkthrough.py` shows the vault on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "demo"))

import federation  # noqa: E402
from client.vault.sharefile import HEADER, ShareKeys  # noqa: E402
from common.paths import lfw_path, pretrained_path  # noqa: E402

WORKDIR = REPO / "demo-state" / "federation"
CLIENT = str(Path(sys.executable).with_name("facefed-client"))


def client(*args: str, quiet: bool = False) -> subprocess.CompletedProcess:
    print(f"\n$ facefed-client {shlex.join(args)}", flush=True)
    proc = subprocess.run([CLIENT, *args], cwd=REPO, text=True, capture_output=True)
    if not quiet or proc.returncode:
        sys.stdout.write(proc.stdout + proc.stderr)
    if proc.returncode:
        sys.exit(f"demo: `facefed-client {args[0]}` failed with exit code {proc.returncode}")
    return proc


def shares_of(vault: Path, stores: list[Path], pseudonym: str) -> dict[str, int]:
    """Share files of this person per store, found by the keyed owner tag in each share header."""
    owner = ShareKeys((vault / "key").read_bytes()).owner(pseudonym)
    return {s.name: sum(HEADER.unpack_from(f.read_bytes())[7] == owner for f in s.iterdir() if f.is_file())
            for s in stores}


def head_rows_of(state: Path, pseudonym: str, person: str) -> list[str]:
    """Stored head checkpoints that still hold a row for this person."""
    import torch

    hits = []
    for f in sorted(state.rglob("*.pt")):
        blob = torch.load(f, map_location="cpu", weights_only=True)
        ids = blob.get("ids", []) if isinstance(blob, dict) else []
        if pseudonym in ids or person in ids:
            hits.append(str(f.relative_to(state)))
    return hits


def files_mentioning(root: Path, *needles: str) -> list[str]:
    """Every file under `root` whose raw bytes contain one of the needles (SQLite free pages included)."""
    found = []
    for f in root.rglob("*"):
        if f.is_file():
            raw = f.read_bytes()
            if any(n.encode() in raw for n in needles):
                found.append(str(f.relative_to(root)))
    return found


def forget_one(site_dir: Path) -> None:
    vault, state = site_dir / "vault", site_dir / "vault" / "site"
    stores = sorted((site_dir / "stores").iterdir())
    listing = json.loads(client("vault", "ls", "--vault", str(vault), "--json", quiet=True).stdout)
    victim = max(listing["people"], key=lambda p: (p["images"], p["person_id"]))
    person, pseudonym = victim["person_id"], victim["pseudonym"]
    print(f"\n[demo] {person} asks site north to forget them: {victim['images']} images, pseudonym {pseudonym}")
    print(f"  shares per store before: {shares_of(vault, stores, pseudonym)}")
    print(f"  head checkpoints with their row before: {len(head_rows_of(state, pseudonym, person))}")

    started = time.perf_counter()
    client("forget", "--vault", str(vault), "--person", person, "--reason", "demo: request by the data subject")
    print(f"[demo] forget returned after {time.perf_counter() - started:.2f} s (process start included)")

    left_shares = shares_of(vault, stores, pseudonym)
    left_heads = head_rows_of(state, pseudonym, person)
    left_files = files_mentioning(site_dir, person)
    print(f"  shares per store after: {left_shares}")
    print(f"  head checkpoints with their row after: {left_heads or 'none'}")
    print(f"  files under {site_dir.relative_to(REPO)} containing {person!r}: {left_files or 'none'}")
    client("forget", "status", "--vault", str(vault))
    client("vault", "verify", "--vault", str(vault), quiet=True)
    if any(left_shares.values()) or left_heads or left_files:
        sys.exit("demo: something of the forgotten person is left on disk")
    print(f"\n[demo] OK: {person}'s shares are destroyed in all {len(stores)} stores, no head checkpoint or log "
          f"at the site holds them, and the vault verifies. The request waits at the site for the server's "
          f"exact-unlearning replay and signed receipt (not built yet: see README, Status).")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--people", type=int, default=40, help="people per site (default 40)")
    args = ap.parse_args()
    lfw_path(), pretrained_path()  # fail at once, saying where to put the data
    code = federation.main(["--workdir", str(WORKDIR), "--people", str(args.people)])
    if code:
        return code
    forget_one(WORKDIR / "sites" / "north")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    sys.exit(main())
