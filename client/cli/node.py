"""`facefed-client start` / `keygen`: run this site's Flower SuperNode and make its node keys."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from facefed.client.site.node import NodeError, NodeSettings, run_node
from facefed.client.site.privsep import PrivsepError
from facefed.client.state import NODE_STATE_SUBDIR, default_node_state
from facefed.common.cli import fail
from facefed.common.nodekeys import NodeKeyError, make_node_keys
from facefed.common.paths import PRETRAINED_ENV


def keygen(
    out: Annotated[Path, typer.Option("--out", help="Directory for node.key (private, 0600) and node.pub.")],
) -> None:
    """Make this site's node authentication key pair (EC P-384, OpenSSH format)."""
    try:
        pair = make_node_keys(out)
    except (FileExistsError, OSError) as e:
        fail(str(e))
    typer.echo(f"private key: {pair.private_path} (keep it at the site; never send it)")
    typer.echo(f"public key:  {pair.public_path} (send this to the federation operator)")
    typer.echo(f"fingerprint: {pair.fingerprint} (read it to the operator to confirm the key they register)")


def start(
    site: Annotated[str, typer.Option("--site", help="This site's name, as the operator registered it.")],
    vault: Annotated[Path, typer.Option("--vault", help="The site's vault directory.")],
    server: Annotated[str, typer.Option("--server", help="Server address HOST:PORT.")],
    root_cert: Annotated[
        Path | None, typer.Option("--root-cert", help="The federation CA certificate (ca.crt).")
    ] = None,
    key: Annotated[Path | None, typer.Option("--key", help="This site's node key (node.key from keygen).")] = None,
    state: Annotated[
        Path | None,
        typer.Option(
            "--state",
            help=f"Site training state (heads, accountant, contribution log); default VAULT/{NODE_STATE_SUBDIR}.",
        ),
    ] = None,
    runtime_port: Annotated[
        int, typer.Option("--runtime-port", help="Local port of the node's runtime API (one per node on a machine).")
    ] = 9094,
    pretrained: Annotated[
        Path | None, typer.Option("--pretrained", help=f"Pretrained MobileFaceNet weights (default ${PRETRAINED_ENV}).")
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="No TLS (local tests only; refused by a TLS server).")
    ] = False,
    threads: Annotated[int, typer.Option("--threads", help="CPU threads for local training.")] = max(
        1, min(4, (os.cpu_count() or 2) // 2)
    ),
    warm_worker: Annotated[
        bool,
        typer.Option("--worker/--no-worker", help="Keep a warm training process (saves the import cost every round)."),
    ] = True,
    activation_wait: Annotated[
        float,
        typer.Option(
            "--activation-wait",
            help="Seconds to keep retrying when the server refuses to activate the node "
            "(it may still count a crashed node online).",
        ),
    ] = 75.0,
    max_retries: Annotated[
        int | None,
        typer.Option(
            "--max-retries", help="Give up after this many failed connection attempts (default: keep retrying)."
        ),
    ] = None,
    node_user: Annotated[
        str | None,
        typer.Option(
            "--node-user",
            help="Privilege separation (run as root): the SuperNode and every ClientApp run as this "
            "unprivileged user, which cannot read the vault or the site state; the training worker runs "
            "as the vault's owner (docs/threat-model.md).",
        ),
    ] = None,
    node_dir: Annotated[
        Path | None,
        typer.Option(
            "--node-dir",
            help="Where a privilege-separated node runs (its config, CA copy, the node user's home and "
            "the worker's socket); default /var/lib/facefed/node-SITE.",
        ),
    ] = None,
    receipt_key: Annotated[
        Path | None,
        typer.Option(
            "--receipt-key",
            help="The server's receipt public key (receipts.pub), pinned in the vault: receipts signed by any "
            "other key are not stored (needed once; a different key later is refused).",
        ),
    ] = None,
) -> None:
    """Run this site's node: it joins the federation and trains on the vault when the server asks."""
    if receipt_key is not None:  # pin the server's receipt key where the node is started (issue 11)
        from facefed.client.forget.receipts import KeyPinError, ReceiptError, pin_server_key

        try:
            pin_server_key(vault.expanduser(), receipt_key.read_bytes())
        except (OSError, KeyPinError, ReceiptError) as e:
            fail(f"--receipt-key {receipt_key}: {e}")
    if pretrained is None and os.environ.get(PRETRAINED_ENV):
        pretrained = Path(os.environ[PRETRAINED_ENV])
    settings = NodeSettings(
        site=site,
        vault=vault.expanduser().resolve(),
        state=(state or default_node_state(vault)).expanduser().resolve(),
        server=server,
        root_cert=root_cert.expanduser().resolve() if root_cert else None,
        key=key.expanduser().resolve() if key else None,
        insecure=insecure,
        runtime_port=runtime_port,
        pretrained=pretrained.expanduser().resolve() if pretrained else None,
        max_retries=max_retries,
        threads=threads,
        worker=warm_worker,
        activation_wait_s=activation_wait,
        node_user=node_user,
        node_dir=node_dir.expanduser().resolve() if node_dir else None,
    )
    try:
        settings.validate()  # bad input: exit 2 (documented), before anything is started or written
    except (NodeError, NodeKeyError, PrivsepError, ValueError) as e:
        fail(str(e))
    try:
        code = run_node(settings)
    except (NodeError, NodeKeyError, PrivsepError, ValueError) as e:
        fail(str(e), 3)
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add the `start` and `keygen` commands to the main CLI."""
    app.command("keygen")(keygen)
    app.command("start")(start)
