"""Labeled Faces in the Wild: the images and the official protocol files, exactly as published.

One reader for both forms users have: the official `lfw-deepfunneled.tgz` and its extracted tree.
A gzip'd tar has no random access, so the archive is read in single sequential passes: one at open
time for the listing and the (small) protocol files, one per `iter_images` call for image bytes.
Image bytes are returned in memory; nothing is extracted to disk.

Protocol formats (see the archive's README.txt):
- `people.txt`: a fold count, then per fold a person count and `name<TAB>n_images` lines.
  `peopleDevTrain.txt` / `peopleDevTest.txt`: one such fold without the leading fold count.
- View 1 pairs (`pairsDevTrain.txt`, `pairsDevTest.txt`): N, then N matched lines `name i j`, then N
  mismatched lines `name1 i name2 j`.
- View 2 pairs (`pairs.txt`): `folds N`, then per fold N matched then N mismatched lines.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from facefed.common.errors import FacefedError
from facefed.common.paths import lfw_path

IMAGE_DIRS = ("lfw-deepfunneled", "lfw_funneled", "lfw")
PROTOCOL_FILES = (
    "pairs.txt",
    "pairsDevTrain.txt",
    "pairsDevTest.txt",
    "people.txt",
    "peopleDevTrain.txt",
    "peopleDevTest.txt",
)
_IMAGE_RE = re.compile(r"^(?:.*/)?([^/]+)/\1_(\d{4})\.jpg$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.'\-]+$")


class LFWFormatError(FacefedError, ValueError):
    """A protocol file or archive that does not follow the published LFW layout."""


@dataclass(frozen=True, order=True)
class ImageKey:
    """One LFW image: person name and 1-based image number, as the protocol files write them."""

    name: str
    index: int

    @property
    def relpath(self) -> str:
        return f"{self.name}/{self.name}_{self.index:04d}.jpg"


@dataclass(frozen=True)
class Pair:
    a: ImageKey
    b: ImageKey
    same: bool


def _check_name(name: str, where: str) -> str:
    if not _NAME_RE.match(name):
        raise LFWFormatError(f"{where}: {name!r} is not an LFW person name")
    return name


def _int(token: str, where: str) -> int:
    try:
        value = int(token)
    except ValueError:
        raise LFWFormatError(f"{where}: expected an integer, got {token!r}") from None
    if value < 0:
        raise LFWFormatError(f"{where}: expected a non-negative integer, got {value}")
    return value


def _lines(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.strip()]


def parse_people(text: str) -> list[list[tuple[str, int]]]:
    """Parse a people file into folds of (name, image count).

    `people.txt` starts with the fold count; the View 1 files are a single fold.
    """
    rows = _lines(text)
    if not rows:
        raise LFWFormatError("people file is empty")
    pos = 0

    def read_fold() -> list[tuple[str, int]]:
        nonlocal pos
        if pos >= len(rows) or len(rows[pos]) != 1:
            raise LFWFormatError(f"people file line {pos + 1}: expected a person count")
        count = _int(rows[pos][0], f"people file line {pos + 1}")
        pos += 1
        fold = []
        for _ in range(count):
            if pos >= len(rows) or len(rows[pos]) != 2:
                raise LFWFormatError(f"people file line {pos + 1}: expected `name count`")
            where = f"people file line {pos + 1}"
            fold.append((_check_name(rows[pos][0], where), _int(rows[pos][1], where)))
            pos += 1
        return fold

    # A lone integer followed by another lone integer means a fold count (people.txt).
    if len(rows) > 1 and len(rows[0]) == 1 and len(rows[1]) == 1:
        n_folds = _int(rows[0][0], "people file line 1")
        pos = 1
        folds = [read_fold() for _ in range(n_folds)]
    else:
        folds = [read_fold()]
    if pos != len(rows):
        raise LFWFormatError(f"people file line {pos + 1}: unexpected trailing content")
    return folds


def _pair(row: list[str], where: str) -> Pair:
    if len(row) == 3:
        name = _check_name(row[0], where)
        return Pair(ImageKey(name, _int(row[1], where)), ImageKey(name, _int(row[2], where)), True)
    if len(row) == 4:
        a = ImageKey(_check_name(row[0], where), _int(row[1], where))
        b = ImageKey(_check_name(row[2], where), _int(row[3], where))
        return Pair(a, b, False)
    raise LFWFormatError(f"{where}: expected `name i j` or `name1 i name2 j`, got {len(row)} fields")


def parse_pairs(text: str) -> list[list[Pair]]:
    """Parse View 1 (`N`) or View 2 (`folds N`) pairs into folds of pairs (matched first)."""
    rows = _lines(text)
    if not rows:
        raise LFWFormatError("pairs file is empty")
    header = rows[0]
    if len(header) == 1:
        n_folds, per_kind = 1, _int(header[0], "pairs file line 1")
    elif len(header) == 2:
        n_folds, per_kind = _int(header[0], "pairs file line 1"), _int(header[1], "pairs file line 1")
    else:
        raise LFWFormatError("pairs file line 1: expected `N` or `folds N`")
    expected = 1 + n_folds * 2 * per_kind
    if len(rows) != expected:
        raise LFWFormatError(f"pairs file: header promises {expected - 1} pairs, found {len(rows) - 1}")
    folds: list[list[Pair]] = []
    pos = 1
    for f in range(n_folds):
        fold = [_pair(rows[pos + i], f"pairs file line {pos + i + 1}") for i in range(2 * per_kind)]
        if not all(p.same for p in fold[:per_kind]) or any(p.same for p in fold[per_kind:]):
            raise LFWFormatError(f"pairs file fold {f + 1}: expected {per_kind} matched then {per_kind} mismatched")
        folds.append(fold)
        pos += 2 * per_kind
    return folds


def partition_people(names: Iterable[str], num_sites: int, *, seed: str = "facefed-v1") -> list[list[str]]:
    """Deterministic, disjoint split of people over sites.

    People are ordered by a keyed hash of their name (so the split does not follow the alphabet,
    and changing `seed` gives another split) and dealt round-robin; each site's list is sorted.
    """
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites}")
    unique = sorted(set(names))
    ordered = sorted(unique, key=lambda n: hashlib.sha256(f"{seed}\x00{n}".encode()).digest())
    sites: list[list[str]] = [[] for _ in range(num_sites)]
    for i, name in enumerate(ordered):
        sites[i % num_sites].append(name)
    return [sorted(s) for s in sites]


SITE_MIN_IMAGES = 2  # a site's person has at least this many images (one matched pair)


class LFW:
    """An LFW archive (`.tgz`/`.tar.gz`/`.tar`) or extracted tree, opened read-only."""

    def __init__(self, path: str | Path | None = None):
        self.path = lfw_path(path)
        self._texts: dict[str, str] = {}
        self._counts: dict[str, int] = {}
        self._image_root: Path | None = None  # tree form only
        self._members: dict[str, str] = {}  # relpath -> tar member name (archive form only)
        if self.path.is_dir():
            self._open_tree()
        else:
            self._open_archive()
        if not self._counts:
            raise LFWFormatError(f"{self.path}: no LFW images (expected <dir>/<Name>/<Name>_NNNN.jpg)")

    # -- opening -------------------------------------------------------------------------------
    def _open_tree(self) -> None:
        root = self.path
        candidates = [root / d for d in IMAGE_DIRS if (root / d).is_dir()]
        self._image_root = candidates[0] if candidates else root
        for proto_dir in (root, self._image_root, self._image_root.parent):
            for fname in PROTOCOL_FILES:
                f = proto_dir / fname
                if fname not in self._texts and f.is_file():
                    self._texts[fname] = f.read_text()
        for person_dir in self._image_root.iterdir():
            if person_dir.is_dir():
                n = sum(1 for f in person_dir.iterdir() if _IMAGE_RE.match(f"{person_dir.name}/{f.name}"))
                if n:
                    self._counts[person_dir.name] = n

    def _open_archive(self) -> None:
        try:
            with tarfile.open(self.path, "r:*") as tar:
                for member in tar:
                    base = member.name.rsplit("/", 1)[-1]
                    if member.isfile() and base in PROTOCOL_FILES and base not in self._texts:
                        data = tar.extractfile(member)
                        assert data is not None
                        self._texts[base] = data.read().decode()
                        continue
                    m = _IMAGE_RE.match(member.name)
                    if member.isfile() and m:
                        rel = f"{m.group(1)}/{m.group(1)}_{m.group(2)}.jpg"
                        self._members[rel] = member.name
                        self._counts[m.group(1)] = self._counts.get(m.group(1), 0) + 1
        except (tarfile.TarError, EOFError, OSError) as e:
            raise LFWFormatError(f"{self.path}: not a readable LFW archive ({e})") from e

    # -- listing and protocol ------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Image count per person, from the images actually present."""
        return dict(self._counts)

    def keys(self, name: str) -> list[ImageKey]:
        if name not in self._counts:
            raise KeyError(f"person {name!r} is not in {self.path}")
        return [ImageKey(name, i) for i in range(1, self._counts[name] + 1)]

    def text(self, fname: str) -> str:
        if fname not in PROTOCOL_FILES:
            raise ValueError(f"{fname!r} is not an LFW protocol file ({', '.join(PROTOCOL_FILES)})")
        if fname not in self._texts:
            raise LFWFormatError(f"{self.path}: protocol file {fname} is missing")
        return self._texts[fname]

    def people(self, fname: str = "peopleDevTrain.txt") -> list[str]:
        """Names listed in a people file (all folds), in file order."""
        return [name for fold in parse_people(self.text(fname)) for name, _ in fold]

    def pairs(self, fname: str = "pairsDevTest.txt") -> list[list[Pair]]:
        return parse_pairs(self.text(fname))

    def trainable_people(self) -> list[str]:
        """The people LFW-built sites train on (the demo's, the benchmarks'): peopleDevTrain's people
        with at least SITE_MIN_IMAGES images. View 2 pairs with none of them are pairs of unseen people."""
        return [n for n in self.people("peopleDevTrain.txt") if self._counts.get(n, 0) >= SITE_MIN_IMAGES]

    # -- image bytes ---------------------------------------------------------------------------
    def iter_images(self, keys: Iterable[ImageKey]) -> Iterator[tuple[ImageKey, bytes]]:
        """Yield (key, JPEG bytes) for the requested images; archive order for a tgz."""
        wanted = {k.relpath: k for k in keys}
        missing = [
            r
            for r in wanted
            if (r not in self._members if self._image_root is None else not (self._image_root / r).is_file())
        ]
        if missing:
            raise KeyError(f"{len(missing)} requested image(s) not in {self.path}, e.g. {missing[0]}")
        if self._image_root is not None:
            for rel in sorted(wanted):
                yield wanted[rel], (self._image_root / rel).read_bytes()
            return
        by_member = {self._members[rel]: wanted[rel] for rel in wanted}
        with tarfile.open(self.path, "r:*") as tar:
            for member in tar:
                key = by_member.pop(member.name, None)
                if key is None:
                    continue
                data = tar.extractfile(member)
                assert data is not None
                yield key, data.read()
                if not by_member:
                    return

    def load_images(self, keys: Iterable[ImageKey]) -> dict[ImageKey, bytes]:
        return dict(self.iter_images(keys))

    def read_image(self, key: ImageKey) -> bytes:
        return next(iter(self.iter_images([key])))[1]
