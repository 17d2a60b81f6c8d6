"""A trained facefed model as a tool: embed faces, compare two, identify one in a gallery.

    import facefed
    m = facefed.load("model.pt")              # a facefed checkpoint, or the CASIA .pth with threshold=
    m.compare("a.jpg", "b.jpg")               # Comparison(cosine, same, threshold, far)

Images are paths, bytes or PIL images. Their layout decides what happens (`facefed.common.faces`):
a 224x224 canonical enrolment crop gives its centre 112x112 and an aligned 112x112 face is used as
is (neither is re-detected); anything else is a photo and must show exactly one usable face, which
is detected and aligned (else a one-line NoFace / SeveralFaces / FaceTooSmall naming the file).
Embeddings are flip-averaged like evaluation: the normalised sum of the embeddings of the face and
its mirror, as unit float32 vectors. Decisions use the checkpoint's stored threshold (chosen at a
stated FAR on validation pairs, common/calibration.py) unless `threshold=` overrides it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from PIL import Image

from facefed.common.calibration import NoThreshold, Threshold, preprocessing, stored_threshold
from facefed.common.device import resolve_device
from facefed.common.errors import FacefedError
from facefed.common.faces.align import CANONICAL_CENTRE
from facefed.common.faces.detect import align_single
from facefed.common.faces.enrol import open_photo
from facefed.common.faces.layouts import ALIGNED, CANONICAL, layout_of
from facefed.common.model.mobilefacenet import MobileFaceNet, load_checkpoint
from facefed.common.preprocess import to_input

ImageLike: TypeAlias = "str | os.PathLike[str] | bytes | bytearray | Image.Image"
Vector: TypeAlias = npt.NDArray[np.float32]
GalleryEntry: TypeAlias = "ImageLike | Vector | Sequence[ImageLike | Vector]"

BATCH = 64


class ModelNotFound(FacefedError, FileNotFoundError):
    """The model file does not exist."""


class BadInput(FacefedError, ValueError):
    """An image or embedding the embedder cannot use; the message names it."""


@dataclass(frozen=True)
class Comparison:
    """Two faces: their cosine, the decision (cosine > threshold), the threshold and its FAR."""

    cosine: float
    same: bool
    threshold: float
    far: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Match:
    """The gallery person whose best cosine with the probe is highest and above the threshold."""

    name: str
    cosine: float
    threshold: float
    far: float | None
    scores: dict[str, float] = field(default_factory=dict)  # every person's best cosine

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _what(item: object, i: int) -> str:
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    return f"image #{i + 1} ({type(item).__name__})"


def face_of(item: ImageLike, *, what: str, backend: str | None = None) -> Image.Image:
    """The aligned 112x112 RGB face of one image (see the module docstring for the layouts)."""
    if isinstance(item, Image.Image):
        img = item.convert("RGB")
    elif isinstance(item, (bytes, bytearray, memoryview)):
        img = open_photo(bytes(item), what=what)
    elif isinstance(item, (str, os.PathLike)):
        path = Path(item).expanduser()
        if not path.is_file():
            raise BadInput(f"{what}: no such image file")
        img = open_photo(path.read_bytes(), what=what)
    else:
        raise BadInput(f"{what}: expected a path, bytes or a PIL image, got {type(item).__name__}")
    layout = layout_of(img.size)
    if layout == CANONICAL:
        return img.crop(CANONICAL_CENTRE)
    if layout == ALIGNED:
        return img
    return align_single(img, what=what, backend=backend)


class Embedder:
    """A MobileFaceNet with its threshold, preprocessing and provenance (use `load`)."""

    def __init__(
        self,
        model: MobileFaceNet,
        meta: dict[str, Any] | None = None,
        *,
        device: str | torch.device = "auto",
        threshold: float | None = None,
        source: str = "",
    ):
        self.meta = dict(meta or {})
        self.device = resolve_device(device)
        self.model = model.eval().to(self.device)
        self.source = source
        self.threshold: Threshold | None = (
            Threshold.given(threshold) if threshold is not None else stored_threshold(self.meta)
        )
        self.preprocessing: dict[str, Any] = dict(self.meta.get("preprocessing") or preprocessing())
        self.provenance: dict[str, Any] = dict(self.meta.get("provenance") or {})
        self.backend: str | None = None  # aligner backend for raw photos (default: $FACEFED_ALIGNER or dlib)

    def __repr__(self) -> str:
        t = self.threshold.describe() if self.threshold else "none"
        return f"Embedder({self.source or 'model'}, device={self.device}, threshold={t})"

    @property
    def dim(self) -> int:
        return int(self.model.features.out_channels)

    # -- embeddings --------------------------------------------------------------------------
    def faces(self, images: Iterable[ImageLike]) -> list[Image.Image]:
        """The aligned 112x112 faces the model sees."""
        return [face_of(item, what=_what(item, i), backend=self.backend) for i, item in enumerate(images)]

    @torch.inference_mode()
    def embed_faces(self, faces: Sequence[Image.Image]) -> Vector:
        """(N, dim) unit float32 embeddings of aligned 112x112 faces, flip-averaged."""
        out = np.empty((len(faces), self.dim), np.float32)
        for i in range(0, len(faces), BATCH):
            chunk = faces[i : i + BATCH]
            u8 = torch.stack([torch.from_numpy(np.asarray(f, np.uint8).copy()).permute(2, 0, 1) for f in chunk])
            x = to_input(u8).to(self.device)
            e = F.normalize(self.model(x) + self.model(x.flip(3)), dim=1)
            out[i : i + len(chunk)] = e.float().cpu().numpy()
        return out

    def embed(self, images: ImageLike | Iterable[ImageLike]) -> Vector:
        """(N, dim) unit float32 embeddings of images (one image: N = 1)."""
        items: list[ImageLike] = [images] if _is_single(images) else list(images)  # type: ignore[list-item,arg-type]
        return self.embed_faces(self.faces(items))

    # -- decisions ---------------------------------------------------------------------------
    def _decision(self) -> Threshold:
        if self.threshold is None:
            raise NoThreshold(
                f"{self.source or 'this model'} has no stored decision threshold; pass threshold= to "
                "facefed.load (--threshold on the CLI), or use a checkpoint the server evaluated "
                "(facefed-server export)"
            )
        return self.threshold

    def _vectors(self, items: Sequence[ImageLike | Vector]) -> Vector:
        """Embeddings of a mix of images and precomputed vectors, images embedded in one batch."""
        out = np.empty((len(items), self.dim), np.float32)
        images = [(i, x) for i, x in enumerate(items) if not isinstance(x, np.ndarray)]
        if images:
            faces = [face_of(x, what=_what(x, i), backend=self.backend) for i, x in images]
            out[[i for i, _ in images]] = self.embed_faces(faces)
        for i, x in enumerate(items):
            if isinstance(x, np.ndarray):
                v = np.asarray(x, np.float32).reshape(-1)
                n = float(np.linalg.norm(v))
                if v.shape != (self.dim,) or not np.isfinite(v).all() or n == 0:
                    raise BadInput(f"embedding #{i + 1}: expected a non-zero finite vector of {self.dim} numbers")
                out[i] = v / n
        return out

    def compare(self, a: ImageLike | Vector, b: ImageLike | Vector) -> Comparison:
        """Cosine of two faces (images or embeddings) and same/different at the stored threshold."""
        t = self._decision()
        va, vb = self._vectors([a, b])
        cos = float(np.dot(va, vb))
        return Comparison(cos, cos > t.threshold, t.threshold, t.far)

    def embed_gallery(self, gallery: Mapping[str, GalleryEntry]) -> dict[str, Vector]:
        """name -> (k, dim) embeddings, for repeated `identify` calls."""
        flat: list[tuple[str, ImageLike | Vector]] = []
        for name, entry in gallery.items():
            entries = _entries(entry)
            if not entries:
                raise BadInput(f"gallery entry {name!r} has no image or embedding")
            flat += [(name, e) for e in entries]
        vecs = self._vectors([e for _, e in flat])
        out: dict[str, list[Vector]] = {}
        for (name, _), v in zip(flat, vecs, strict=True):
            out.setdefault(name, []).append(v)
        return {name: np.stack(vs) for name, vs in out.items()}

    def identify(self, image: ImageLike | Vector, gallery: Mapping[str, GalleryEntry]) -> Match | None:
        """The gallery person most similar to `image` if their best cosine is above the threshold, else None.

        `gallery`: name -> an image, a list of images, or precomputed embeddings (`embed_gallery`)."""
        t = self._decision()
        if not gallery:
            raise BadInput("the gallery is empty")
        probe = self._vectors([image])[0]
        scores = {name: float((vecs @ probe).max()) for name, vecs in self.embed_gallery(gallery).items()}
        best = max(scores, key=lambda n: scores[n])
        if scores[best] <= t.threshold:
            return None
        return Match(best, scores[best], t.threshold, t.far, scores)


def _is_single(x: object) -> bool:
    return isinstance(x, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image))


def _entries(entry: object) -> list[Any]:
    if isinstance(entry, np.ndarray):
        return list(entry) if entry.ndim == 2 else [entry]
    if _is_single(entry):
        return [entry]
    if isinstance(entry, Iterable):
        out: list[Any] = []
        for e in entry:
            out += _entries(e)
        return out
    raise BadInput(f"gallery entry of type {type(entry).__name__}: give images (paths, bytes, PIL) or embeddings")


def load(
    path: str | os.PathLike[str], *, device: str | torch.device = "auto", threshold: float | None = None
) -> Embedder:
    """An Embedder from a facefed checkpoint (server round, export, local training) or the CASIA .pth.

    `threshold` overrides the checkpoint's stored one (the pretrained weights have none)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelNotFound(
            f"{p}: no such model file; give a facefed checkpoint (facefed-server export) or the pretrained .pth"
        )
    model, meta = load_checkpoint(p)
    return Embedder(model, meta, device=device, threshold=threshold, source=str(p))
