"""Records the vault returns: people, and what verify, repair and erase found or did."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PersonRecord:
    person_id: str
    pseudonym: str
    n_images: int


@dataclass(frozen=True)
class StoreHealth:
    x: int
    url: str
    reachable: bool
    shares: int = 0
    error: str | None = None


@dataclass(frozen=True)
class ShareProblem:
    """One share that is not as the manifest says: `missing`, `corrupt` or `unreachable`."""

    image_id: str
    person_id: str
    x: int
    store: str
    share_id: str
    problem: str
    detail: str = ""

    def __str__(self) -> str:
        extra = f": {self.detail}" if self.detail else ""
        return (
            f"image {self.image_id} of person {self.person_id}: share x={self.x} in store {self.store} "
            f"{self.problem}{extra}"
        )


@dataclass(frozen=True)
class OrphanShare:
    """A share file no manifest row refers to. `ours`: its tag verifies with this vault's key."""

    x: int
    store: str
    share_id: str
    ours: bool  # this vault's tag and the x of the store it sits in
    owner: bytes | None = None  # keyed hash of the pseudonym (ours only)
    copy_of: str | None = None  # a referenced share's id in its header: a stray copy under another name


@dataclass(frozen=True)
class ImageProblem:
    image_id: str
    person_id: str
    detail: str

    def __str__(self) -> str:
        return f"image {self.image_id} of person {self.person_id}: {self.detail}"


@dataclass
class VerifyReport:
    stores: list[StoreHealth] = field(default_factory=list)
    images: int = 0
    shares_ok: int = 0
    missing: list[ShareProblem] = field(default_factory=list)
    corrupt: list[ShareProblem] = field(default_factory=list)
    unreachable: list[ShareProblem] = field(default_factory=list)  # in a store that is down
    unrecoverable: list[ImageProblem] = field(default_factory=list)  # fewer than k valid shares
    inconsistent: list[ImageProblem] = field(default_factory=list)  # valid shares that disagree
    orphans: list[OrphanShare] = field(default_factory=list)
    misplaced_stores: list[str] = field(default_factory=list)  # swapped, foreign or unidentified stores
    pending_deletions: int = 0
    audit_entries: int = 0
    audit_error: str | None = None

    @property
    def ok(self) -> bool:
        return not (
            self.missing
            or self.corrupt
            or self.unreachable
            or self.unrecoverable
            or self.inconsistent
            or self.orphans
            or self.misplaced_stores
            or self.pending_deletions
            or self.audit_error
            or not all(s.reachable for s in self.stores)
        )


@dataclass
class RepairReport:
    regenerated: list[ShareProblem] = field(default_factory=list)  # the problems that were fixed
    unrecoverable: list[ImageProblem] = field(default_factory=list)
    inconsistent: list[ImageProblem] = field(default_factory=list)
    not_repaired: list[ShareProblem] = field(default_factory=list)  # store down or refused the write
    orphans_removed: int = 0
    foreign_orphans: list[OrphanShare] = field(default_factory=list)  # not ours: left alone
    pending_deletions_finished: int = 0
    pending_deletions_left: int = 0
    orphans_kept: list[OrphanShare] = field(default_factory=list)  # ours, unreferenced, not provably dead
    misplaced_stores: list[str] = field(default_factory=list)  # fenced off (identity.py); `vault remap`
    stores_adopted: list[int] = field(default_factory=list)  # empty replacement stores given their identity
    audit_error: str | None = None

    @property
    def ok(self) -> bool:
        return not (
            self.audit_error
            or self.misplaced_stores
            or self.unrecoverable
            or self.inconsistent
            or self.not_repaired
            or self.foreign_orphans
            or self.pending_deletions_left
        )


@dataclass(frozen=True)
class EraseReport:
    request_id: str
    pseudonym: str
    images: int
    shares_destroyed: int
    shares_pending: int
    unreachable_stores: list[str]
    unrecoverable: bool  # every image lost at least n-k+1 shares: no k remain anywhere

    @property
    def complete(self) -> bool:
        return self.shares_pending == 0
