"""Layout of the server's state directory (`facefed-server start --state DIR`).

Everything the operator must keep (and back up) lives under one directory:

    DIR/superlink.db        Flower's LinkState (runs, messages, registered SuperNodes)
    DIR/ledger.sqlite       our ledger: runs, rounds, per-site participation, checkpoints, sites
    DIR/checkpoints/        global model checkpoints, one file per committed round
    DIR/flwr/               FLWR_HOME for the SuperLink, its ServerApp and the `flwr` CLI
    DIR/flwr/config.toml    the `facefed` SuperLink connection (`flwr run`, `flwr supernode ...`)
    DIR/server.json         how this server was started (address, TLS): read by train/sites/status
    DIR/submissions/        frozen, validated run configurations handed to the ServerApp
    DIR/flwr-app/           the Flower app `flwr run` packs (pyproject.toml only, see server/ops/flwr_app.py)
    DIR/logs/               SuperLink log
    DIR/data.json           the data the runs use (LFW, pretrained weights), recorded by `train`, so that
                            `unlearn`, `evaluate` and resumed runs need no environment variables
    DIR/runs/RUN.data.json  the same, per run
    DIR/phase.json          what the ServerApp is doing now (waiting for sites, a round's replies,
                            evaluating, ...), for `train`/`unlearn` to show during long waits
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from facefed.common.errors import FacefedError

CONNECTION = "facefed"  # name of the SuperLink connection in DIR/flwr/config.toml


class StateDirError(FacefedError, FileNotFoundError):
    """The state directory is missing a part a command needs; the message says which command makes it."""


@dataclass(frozen=True)
class ServerInfo:
    """What `start` recorded about the running server (no secrets: paths and an address only)."""

    address: str  # host:port of the Control API (loopback only; server/ops/linkd.py)
    bind_host: str
    port: int  # the public port: the Fleet API only
    tls: bool
    ca_cert: str | None
    node_auth: bool
    pid: int
    public_address: str = ""  # host:port sites dial


@dataclass(frozen=True)
class StatePaths:
    root: Path

    @classmethod
    def at(cls, root: str | Path, *, create: bool = False, started: bool = False) -> StatePaths:
        """The layout at `root`; `create` makes it, `started` requires one that `start` made (its
        ledger): a typo'd --state then fails instead of reading as an empty server."""
        root = Path(root).expanduser().resolve()
        if create:
            root.mkdir(parents=True, exist_ok=True)
            for sub in ("checkpoints", "flwr", "submissions", "logs"):
                (root / sub).mkdir(exist_ok=True)
        elif not root.is_dir():
            raise StateDirError(
                f"state directory {root} does not exist; create it with `facefed-server start --state {root}`"
            )
        elif started and not (root / "ledger.sqlite").is_file():
            # a typo'd --state must not read as "no requests" (nor get a fresh ledger created in it)
            raise StateDirError(
                f"{root} is not a facefed server state directory (no ledger.sqlite); give the --state "
                f"directory of `facefed-server start`"
            )
        return cls(root)

    @property
    def superlink_db(self) -> Path:
        return self.root / "superlink.db"

    @property
    def ledger(self) -> Path:
        return self.root / "ledger.sqlite"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr"

    @property
    def flwr_config(self) -> Path:
        return self.flwr_home / "config.toml"

    @property
    def server_json(self) -> Path:
        return self.root / "server.json"

    @property
    def submissions(self) -> Path:
        return self.root / "submissions"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def purge_record(self) -> Path:
        """The SuperLink's last database purge (server/ops/linkd.py): when, and which Flower runs."""
        return self.logs / "superlink-purge.json"

    @property
    def purge_request(self) -> Path:
        """Present: purge the SuperLink's database now (an unlearning waits for it before its receipts)."""
        return self.logs / "superlink-purge.request"

    def write_server_info(self, info: ServerInfo) -> None:
        tmp = self.server_json.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(info), indent=2))
        tmp.replace(self.server_json)

    @property
    def data_json(self) -> Path:
        return self.root / "data.json"

    def record_data(self, run_id: str, *, lfw: str | None, pretrained: str) -> None:
        """What `run_id` (and, as the latest, the state) uses: kept so later commands need no environment."""
        doc = {"run_id": run_id, "lfw": lfw, "pretrained": pretrained}
        if lfw is None and self.data_json.is_file():  # a run without evaluation keeps the known LFW
            doc["lfw"] = self.recorded_data().get("lfw")
        (self.root / "runs").mkdir(exist_ok=True)
        for path in (self.root / "runs" / f"{run_id}.data.json", self.data_json):
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(doc, indent=1))
            tmp.replace(path)

    def write_phase(self, text: str, run_id: str | None = None) -> None:
        """The ServerApp's current phase (one line); best effort, never fails the run."""
        import time

        try:
            tmp = self.root / "phase.tmp"
            tmp.write_text(json.dumps({"phase": text, "run_id": run_id, "since": time.time()}))
            tmp.replace(self.root / "phase.json")
        except OSError:
            pass

    def read_phase(self) -> dict[str, object] | None:
        try:
            return dict(json.loads((self.root / "phase.json").read_text()))
        except (OSError, json.JSONDecodeError, TypeError, ValueError):
            return None

    def recorded_data(self) -> dict[str, str | None]:
        """{"lfw", "pretrained"} as the latest `train` recorded them ({} before any)."""
        try:
            doc = json.loads(self.data_json.read_text())
        except (OSError, json.JSONDecodeError):
            return {}
        return {k: doc.get(k) for k in ("lfw", "pretrained")}

    def server_info(self) -> ServerInfo:
        if not self.server_json.is_file():
            raise StateDirError(
                f"no server has been started with state {self.root}; run "
                f"`facefed-server start --state {self.root}` first"
            )
        return ServerInfo(**json.loads(self.server_json.read_text()))
