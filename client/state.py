"""Every path a site keeps, in one place: the vault directory's site files and the state directory.

    VAULT/requests.sqlite              forget requests and tombstones (client/forget/requests.py)
    VAULT/server-receipts.pub          the server's receipt key, pinned at start (client/forget/receipts.py)
    VAULT/states                       every other state directory that trained on this vault (one per line),
                                       so `forget` finds its heads and contribution log too
    VAULT/policy.json                  the site's privacy policy (client/training/privacy.py), 0600
    VAULT/accountant.json              THE privacy accountant of the vault's people (`accountant-s<k>of<S>.json`
                                       per shard): local `train` and the federation node alike
    VAULT/receipts/<request>.json      the server's signed forget receipts
    VAULT/site/                        the node's state directory unless `--state` says otherwise
    VAULT/train-state/                 `facefed-client train`'s state directory (local baselines)
    STATE/node-config.toml             what the ClientApp learns about this site (client/site/node.py)
    STATE/heads/<run>/r<round>-a<attempt>.pt   the private margin head after each round
    STATE/head.pt                      `facefed-client train`'s head
    STATE/accountant.json              a simulated site's accountant only (a vault keeps its own, above)
    STATE/contributions.sqlite         who was trained on in which run and round
    STATE/worker.sock, worker.key      the warm worker's socket and its authentication key
    STATE/logs/, STATE/flwr/           process logs; Flower's home for the SuperNode

This module imports nothing from facefed, so every other module can use it without an import cycle.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# -- in the vault directory ----------------------------------------------------------------------
REQUESTS_NAME = "requests.sqlite"
POLICY_NAME = "policy.json"
STATES_NAME = "states"
SERVER_KEY_NAME = "server-receipts.pub"  # also client/vault/tombstones.py (the vault's put consults it)
RECEIPTS_DIR = "receipts"
NODE_STATE_SUBDIR = "site"  # `forget --vault DIR` finds heads and logs from the vault
TRAIN_STATE_SUBDIR = "train-state"

# -- in the state directory ----------------------------------------------------------------------
NODE_CONFIG_NAME = "node-config.toml"
HEADS_DIR = "heads"
HEAD_NAME = "head.pt"
ACCOUNTANT_NAME = "accountant.json"
CONTRIBUTIONS_NAME = "contributions.sqlite"
WORKER_SOCKET_NAME = "worker.sock"
WORKER_KEY_NAME = "worker.key"
LOGS_DIR = "logs"
FLOWER_DIR = "flwr"

HEAD_RE = re.compile(r"^r(\d{4})-a(\d+)\.pt$")  # a round's head file: r<round, 4 digits>-a<attempt>.pt
HEAD_GLOB = "r*-a*.pt"
SHARD_ACCOUNTANT_RE = re.compile(r"^accountant-s(\d+)of(\d+)\.json$")
SHARD_ACCOUNTANT_GLOB = "accountant-s*of*.json"


def head_name(rnd: int, attempt: int) -> str:
    return f"r{rnd:04d}-a{attempt}.pt"


def shard_accountant_name(shard: int, shards: int) -> str:
    return ACCOUNTANT_NAME if shards == 1 else f"accountant-s{shard}of{shards}.json"


def default_node_state(vault_dir: str | Path) -> Path:
    """Where `facefed-client start` (and `forget`) keep the site's state unless told otherwise."""
    return Path(vault_dir) / NODE_STATE_SUBDIR


def default_train_state(vault_dir: str | Path) -> Path:
    """Where `facefed-client train` keeps its accountant and head unless told otherwise."""
    return Path(vault_dir) / TRAIN_STATE_SUBDIR


@dataclass(frozen=True)
class SiteState:
    """The site's state directory (and its vault directory, where it has one: simulated sites do not)."""

    state_dir: Path
    vault_dir: Path | None = None

    @classmethod
    def of_node(cls, vault_dir: str | Path, state_dir: str | Path | None = None) -> SiteState:
        """A node's state: `state_dir`, or VAULT/site."""
        return cls(Path(state_dir) if state_dir is not None else default_node_state(vault_dir), Path(vault_dir))

    # -- state directory ---------------------------------------------------------------------
    @property
    def node_config(self) -> Path:
        return self.state_dir / NODE_CONFIG_NAME

    @property
    def heads_dir(self) -> Path:
        return self.state_dir / HEADS_DIR

    def run_heads_dir(self, run_id: str) -> Path:
        return self.heads_dir / run_id

    def head_path(self, run_id: str, rnd: int, attempt: int) -> Path:
        return self.run_heads_dir(run_id) / head_name(rnd, attempt)

    def round_heads(self, run_id: str) -> Iterator[tuple[int, int, Path]]:
        """(round, attempt, path) of every head file of `run_id` (unordered)."""
        folder = self.run_heads_dir(run_id)
        for path in folder.glob(HEAD_GLOB) if folder.is_dir() else []:
            m = HEAD_RE.match(path.name)
            if m:
                yield int(m.group(1)), int(m.group(2)), path

    def head_files(self) -> list[Path]:
        """Every head file the site keeps: heads directly in STATE and under STATE/heads (sorted)."""
        found = list(self.state_dir.glob("*.pt"))
        if self.heads_dir.is_dir():
            found += self.heads_dir.rglob("*.pt")
        return sorted(p for p in found if p.is_file() and not p.name.startswith("."))

    @property
    def head(self) -> Path:
        """`facefed-client train`'s one head."""
        return self.state_dir / HEAD_NAME

    @property
    def accountant_dir(self) -> Path:
        """Where the accountants live: the vault (one per vault, whichever state dir trains on it), or
        a simulated site's state directory."""
        return self.vault_dir if self.vault_dir is not None else self.state_dir

    @property
    def accountant(self) -> Path:
        return self.accountant_dir / ACCOUNTANT_NAME

    def shard_accountant(self, shard: int, shards: int) -> Path:
        return self.accountant_dir / shard_accountant_name(shard, shards)

    def shard_accountants(self) -> Iterator[tuple[int, int, Path]]:
        """(shard, shards, path) of every per-shard accountant file present."""
        for path in self.accountant_dir.glob(SHARD_ACCOUNTANT_GLOB):
            m = SHARD_ACCOUNTANT_RE.match(path.name)
            if m:
                yield int(m.group(1)), int(m.group(2)), path

    @property
    def contributions(self) -> Path:
        return self.state_dir / CONTRIBUTIONS_NAME

    @property
    def worker_socket(self) -> Path:
        return worker_socket_in(self.state_dir)

    @property
    def worker_key(self) -> Path:
        return worker_key_in(self.state_dir)

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / LOGS_DIR

    @property
    def flower_dir(self) -> Path:
        return self.state_dir / FLOWER_DIR

    # -- vault directory ---------------------------------------------------------------------
    def _vault(self) -> Path:
        if self.vault_dir is None:
            raise ValueError(f"site state {self.state_dir} has no vault directory (a simulated site)")
        return self.vault_dir

    @property
    def requests(self) -> Path:
        return requests_path(self._vault())

    @property
    def receipts_dir(self) -> Path:
        return receipts_dir(self._vault())

    @property
    def policy(self) -> Path:
        return policy_path(self._vault())

    def all_paths(self) -> dict[str, Path]:
        """Every fixed path named here (what forget and the operator docs enumerate)."""
        paths = {
            "node_config": self.node_config,
            "heads": self.heads_dir,
            "head": self.head,
            "accountant": self.accountant,
            "contributions": self.contributions,
            "worker_socket": self.worker_socket,
            "worker_key": self.worker_key,
            "logs": self.logs_dir,
            "flwr": self.flower_dir,
        }
        if self.vault_dir is not None:
            paths |= {"requests": self.requests, "receipts": self.receipts_dir, "policy": self.policy}
        return paths


def requests_path(vault_dir: str | Path) -> Path:
    return Path(vault_dir) / REQUESTS_NAME


def receipts_dir(vault_dir: str | Path) -> Path:
    return Path(vault_dir) / RECEIPTS_DIR


def register_state(vault_dir: str | Path, state_dir: str | Path) -> None:
    """Remember a state directory that trains on this vault (idempotent), so forget reaches it."""
    vault_dir, state_dir = Path(vault_dir).absolute(), Path(state_dir).absolute()
    if state_dir in (default_node_state(vault_dir), default_train_state(vault_dir)):
        return
    path = vault_dir / STATES_NAME
    known = path.read_text().splitlines() if path.exists() else []
    if str(state_dir) not in known:
        with open(path, "a") as f:
            f.write(f"{state_dir}\n")


def site_states(vault_dir: str | Path) -> list[Path]:
    """Every state directory of this vault: the node's, `train`'s, and every registered one."""
    vault_dir = Path(vault_dir).absolute()
    path = vault_dir / STATES_NAME
    extra = [Path(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [default_node_state(vault_dir), default_train_state(vault_dir), *extra]


def server_key_path(vault_dir: str | Path) -> Path:
    return Path(vault_dir) / SERVER_KEY_NAME


def policy_path(vault_dir: str | Path) -> Path:
    return Path(vault_dir) / POLICY_NAME


def worker_socket_in(link: str | Path) -> Path:
    """The warm worker's socket in `link`: the state directory, or a privilege-separated node's
    NODE_DIR/link (client/site/privsep.py)."""
    return Path(link) / WORKER_SOCKET_NAME


def worker_key_in(link: str | Path) -> Path:
    """The worker's HMAC key beside its socket."""
    return Path(link) / WORKER_KEY_NAME
