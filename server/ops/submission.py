"""A training submission: the frozen, validated configuration `train` hands to the ServerApp.

`flwr run` can only carry flat key/values, so `facefed-server train` validates the TOML config,
resolves data paths at the server, and writes one JSON file under DIR/submissions/; the run config
names that file. The ServerApp re-validates it (the file could have been edited) and refuses any
name that is not a plain file in that directory.

`facefed-server unlearn` writes a submission of mode `unlearn`: no configuration of its own (each
replay uses the configuration of the run it replaces), only how long to wait for the sites.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass

from facefed.common.config import validate_config
from facefed.common.errors import FacefedError
from facefed.common.fedconfig import FederationConfig
from facefed.server.state import StatePaths

SUBMISSION_RE = re.compile(r"^sub-[0-9a-z-]{8,80}\.json$")


class SubmissionError(FacefedError, ValueError):
    """A submission file that is missing, misnamed or does not validate."""


@dataclass(frozen=True)
class Submission:
    name: str
    run_id: str  # the ledger run to create or resume ("" in unlearn mode)
    resume: bool  # True: continue run_id from its last committed round
    config: FederationConfig | None  # None in unlearn mode
    lfw: str | None
    pretrained: str
    mode: str = "train"  # train | unlearn
    receipt_key: str | None = None  # the Ed25519 key receipts are signed with
    wait_s: float = 60.0  # unlearn mode: how long to wait for every registered site to be online


def new_run_id(config: FederationConfig) -> str:
    return f"{config.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def write_submission(
    paths: StatePaths,
    config: FederationConfig | None,
    *,
    run_id: str,
    resume: bool,
    lfw: str | None,
    pretrained: str,
    mode: str = "train",
    receipt_key: str | None = None,
    wait_s: float = 60.0,
) -> str:
    name = f"sub-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(4)}.json"
    payload = {
        "run_id": run_id,
        "resume": resume,
        "config": json.loads(config.frozen_json()) if config else None,
        "lfw": lfw,
        "pretrained": pretrained,
        "mode": mode,
        "receipt_key": receipt_key,
        "wait_s": wait_s,
    }
    paths.submissions.mkdir(parents=True, exist_ok=True)
    (paths.submissions / name).write_text(json.dumps(payload, indent=1))
    return name


def read_submission(paths: StatePaths, name: str) -> Submission:
    if not isinstance(name, str) or not SUBMISSION_RE.match(name):
        raise SubmissionError(
            f"submission {name!r} is not a submission file name (sub-*.json); submit runs with `facefed-server train`"
        )
    path = paths.submissions / name
    if not path.is_file():
        raise SubmissionError(f"submission {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SubmissionError(f"submission {path}: not JSON ({e})") from None
    mode = data.get("mode", "train")
    if mode not in ("train", "unlearn"):
        raise SubmissionError(f"submission {path}: mode {mode!r} is neither train nor unlearn")
    config = None if mode == "unlearn" else validate_config(data.get("config") or {}, FederationConfig, where=str(path))
    return Submission(
        name=name,
        run_id=str(data["run_id"]),
        resume=bool(data["resume"]),
        config=config,
        lfw=data.get("lfw"),
        pretrained=str(data["pretrained"]),
        mode=mode,
        receipt_key=data.get("receipt_key"),
        wait_s=float(data.get("wait_s", 60.0)),
    )
