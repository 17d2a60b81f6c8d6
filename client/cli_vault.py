"""`facefed-client vault ...`: create, fill, inspect, repair and erase a site's face vault."""

import typer

app = typer.Typer(help="Secret-shared face vault: init, import, add, ls, verify, repair, erase.", no_args_is_help=True)
