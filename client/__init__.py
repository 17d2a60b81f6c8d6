"""Site side of facefed: the secret-shared face vault, local DP training, the Flower ClientApp and
the `facefed-client` CLI. Imports `common`, never `server`."""
