"""The site's secret-shared face vault. See `vault.py` for the design, `store.py` for stores."""

from client.vault.audit import verify_audit_chain
from client.vault.errors import (AuditChainBroken, CorruptShare, InvalidConfig, InvalidImage, InvalidPersonId,
                                 NotEnoughShares, ShareNotFound, StoreError, StoreUnavailable, UnknownImage,
                                 UnknownPerson, VaultError)
from client.vault.reports import (EraseReport, ImageProblem, OrphanShare, PersonRecord, RepairReport, ShareProblem,
                                  StoreHealth, VerifyReport)
from client.vault.store import LocalDirStore, Store, open_store
from client.vault.vault import Vault

__all__ = [
    "Vault", "Store", "LocalDirStore", "open_store", "verify_audit_chain",
    "PersonRecord", "EraseReport", "VerifyReport", "RepairReport", "ShareProblem", "OrphanShare", "ImageProblem",
    "StoreHealth",
    "VaultError", "InvalidConfig", "UnknownPerson", "UnknownImage", "NotEnoughShares", "InvalidImage",
    "InvalidPersonId", "CorruptShare", "AuditChainBroken", "StoreError", "StoreUnavailable", "ShareNotFound",
]
