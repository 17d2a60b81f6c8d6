"""`facefed-client store ...`: run a remote share holder (gRPC, mutual TLS) and make its certificates."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

from facefed.common.cli import fail

app = typer.Typer(
    help="Remote share holders: serve a store over gRPC with mutual TLS, make certificates.", no_args_is_help=True
)


@app.command()
def serve(
    directory: Path = typer.Option(..., "--dir", help="Folder holding this holder's shares and index (must exist)."),
    listen: str = typer.Option(
        ..., "--listen", help="HOST:PORT to listen on, e.g. 0.0.0.0:7001 (port 0: any free port)."
    ),
    tls_dir: Path = typer.Option(
        ...,
        "--tls-dir",
        help="This host's bundle from `store certs` (ca.pem, server.pem, server.key), or the whole TLS folder.",
    ),
    cert_host: str = typer.Option(
        None,
        "--cert-host",
        help="Which holders/<host>/ certificate to use when --tls-dir is the whole folder (default: the --listen host).",
    ),
    max_share_mb: int = typer.Option(
        None,
        "--max-share-mb",
        min=1,
        max=1024,
        help="Largest share accepted, in MiB (default: the largest the vault makes).",
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every closed connection too."),
) -> None:
    """Serve one share store over gRPC; only clients with a certificate from the site's store CA are served."""
    from facefed.client.holder.service import serve_forever, start_holder
    from facefed.client.vault.stores.base import StoreError

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        limit = {"max_share_bytes": max_share_mb * 1024 * 1024} if max_share_mb else {}
        holder = start_holder(directory, listen, tls_dir, cert_host=cert_host, **limit)
    except (StoreError, ValueError, OSError) as e:
        fail(str(e))
    # One parseable line on stdout: scripts and tests learn the port when --listen asked for port 0.
    typer.echo(f"facefed share holder listening on {listen.rpartition(':')[0]}:{holder.port}", nl=True)
    sys.stdout.flush()
    serve_forever(holder)


@app.command()
def certs(
    out: Path = typer.Option(..., "--out", help="TLS folder to create or extend (the vault's --tls-dir)."),
    hosts: str = typer.Option(
        ..., "--hosts", help="Comma-separated holder host names or IP addresses, as the vault dials them."
    ),
) -> None:
    """Make the store CA, one server certificate per holder host and the vault's client certificate."""
    from facefed.client.holder.tls import make_store_certs
    from facefed.client.vault.stores.base import StoreError

    try:
        folders = make_store_certs(out, hosts.split(","))
    except (StoreError, ValueError) as e:
        fail(str(e))
    except OSError as e:
        fail(f"{e.filename or out}: {e.strerror or e}")
    typer.echo(f"vault side:  --tls-dir {out}  (ca.pem, client.pem, client.key)")
    for f in folders:
        typer.echo(f"holder {f.name}:  copy {f} to that host and run `facefed-client store serve --tls-dir <copy> ...`")
    typer.echo(f"keep {out / 'ca.key'} offline; it is needed only to add holder hosts later")
