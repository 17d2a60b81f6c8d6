"""facefed: privacy-preserving federated training of a face embedder.

    import facefed
    m = facefed.load("model.pt")          # an Embedder (common/embedder.py); torch loads here, not at import
    m.compare("a.jpg", "b.jpg")           # Comparison(cosine, same, threshold, far)

The installed distribution is this one package. Its rooms are the repository's top-level folders:
`facefed.common` (the bottom layer: primitives both sides use), `facefed.client` (a site: vault,
local DP training, ClientApp, `facefed-client`) and `facefed.server` (the federation operator:
ServerApp, ledger, unlearning, `facefed-server`). In a checkout, `facefed/common` etc. are symlinks
to those folders, so the repository keeps the design's layout and every tool (Python, pytest, mypy,
setuptools' wheel and editable builds) sees one importable namespace without path tricks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from facefed.common.embedder import Comparison, Embedder, Match, load

__all__ = ["Comparison", "Embedder", "Match", "__version__", "load"]
_LAZY = {"load", "Embedder", "Comparison", "Match"}


def __getattr__(name: str) -> Any:
    """`facefed.load` and friends import torch on first use, so `import facefed` stays light."""
    if name in _LAZY:
        from facefed.common import embedder

        return getattr(embedder, name)
    raise AttributeError(f"module 'facefed' has no attribute {name!r}")
