"""Server side of facefed: the Flower ServerApp, aggregation, checkpoints, the ledger, unlearning
and the `facefed-server` CLI. Imports `common`, never `client`."""
