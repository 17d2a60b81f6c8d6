"""The one root of every error facefed raises on purpose.

A `FacefedError`'s message is one line that names the offending thing and the fix; the CLIs turn it
into that line and `exit_code` (common/cli.py), never a traceback. Leaves subclass it per concept
(vault, store, ledger, ...); code that must also stay a `ValueError`/`RuntimeError` for callers may
inherit from both.
"""

from __future__ import annotations


class FacefedError(Exception):
    """An expected failure: bad input, a refused operation, missing data or an unavailable peer."""

    exit_code: int = 2  # 2: bad input or refused (the CLIs' documented code); 3: a peer/service unavailable


class Unavailable(FacefedError):
    """A service, store or peer that is down or unreachable; retrying later may succeed."""

    exit_code = 3
