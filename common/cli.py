"""How every facefed CLI says that something failed: one line on stderr and a documented exit code.

`fail` is the only place that prints an error and exits; `clean_errors` wraps a command so that
every `FacefedError` (and the listed standard errors) becomes that line instead of a traceback.
Exit codes: 2 bad input or refused, 3 a service or peer unavailable (FacefedError.exit_code).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, NoReturn, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from facefed.common.errors import FacefedError

P = ParamSpec("P")
R = TypeVar("R")

err = Console(stderr=True, highlight=False, soft_wrap=True)
PIPED_WIDTH = 400  # tables written to a pipe or file are not cut to 80 columns


def out_console() -> Console:
    """Console for tables on stdout: the terminal's width, or full width (and no colour) when piped."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else PIPED_WIDTH)


def print_json(obj: Any) -> None:
    """One JSON document on stdout (the `--json` of every listing); non-JSON values become strings."""
    sys.stdout.write(json.dumps(obj, indent=1, default=str) + "\n")
    sys.stdout.flush()


def fail(message: str, code: int = 2) -> NoReturn:
    """Print `error: MESSAGE` (one line per line of the message) and exit with `code`."""
    err.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(code)


def clean_errors(*also: type[BaseException]) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator: FacefedError, OSError and the `also` types become `fail(...)` (no traceback)."""

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return fn(*args, **kwargs)
            except FacefedError as e:
                fail(str(e), e.exit_code)
            except OSError as e:
                fail(f"{e.filename or ''}: {e.strerror or e}".lstrip(": "))
            except also as e:
                fail(str(e))

        return wrapper

    return wrap
