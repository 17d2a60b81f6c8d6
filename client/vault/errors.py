"""Vault errors. Each message names the offending thing (image, person, store, file) and the remedy."""

from __future__ import annotations

from facefed.client.vault.stores.base import ShareNotFound, StoreError, StoreMisplaced, StoreUnavailable
from facefed.common.errors import FacefedError

__all__ = [
    "VaultError",
    "InvalidConfig",
    "VaultBusy",
    "StoreMisplaced",
    "DuplicateImage",
    "UnknownPerson",
    "UnknownImage",
    "NotEnoughShares",
    "InvalidImage",
    "InvalidPersonId",
    "CorruptShare",
    "AuditChainBroken",
    "StoreError",
    "StoreUnavailable",
    "ShareNotFound",
]


class VaultError(FacefedError):
    """Base class of everything the vault refuses or cannot do."""


class InvalidConfig(VaultError, ValueError):
    """Bad vault parameters (k, n, stores) or a damaged vault.toml."""


class UnknownPerson(VaultError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "unknown person"


class UnknownImage(VaultError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown image"


class NotEnoughShares(VaultError):
    """Fewer than k shares of an image are present and valid."""


class InvalidImage(VaultError, ValueError):
    """Bytes that are not a decodable JPEG/PNG face image of sane size."""


class InvalidPersonId(VaultError, ValueError):
    pass


class CorruptShare(VaultError):
    """A share file whose tag does not verify or whose header names another image/x/share."""


class AuditChainBroken(VaultError):
    """The audit log was edited, reordered or truncated."""


class VaultBusy(VaultError):
    """Another process (or thread) holds the vault's writer lock for longer than a writer waits."""


class DuplicateImage(InvalidImage):
    """The same image bytes are already stored for another person."""
