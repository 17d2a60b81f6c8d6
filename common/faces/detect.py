"""Face detectors behind one small interface, and the enrolment rule "exactly one usable face".

A backend is any callable `Detector` (PIL image -> list[Face], best first) with a `name` that
identifies detector, weights and landmark mapping (the landmarks cache is keyed by it). The
backends are dlib's (`dlib-bin`, Boost Software License) with models shipped inside
`face-recognition-models` (public domain; nothing is downloaded at run time): `dlib` (the default)
runs the HOG frontal detector and, only where it finds no face, dlib's MMOD CNN detector on the
photo scaled down to CNN_MAX_SIDE (HOG misses turned faces: 40 of View 2's 7,701 images, all of
which the CNN finds; bench/faces.py); `dlib-hog` is HOG alone (what checkpoints before the CNN
stage were evaluated with). Both place the 5-point shape predictor in the detected box. dlib's 5
points are the four eye corners and the nose base, not ArcFace's points; they are
fitted onto DLIB5_TEMPLATE, the mean position of those points in the ArcFace 112x112 frame
(measured on 1,000 LFW peopleDevTrain faces, disjoint from the test pairs), and the returned
ArcFace-order landmarks are the ArcFace template mapped back through that fit, so that
`align(image, face.landmarks)` is the same warp for every backend. See docs/faces.md.

A later, better aligner registers itself with `register_backend(name, factory)`; the vault's
canonical crops keep a margin around the face so it can re-detect inside them.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from facefed.common.errors import FacefedError
from facefed.common.faces.align import (
    ALIGNED_SIZE,
    ARCFACE_TEMPLATE,
    Face,
    Landmarks,
    align,
    apply,
    similarity_transform,
)

DEFAULT_BACKEND = "dlib"
# A face whose 112x112 region spans fewer source pixels than this would be upscaled more than 2x.
MIN_FACE_PX = 56
DETECT_MAX_SIDE = 800  # detectors see photos downscaled to this (landmarks come from full resolution)
# The CNN fallback sees the photo at most this big, at no upsampling: it finds faces of at least about a
# quarter of the photo's side (80 px of 320) in ~1 s on 2 cores, where 800 px took 6 to 12 s.
CNN_MAX_SIDE = 320

# dlib's 5 points (image-left eye outer, inner, image-right eye inner, outer, nose base) in the
# ArcFace 112x112 frame (docs/faces.md: fitted on LFW peopleDevTrain).
DLIB5_TEMPLATE: Landmarks = np.array(
    [[31.0143, 53.5528], [44.9028, 53.7121], [66.0223, 53.437], [79.805, 52.9237], [55.853, 79.8383]],
    dtype=np.float64,
)


class FaceError(FacefedError, ValueError):
    """A photo that cannot become an enrolment crop: no face, several faces, or a face too small."""


class NoFace(FaceError):
    pass


class SeveralFaces(FaceError):
    pass


class FaceTooSmall(FaceError):
    pass


class AlignerUnavailable(FacefedError):
    """The face detector's package is not installed."""


class Detector(Protocol):
    """A face detector: all faces in an RGB image, best first, landmarks in ArcFace order."""

    name: str

    def __call__(self, image: Image.Image) -> list[Face]: ...


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # does not import the package
    if spec is None or not spec.submodule_search_locations:
        raise AlignerUnavailable(
            f"package {name!r} is not installed; install facefed's dependencies (pip install -e .) for face alignment"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _downscaled(img: Image.Image, max_side: int) -> tuple[Image.Image, float]:
    if not max_side or max(img.size) <= max_side:
        return img, 1.0
    scale = max_side / max(img.size)
    return img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BOX), scale


class DlibDetector:
    """dlib HOG frontal detector (upsample 1); where it finds nothing, dlib's MMOD CNN detector on the
    photo at CNN_MAX_SIDE; then the 5-point shape predictor in each box, mapped to ArcFace order."""

    name = "dlib-hog1-mmod320-sp5-v2"
    cnn_fallback = True
    # The backend (by name) whose found faces this one finds too, with the same landmarks: HOG alone,
    # as the CNN runs only on HOG's misses; a landmarks cache that one filled is reused (set below).
    same_faces_as: str | None = None

    def __init__(self, upsample: int = 1, max_side: int = DETECT_MAX_SIDE):
        models = _package_dir("face_recognition_models") / "models"
        predictor = models / "shape_predictor_5_face_landmarks.dat"
        mmod = models / "mmod_human_face_detector.dat"
        for f in (predictor, mmod) if self.cnn_fallback else (predictor,):
            if not f.is_file():
                raise AlignerUnavailable(f"{f} is missing; reinstall face-recognition-models")
        try:
            import dlib
        except ImportError as e:
            raise AlignerUnavailable(f"dlib is not importable ({e}); install dlib-bin") from e
        self._dlib: Any = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._cnn = dlib.cnn_face_detection_model_v1(str(mmod)) if self.cnn_fallback else None
        self._predictor = dlib.shape_predictor(str(predictor))
        self.upsample, self.max_side = upsample, max_side
        self._lock = threading.Lock()  # one detection at a time: dlib objects are not shared across threads

    def _points(self, arr: np.ndarray, rect: Any) -> Landmarks:
        shape = self._predictor(arr, rect)
        p = np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], np.float64)
        # dlib: 0, 1 = image-right eye outer, inner; 2, 3 = image-left eye outer, inner; 4 = nose base
        out: Landmarks = p[[2, 3, 1, 0, 4]]
        return out

    def _boxes(self, img: Image.Image) -> list[tuple[tuple[float, float, float, float], float]]:
        """(box in `img`'s pixels, score) per face: HOG, else the CNN (its confidence is on another
        scale than HOG's; within one photo the faces come from one detector only)."""
        small, scale = _downscaled(img, self.max_side)
        rects, scores, _ = self._detector.run(np.asarray(small), self.upsample, 0.0)
        found = [((r.left(), r.top(), r.right(), r.bottom()), float(s), scale) for r, s in zip(rects, scores)]
        if not found and self._cnn is not None:
            small, scale = _downscaled(img, CNN_MAX_SIDE)
            found = [
                ((d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom()), float(d.confidence), scale)
                for d in self._cnn(np.asarray(small), 0)
            ]
        return [(tuple(v / sc for v in box), score) for box, score, sc in found]

    def __call__(self, image: Image.Image) -> list[Face]:
        img = image.convert("RGB")
        arr = np.asarray(img)
        with self._lock:
            faces = []
            for box, score in self._boxes(img):
                full = self._dlib.rectangle(*(round(v) for v in box))
                p = self._points(arr, full)
                inv = np.linalg.inv(np.vstack([similarity_transform(p, DLIB5_TEMPLATE), [0.0, 0.0, 1.0]]))[:2]
                faces.append(Face(box, apply(inv, ARCFACE_TEMPLATE), score))
        return sorted(faces, key=lambda f: -f.score)


class DlibHogDetector(DlibDetector):
    """HOG alone (no CNN stage): faster on photos without a frontal face, misses turned faces."""

    name = "dlib-hog1-sp5-v1"
    cnn_fallback = False
    same_faces_as = None


DlibDetector.same_faces_as = DlibHogDetector.name
BACKENDS: dict[str, Callable[[], Detector]] = {"dlib": DlibDetector, "dlib-hog": DlibHogDetector}
_built: dict[str, Detector] = {}
_build_lock = threading.Lock()


def register_backend(name: str, factory: Callable[[], Detector]) -> None:
    """Make another aligner available as `detect(..., backend=name)`."""
    BACKENDS[name] = factory


def available_backends() -> list[str]:
    """Backends whose packages are installed (without loading any model)."""
    found = []
    for name in BACKENDS:
        try:
            if name in ("dlib", "dlib-hog"):
                _package_dir("face_recognition_models")
                if importlib.util.find_spec("dlib") is None:
                    continue
            found.append(name)
        except AlignerUnavailable:
            continue
    return found


def get_detector(backend: str | None = None) -> Detector:
    """The detector `backend` (default $FACEFED_ALIGNER or dlib), built once per process."""
    name = backend or os.environ.get("FACEFED_ALIGNER") or DEFAULT_BACKEND
    if name not in BACKENDS:
        raise AlignerUnavailable(f"unknown face aligner {name!r}; choose one of {', '.join(BACKENDS)}")
    with _build_lock:
        if name not in _built:
            _built[name] = BACKENDS[name]()
        return _built[name]


def detect(image: Image.Image, *, backend: str | None = None) -> list[Face]:
    """All faces in `image` (any size), best score first."""
    return get_detector(backend)(image)


def single_face(image: Image.Image, *, what: str, backend: str | None = None) -> Face:
    """The one usable face in `image`; NoFace, SeveralFaces or FaceTooSmall (naming `what`) otherwise."""
    faces = detect(image, backend=backend)
    usable = [f for f in faces if f.size >= MIN_FACE_PX]
    if len(usable) == 1:
        return usable[0]
    w, h = image.size
    if len(usable) > 1:
        raise SeveralFaces(
            f"{what}: {len(usable)} faces found; enrol photos that show only this person (crop the others out)"
        )
    if faces:
        biggest = max(f.size for f in faces)
        raise FaceTooSmall(
            f"{what}: the face is too small ({biggest:.0f} px across, at least {MIN_FACE_PX} needed in this "
            f"{w}x{h} image); use a closer or higher-resolution photo"
        )
    raise NoFace(f"{what}: no face found in this {w}x{h} image; use a frontal, well-lit photo of one person")


def align_single(
    image: Image.Image, *, what: str, size: int = ALIGNED_SIZE, margin: int = 0, backend: str | None = None
) -> Image.Image:
    """Detect exactly one usable face and align it (see `single_face`, `align`)."""
    return align(image, single_face(image, what=what, backend=backend).landmarks, size, margin=margin)
