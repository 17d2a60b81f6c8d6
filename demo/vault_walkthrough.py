"""A site's face vault on its own, from import to a verified erasure (`python demo/vault_walkthrough.py`).

Drives the real `facefed-client` CLI as subprocesses and prints every command it runs:
  1. a fresh vault under ./demo-state/ over three store directories, any 2 of which rebuild an image;
  2. import site 0 of 3 of LFW peopleDevTrain (a bounded number of people), list it, verify it;
  3. (with --lose-a-store) wipe a whole store, show verify reports it, repair regenerates it;
  4. erase one person, then scan every store's share headers and the manifest's raw bytes to show
     nothing of them is left, and verify the audit chain.
LFW comes from $FACEFED_LFW (the Makefile points it at ../shared when present).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from facefed.client.vault.sharefile import HEADER, ShareKeys  # noqa: E402
from facefed.common.paths import lfw_path  # noqa: E402

STATE = REPO / "demo-state"
VAULT = STATE / "vault"
STORES = [STATE / "stores" / f"disk{i}" for i in (1, 2, 3)]


def cli() -> list[str]:
    script = Path(sys.executable).with_name("facefed-client")
    return [str(script)] if script.exists() else [sys.executable, "-m", "facefed.client.cli.main"]


def show(path: Path | str) -> str:
    p = Path(path)
    return str(p.relative_to(REPO)) if p.is_absolute() and p.is_relative_to(REPO) else str(p)


def run(*args: str, expect: int = 0, quiet: bool = False) -> subprocess.CompletedProcess:
    print(f"\n$ facefed-client {shlex.join(args)}", flush=True)
    proc = subprocess.run(cli() + list(args), cwd=REPO, text=True, capture_output=True)
    if not quiet:
        sys.stdout.write(proc.stdout)
    sys.stdout.write(proc.stderr if proc.returncode else "")
    if proc.returncode != expect:
        sys.exit(f"demo: expected exit code {expect}, got {proc.returncode}")
    return proc


def step(title: str) -> None:
    print(f"\n=== {title}")


def scan(person: str, pseudonym: str) -> dict[str, int]:
    """Share files of this person in every store (found by the keyed owner tag in each header)."""
    owner = ShareKeys((VAULT / "key").read_bytes()).owner(pseudonym)
    found = {}
    for store in STORES:
        count = 0
        for f in store.iterdir():
            fields = HEADER.unpack_from(f.read_bytes())
            count += fields[7] == owner
        found[show(store)] = count
    return found


def manifest_mentions(*needles: str) -> list[str]:
    raw = (VAULT / "manifest.sqlite").read_bytes()
    return [n for n in needles if n.encode() in raw]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-people", type=int, default=40, help="people to import (default 40)")
    ap.add_argument("--lose-a-store", action="store_true", help="also wipe a store and repair it")
    args = ap.parse_args()
    lfw = lfw_path()  # fails with instructions when LFW is not configured
    v, stores = show(VAULT), ",".join(show(s) for s in STORES)

    step("a fresh vault over three stores (think: three disks), threshold 2")
    for path in (VAULT, STATE / "stores"):
        shutil.rmtree(path, ignore_errors=True)
    for s in STORES:
        s.mkdir(parents=True)
    run("vault", "init", "--vault", v, "--stores", stores, "--threshold", "2")

    step("import this site's share of LFW peopleDevTrain, list, verify")
    run(
        "vault",
        "import",
        "--vault",
        v,
        "--lfw",
        str(lfw),
        "--people",
        "peopleDevTrain.txt",
        "--site-index",
        "0",
        "--num-sites",
        "3",
        "--min-images",
        "2",
        "--max-people",
        str(args.max_people),
    )
    listing = json.loads(run("vault", "ls", "--vault", v, "--json", quiet=True).stdout)
    people = sorted(listing["people"], key=lambda p: -p["images"])
    print(
        f"{len(people)} people, {sum(p['images'] for p in people)} images; most images: "
        + ", ".join(f"{p['person_id']} ({p['images']})" for p in people[:5])
    )
    run("vault", "verify", "--vault", v)

    if args.lose_a_store:
        step("a store is lost: verify reports it, repair regenerates it from the other two")
        shutil.rmtree(STORES[1])
        STORES[1].mkdir()  # a blank replacement disk
        print(f"(removed every share in {show(STORES[1])})")
        run("vault", "verify", "--vault", v, expect=1, quiet=True)
        print("verify exit code 1: missing shares in", show(STORES[1]))
        run("vault", "repair", "--vault", v)

    step("erase one person and show that nothing of them is left")
    victim = people[0]
    person, pseudonym = victim["person_id"], victim["pseudonym"]
    before = scan(person, pseudonym)
    print(f"{person} (pseudonym {pseudonym}): {victim['images']} images; their shares per store: {before}")
    print(f"manifest mentions: {manifest_mentions(person, pseudonym)}")
    if any(c != victim["images"] for c in before.values()):
        sys.exit("demo: expected one share per image in every store before the erasure")
    run("vault", "erase", "--vault", v, "--person", person, "--request-id", "demo-erasure-1")
    after = scan(person, pseudonym)
    left = manifest_mentions(person, pseudonym)
    leftovers = [p for p in STATE.rglob("*") if p.is_file() and person in p.name]
    print(f"after the erasure, their shares per store: {after}")
    print(f"manifest mentions of {person!r} or their pseudonym: {left or 'none'}")
    print(f"files named after them anywhere under {show(STATE)}: {leftovers or 'none'}")
    last = (VAULT / "audit.log").read_text().splitlines()[-1]
    print(f"audit log, last entry: {last}")
    if any(after.values()) or left or leftovers or person in (VAULT / "audit.log").read_text():
        sys.exit("demo: something of the erased person is left")
    run("vault", "verify", "--vault", v)
    print(
        f"\ndemo OK: {len(people) - 1} people remain in {v}; {person} is gone from every store and the "
        f"manifest, and the audit log records the erasure under the pseudonym only."
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    sys.exit(main())
