"""The site's `flwr-clientapp`: runs facefed's installed ClientApp, and only for facefed's own FAB.

Flower's SuperNode (subprocess isolation) has its SuperExec start `flwr-clientapp` by name from PATH
for every message. Stock `flwr-clientapp` (flwr/supernode/runtime/run_clientapp.py) pulls the run's
FAB from the SuperNode, unpacks it under FLWR_HOME/apps (`install_from_fab`) and imports the
ClientApp the FAB's pyproject names with the FAB's own directory first on sys.path: whatever *.py the
server packed runs at the site, as the site's user. Flower's own check (`flower-supernode
--trusted-entities`) needs FABs signed through Flower's platform and a `valid_license` verification
that only an Enterprise SuperLink sets, so it cannot be used here.

`facefed-client start` puts a `flwr-clientapp` that runs `main` below first on the SuperNode's PATH
(client/site/node.py). It is Flower's `flwr-clientapp` with two steps replaced:
- install: the FAB's sha256 must equal that of the FAB Flower builds from facefed's own app
  definition (common/flwr_app.py: a pyproject.toml only, no code). Anything else is refused with
  `FabRefused` before a byte of it is written or imported; Flower turns that into an error reply to
  the server, and the refusal is logged at the site.
- load: the ClientApp is `facefed.client.site.app:app` from the installed facefed package; nothing
  is ever imported from a FAB.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from typing import Any

from facefed.common.errors import FacefedError
from facefed.common.flwr_app import fab_sha256

COMMAND = "flwr-clientapp"


class FabRefused(FacefedError, RuntimeError):
    """The run's app is not facefed's: refused before anything in it is installed or imported."""


def check_fab(content: bytes) -> str:
    got = hashlib.sha256(content).hexdigest()
    want = fab_sha256()
    if got != want:
        msg = (
            f"refused a run whose app (FAB sha256 {got[:16]}...) is not facefed's own "
            f"({want[:16]}...): this site runs only the facefed code installed here"
        )
        print(f"facefed-client: {msg}", file=sys.stderr, flush=True)
        raise FabRefused(msg)
    return got


def _checked_install(fab_file: Any, *_: Any, **__: Any) -> None:
    if not isinstance(fab_file, bytes | bytearray):
        raise FabRefused("refused a FAB given as a path: only in-memory FABs from the SuperNode are checked")
    check_fab(bytes(fab_file))  # and install nothing


def _facefed_loader(**_: Any) -> Callable[..., Any]:
    def load(fab_id: str, fab_version: str, fab_hash: str) -> Any:
        if fab_hash != fab_sha256():
            raise FabRefused(f"refused to load a ClientApp for FAB {fab_hash[:16]}...")
        from facefed.client.site.app import app

        return app

    return load


def main() -> None:
    """Flower's `flwr-clientapp` with the FAB check and facefed's own ClientApp (see module doc)."""
    import flwr.supernode.runtime.run_clientapp as runner
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    fab_sha256()  # compute before any message is pulled (and fail here if Flower cannot build it)
    runner.install_from_fab = _checked_install  # type: ignore[assignment]
    runner.get_load_client_app_fn = _facefed_loader  # type: ignore[assignment]
    flwr_clientapp()


def write_shim(bin_dir: Any) -> None:
    """BIN_DIR/flwr-clientapp running `main` with this interpreter (put BIN_DIR first on PATH)."""
    from pathlib import Path

    d = Path(bin_dir)
    d.mkdir(parents=True, exist_ok=True)
    shim = d / COMMAND
    shim.write_text(f"#!{sys.executable}\nfrom facefed.client.site.guard import main\n\nmain()\n")
    shim.chmod(0o755)


if __name__ == "__main__":
    main()
