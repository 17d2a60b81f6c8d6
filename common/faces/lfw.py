"""Public LFW images through detection + alignment, with a landmarks cache.

LFW images are aligned like any photo: detect, take the face nearest the image centre (the LFW
convention: the named person is the centred face; other people in the background are ignored),
warp onto the template. An image without a detection gets no face (`None`): evaluation then uses
FIXED_CROP_FALLBACK for it and reports it; import and training skip it and report it.
`canonical_public` gives each image as the vault stores it (the canonical 224x224 crop, JPEG), so
training straight from LFW sees exactly the pixels a site importing the same images would.

The cache keeps only landmarks (five points of the central face, or "no face"), never image bytes,
so repeated imports and evaluations skip detection. It is meant for public datasets only: enrolment
of private photos never touches it. Entries are keyed by the SHA-256 of the image bytes (the
content identity of the archive member, so a changed or re-extracted archive can never be served
stale landmarks, and the tgz and its extracted tree share entries), one JSON file per backend in
$FACEFED_CACHE/landmarks (default ~/.cache/facefed/landmarks).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from facefed.common.faces.align import (
    ALIGNED_SIZE,
    CANONICAL_MARGIN,
    Landmarks,
    align,
    encode_canonical,
    pick_central,
)
from facefed.common.faces.detect import get_detector

CACHE_ENV = "FACEFED_CACHE"
K = TypeVar("K")


def cache_dir() -> Path:
    """$FACEFED_CACHE, else ~/.cache/facefed."""
    value = os.environ.get(CACHE_ENV)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "facefed"


class LandmarkCache:
    """Landmarks of the central face of public images, by content digest; None = no face found."""

    def __init__(self, backend: str, root: Path | None = None):
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in backend)
        self.path = (root or cache_dir()) / "landmarks" / f"{safe}.json"
        self.backend = backend
        self._entries: dict[str, list[list[float]] | None] = self._read()
        self._new: dict[str, list[list[float]] | None] = {}

    @staticmethod
    def key(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()[:40]

    def _read(self) -> dict[str, list[list[float]] | None]:
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(doc, dict) or doc.get("backend") != self.backend or not isinstance(doc.get("faces"), dict):
            return {}
        return dict(doc["faces"])

    def get(self, key: str) -> tuple[bool, Landmarks | None]:
        """(hit, landmarks or None)."""
        if key not in self._entries:
            return False, None
        value = self._entries[key]
        return True, None if value is None else np.asarray(value, np.float64)

    def put(self, key: str, landmarks: Landmarks | None) -> None:
        value = None if landmarks is None else [[round(float(v), 3) for v in row] for row in landmarks]
        self._entries[key] = self._new[key] = value

    def save(self) -> None:
        """Merge new entries into the file (atomic replace); a cache that cannot be written is skipped."""
        if not self._new:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            merged = {**self._read(), **self._new}
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".landmarks-")
            with os.fdopen(fd, "w") as f:
                json.dump({"backend": self.backend, "faces": merged}, f, separators=(",", ":"))
            os.replace(tmp, self.path)
            self._entries.update(merged)
            self._new.clear()
        except OSError as e:
            warnings.warn(f"landmarks cache {self.path} not written ({e})", RuntimeWarning, stacklevel=2)


@dataclass
class AlignReport:
    """What happened to a batch of public images: detections run, cache hits, images with no face."""

    detected: int = 0
    cached: int = 0
    no_face: list[str] = field(default_factory=list)


def align_public(
    items: Iterable[tuple[K, bytes]],
    *,
    size: int = ALIGNED_SIZE,
    margin: int = 0,
    backend: str | None = None,
    use_cache: bool = True,
    report: AlignReport | None = None,
    save_every: int = 256,
) -> Iterator[tuple[K, Image.Image, Image.Image | None]]:
    """(key, decoded RGB image, aligned central face or None) for each (key, JPEG/PNG bytes)."""
    detector = get_detector(backend)
    cache = LandmarkCache(detector.name) if use_cache else None
    # a backend that finds the same faces as another wherever that one found any (dlib = HOG, then a
    # CNN on HOG's misses) takes those entries from the other's cache and detects only the rest
    alike = getattr(detector, "same_faces_as", None)
    base = LandmarkCache(alike) if use_cache and alike else None
    report = report if report is not None else AlignReport()
    try:
        for n, (key, data) in enumerate(items, start=1):
            image = Image.open(io.BytesIO(data)).convert("RGB")
            digest = LandmarkCache.key(data)
            hit, lm = cache.get(digest) if cache is not None else (False, None)
            if not hit and base is not None and cache is not None:
                hit, lm = base.get(digest)
                hit = hit and lm is not None  # its "no face" is not ours: the CNN may find one
                if hit:
                    cache.put(digest, lm)
            if hit:
                report.cached += 1
            else:
                face = pick_central(detector(image), image.size)
                lm = None if face is None else face.landmarks
                report.detected += 1
                if cache is not None:
                    cache.put(digest, lm)
            if lm is None:
                report.no_face.append(str(key))
            yield key, image, None if lm is None else align(image, lm, size, margin=margin)
            if cache is not None and n % save_every == 0:
                cache.save()
    finally:
        if cache is not None:
            cache.save()


def canonical_public(
    items: Iterable[tuple[K, bytes]],
    *,
    backend: str | None = None,
    use_cache: bool = True,
    report: AlignReport | None = None,
) -> Iterator[tuple[K, bytes | None]]:
    """(key, the canonical enrolment crop as `vault import --lfw` stores it (224x224 JPEG), or None
    when no face was detected) for each (key, JPEG/PNG bytes)."""
    for key, _, crop in align_public(
        items, margin=CANONICAL_MARGIN, backend=backend, use_cache=use_cache, report=report
    ):
        yield key, None if crop is None else encode_canonical(crop)
