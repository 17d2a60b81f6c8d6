"""The site's secret-shared face vault (design: docs/vault.md). `Vault` is the API; stores in `stores/`."""

from facefed.client.vault.audit import verify_audit_chain
from facefed.client.vault.errors import (
    AuditChainBroken,
    CorruptShare,
    InvalidConfig,
    InvalidImage,
    InvalidPersonId,
    NotEnoughShares,
    ShareNotFound,
    StoreError,
    StoreUnavailable,
    UnknownImage,
    UnknownPerson,
    VaultError,
)
from facefed.client.vault.reports import (
    EraseReport,
    ImageProblem,
    OrphanShare,
    PersonRecord,
    RepairReport,
    ShareProblem,
    StoreHealth,
    VerifyReport,
)
from facefed.client.vault.stores import LocalDirStore, Store, open_store
from facefed.client.vault.vault import Vault

__all__ = [
    "Vault",
    "Store",
    "LocalDirStore",
    "open_store",
    "verify_audit_chain",
    "PersonRecord",
    "EraseReport",
    "VerifyReport",
    "RepairReport",
    "ShareProblem",
    "OrphanShare",
    "ImageProblem",
    "StoreHealth",
    "VaultError",
    "InvalidConfig",
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
