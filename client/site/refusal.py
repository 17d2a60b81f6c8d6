"""Why a site did not train, as the server operator will read it: `site NAME refused (KIND): REASON`.

The round (client/site/round.py, in the ClientApp's process or the warm worker) raises; the ClientApp
answers the server with a `TrainRefusal` (common/protocol/train.py) instead of failing the message,
so the reason reaches the server's terminal and ledger as one line, never as a traceback in the
site's log only. Classification is by exception type, without importing the training stack.
"""

from __future__ import annotations

import traceback

from facefed.common.errors import FacefedError
from facefed.common.protocol.train import RefusalKind, SiteRefused

MAX_REASON = 900

_BUDGET = ("BudgetExceeded",)
_CONFIG = (
    "AccountantMismatch",
    "SiteConfigError",
    "ConfigError",
    "CheckpointMismatch",
    "ShardStateError",
    "CenteringError",
    "LayoutError",
    "HeadError",
    "ValidationError",
)
_DATA = (
    "DataNotFound",
    "VaultError",
    "NotEnoughShares",
    "CorruptShare",
    "StoreError",
    "StoreUnavailable",
    "LFWFormatError",
    "BadImage",
    "FileNotFoundError",
)


def one_line(text: str) -> str:
    """The reason on one line, bounded (the wire limit is 1000 characters)."""
    line = " ".join(str(text).split())
    return line if len(line) <= MAX_REASON else line[: MAX_REASON - 3] + "..."


def kind_of(e: BaseException) -> RefusalKind:
    """policy / config / budget / data / crash, from the exception's type (and its bases)."""
    if isinstance(e, SiteRefused):
        return e.kind
    names = {c.__name__ for c in type(e).__mro__}
    if names & set(_BUDGET):
        return "budget"
    if names & set(_DATA):
        return "data"
    if names & set(_CONFIG) or (isinstance(e, ValueError) and not isinstance(e, FacefedError)):
        return "config"  # the trainer's checks (delta < 1/people, min_people, ...) raise ValueError
    return "config" if isinstance(e, FacefedError) and isinstance(e, ValueError) else "crash"


def reason_of(e: BaseException) -> str:
    """The exception's message in one line; a crash also names its type and where it happened."""
    if isinstance(e, SiteRefused):
        return one_line(e.reason)
    msg = str(e) or type(e).__name__
    if kind_of(e) != "crash":
        return one_line(msg)
    where = ""
    tb = traceback.extract_tb(e.__traceback__) if e.__traceback__ else []
    if tb:
        last = tb[-1]
        where = f" (at {last.filename.rsplit('/', 1)[-1]}:{last.lineno})"
    return one_line(f"{type(e).__name__}: {msg}{where}")


def refusal(e: BaseException) -> dict[str, str]:
    """What the worker sends the ClientApp for a failed round: {"kind", "reason"}."""
    return {"kind": kind_of(e), "reason": reason_of(e)}
