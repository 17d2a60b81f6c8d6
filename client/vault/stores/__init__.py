"""Share stores: `open_store(url)` gives a `Store` for a directory, file:// URL or grpcs://host:port."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from facefed.client.vault.stores.base import ShareNotFound, Store, StoreError, StoreStat, StoreUnavailable
from facefed.client.vault.stores.local import LocalDirStore

__all__ = ["LocalDirStore", "ShareNotFound", "Store", "StoreError", "StoreStat", "StoreUnavailable", "open_store"]


def open_store(url: str, *, tls_dir: Path | None = None) -> Store:
    """A store from its URL: a directory (plain path or file://) or a remote holder (grpcs://host:port)."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"invalid store URL {url!r}: give a directory or grpcs://host:port")
    if url.startswith("grpcs://"):
        from facefed.client.vault.stores.grpc import GrpcStore  # lazy: grpc is only needed for remote stores

        return GrpcStore(url, tls_dir=tls_dir)
    if url.startswith("file://"):
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"store URL {url}: file:// URLs must name a local path (file:///path)")
        return LocalDirStore(unquote(parsed.path))
    if "://" in url:
        raise ValueError(f"store URL {url}: unsupported scheme; use a directory, file:///path or grpcs://host:port")
    if any(ord(ch) < 32 for ch in url):
        raise ValueError(f"store path {url!r} contains control characters")
    return LocalDirStore(url)
