"""The Flower app that `facefed-server train` submits with `flwr run`, and that a site accepts.

Flower builds a FAB (Flower App Bundle) from a directory holding a `pyproject.toml` with a
`[tool.flwr.app]` section. Ours carries no code on purpose: both components are imported from the
facefed package installed at the server and at each site, so a server cannot ship code to a site.
The file is written into the server state at submission time (rather than shipped as package data),
so the same thing works from a checkout, an editable install and a wheel.

It lives in `common` because both sides need the same bytes: the server submits it, and a site's
ClientApp runner (client/site/guard.py) refuses any FAB whose sha256 differs from the FAB Flower
builds from this text (`fab_sha256`), before anything in it is installed or imported.
"""

from __future__ import annotations

import hashlib
import tempfile
from functools import cache
from pathlib import Path

PYPROJECT = """\
# The Flower app that `facefed-server train` submits with `flwr run` (a FAB is built from this folder).
# It carries no code on purpose: both components are imported from the facefed package installed at
# the server and at each site, so a server cannot ship code to a site.
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "facefed-federation"
version = "0.1.0"
description = "facefed federated training: backbone-only FedAvg with per-person DP at the sites"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "facefed"

[tool.flwr.app.components]
serverapp = "facefed.server.app:app"
clientapp = "facefed.client.site.app:app"

# Overridden by `facefed-server train`: where the server state lives and which frozen, validated
# configuration (DIR/submissions/*.json) this run uses. Everything else is in that file.
[tool.flwr.app.config]
state-dir = ""
submission = ""
# Simulation only (`facefed-server simulate`): a node without a vault is a virtual site reading its
# share of LFW. Ignored by real sites, which always have a vault in their node config.
sim-state = ""
sim-lfw = ""
sim-pretrained = ""
sim-people = 0
sim-max-images = 0
"""


def write_app_dir(root: Path) -> Path:
    """DIR/flwr-app/pyproject.toml (rewritten every time: it is generated, never edited)."""
    app = Path(root) / "flwr-app"
    app.mkdir(parents=True, exist_ok=True)
    (app / "pyproject.toml").write_text(PYPROJECT)
    return app


@cache
def fab_sha256() -> str:
    """sha256 (hex) of the FAB `flwr run` builds from our app dir: Flower's build is deterministic
    (fixed timestamps, its own re-dump of pyproject.toml plus .info/CONTENT), so equal text, equal hash."""
    from flwr.cli.build import build_fab_from_disk

    with tempfile.TemporaryDirectory(prefix="facefed-fab-") as d:
        return hashlib.sha256(build_fab_from_disk(write_app_dir(Path(d)))).hexdigest()
