"""`make demo`, the main job: a federation of one server and three sites on real faces, ending with a
deletion request at one site, the server's exact-unlearning replay, and the signed receipt verified.

1. `demo/federation.py`: three site vaults from disjoint LFW peopleDevTrain people (~395 each, Shamir
   2-of-3), the server and three site nodes as real processes on 127.0.0.1 with TLS and node
   authentication, a few rounds of per-person DP training, per-round LFW accuracy (View 2 pairs of
   people no site holds) and each site's epsilon.
2. At site `north`, the operator runs `facefed-client forget --person ID`: the person's shares are
   destroyed in every store, their rows leave every stored head checkpoint and the contribution log.
   The demo scans every file the site has (share headers by owner tag, head checkpoints by row id, raw
   bytes of the manifest, request log and contribution log) to show nothing of them is left.
3. The server operator runs `facefed-server unlearn`: the server learns of the request from the site,
   rolls the model back to before the person's first round, replays the rounds without them (a new
   release: the sites' epsilon grows, and is shown), deletes the checkpoints that carried them, and
   signs a receipt that the site stores (`facefed-client forget status`).
4. `facefed-server receipts verify` checks the receipt's signature and lineage against the ledger; a
   tampered copy fails.
5. `facefed-server export --model current` writes the model to use, and `facefed-server report` writes
   the HTML report (accuracy and epsilon per round, ROC, the request's timeline) whose path it prints.

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
from federation import SERVER, Federation, files_mentioning, head_rows_of, shares_of  # noqa: E402

from facefed.common.paths import lfw_path, pretrained_path  # noqa: E402
from facefed.server.ledger.db import Ledger  # noqa: E402

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


def forget_one(site_dir: Path) -> tuple[str, str, str]:
    """Forget the person with the most images at this site; (person id, pseudonym, request id)."""
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
    print(
        f"\n[demo] OK: {person}'s shares are destroyed in all {len(stores)} stores, no head checkpoint or log "
        f"at the site holds them, and the vault verifies. The request waits at the site (stage data_erased) "
        f"for the server's replay."
    )
    status = json.loads(client("forget", "status", "--vault", str(vault), "--json", quiet=True).stdout)
    return person, pseudonym, status[-1]["request_id"]


def server(fed: Federation, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
    """Run a `facefed-server` command, its output streamed as it comes (a replay takes minutes)."""
    print(f"\n$ facefed-server {shlex.join(args)}", flush=True)
    proc = subprocess.run([SERVER, *args], env=fed._env(), text=True, stderr=subprocess.STDOUT, timeout=1800)
    if proc.returncode != expect:
        sys.exit(f"demo: `facefed-server {args[0]}` exited with {proc.returncode}, expected {expect}")
    return proc


def unlearn_and_verify(fed: Federation, site: str, person: str, pseudonym: str, request_id: str) -> int:
    site_dir = fed.site_dir(site)
    vault = fed.vault(site)
    print(
        "\n[demo] the server asks the sites for requests, rolls back to before the person's first round, "
        "replays without them, deletes the checkpoints that carried them and signs a receipt",
        flush=True,
    )
    started = time.perf_counter()
    server(fed, "unlearn", "--state", str(fed.state), "--wait", "60")
    print(
        f"[demo] unlearned in {time.perf_counter() - started:.0f} s (the replay is new training: each site's "
        f"epsilon above includes it)"
    )
    server(fed, "requests", "--state", str(fed.state))
    client("forget", "status", "--vault", str(vault), request_id)

    receipt = vault / "receipts" / f"{request_id}.json"
    print(f"\n[demo] the receipt the site keeps ({receipt.relative_to(REPO)}):")
    print(json.dumps(json.loads(receipt.read_text())["receipt"], indent=1))
    server(fed, "receipts", "verify", str(receipt), "--state", str(fed.state))
    tampered = WORKDIR / "tampered-receipt.json"
    doc = json.loads(receipt.read_text())
    doc["receipt"]["checkpoints_deleted"] = doc["receipt"]["checkpoints_deleted"][:-1]
    tampered.write_text(json.dumps(doc))
    print("\n[demo] the same receipt with one deleted checkpoint left out (tampered) must fail:")
    server(fed, "receipts", "verify", str(tampered), "--state", str(fed.state), expect=1)

    # After the replay: nothing of the person at the site, no checkpoint of the replaced rounds anywhere.
    body = json.loads(receipt.read_text())["receipt"]
    with Ledger(fed.state / "ledger.sqlite") as ledger:
        gone = [c for c in body["checkpoints_deleted"] if Path(ledger.checkpoint(c).path).exists()]
    left_heads = head_rows_of(vault / "site", pseudonym, person)
    left_files = files_mentioning(site_dir, person)
    print(
        f"  checkpoints of the replaced rounds still on the server: {gone or 'none'} "
        f"(deleted: {', '.join(body['checkpoints_deleted'])})"
    )
    print(f"  head checkpoints at {site} with their row: {left_heads or 'none'}")
    print(f"  files at {site} containing {person!r}: {left_files or 'none'}")
    if gone or left_heads or left_files:
        sys.exit("demo: something of the forgotten person is left after unlearning")
    print(
        f"\n[demo] OK: request {request_id} went received -> data erased -> model unlearned -> receipt issued; "
        f"the receipt verifies against the ledger and a tampered copy does not."
    )
    # The current model by name, and the report (plots of accuracy, epsilon, ROC, the request's timeline).
    server(
        fed, "export", "--state", str(fed.state), "--model", "current", "--out", str(WORKDIR / "model.pt"), "--force"
    )
    proc = subprocess.run(
        [SERVER, "report", "--state", str(fed.state), "--out", str(WORKDIR / "report")],
        env=fed._env(),
        text=True,
        capture_output=True,
        timeout=600,
    )
    if proc.returncode:
        sys.exit(f"demo: `facefed-server report` failed: {proc.stderr.strip()}")
    print(f"\n[demo] report written: {WORKDIR / 'report' / 'report.html'} (open it in a browser; CSV files beside it)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--people", type=int, default=None, help="people per site (default: all with >= 2 images, ~395 per site)"
    )
    args = ap.parse_args()
    lfw_path(), pretrained_path()  # fail at once, saying where to put the data

    def after(fed: Federation) -> int:
        person, pseudonym, request_id = forget_one(fed.site_dir("north"))
        return unlearn_and_verify(fed, "north", person, pseudonym, request_id)

    people = [] if args.people is None else ["--people", str(args.people)]
    return federation.main(["--workdir", str(WORKDIR), *people], after=after)


if __name__ == "__main__":
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("COLUMNS", "150")  # the commands' tables, readable in a log
    sys.exit(main())
