"""`facefed-client store ...`: run a remote share holder (gRPC, mutual TLS) and make its certificates."""

import typer

app = typer.Typer(help="Remote share holders: serve a store over gRPC with mutual TLS, make certificates.", no_args_is_help=True)
