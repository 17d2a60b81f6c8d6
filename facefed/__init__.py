"""facefed: privacy-preserving federated training of a face embedder.

The installed distribution is this one package. Its rooms are the repository's top-level folders:
`facefed.common` (the bottom layer: primitives both sides use), `facefed.client` (a site: vault,
local DP training, ClientApp, `facefed-client`) and `facefed.server` (the federation operator:
ServerApp, ledger, unlearning, `facefed-server`). In a checkout, `facefed/common` etc. are symlinks
to those folders, so the repository keeps the design's layout and every tool (Python, pytest, mypy,
setuptools' wheel and editable builds) sees one importable namespace without path tricks.
"""

__version__ = "0.1.0"
