"""Geometry of 5-point face alignment: the ArcFace template, the similarity fit and the warp.

Landmarks are (5, 2) float64 arrays in ArcFace order, image coordinates with pixel centres on
integers (the OpenCV / insightface convention): the image-left eye centre (the subject's right
eye), the image-right eye centre, the nose tip, the image-left and the image-right mouth corner.

`align` fits the least-squares similarity (rotation, uniform scale, translation; never a
reflection; Umeyama 1991) that takes the landmarks onto the ArcFace 112x112 template and warps
the image with Pillow (bilinear; no OpenCV). The *canonical enrolment crop* is the same warp into
a 224x224 frame: the template at scale 1 with a 56-pixel margin on every side, so the model's
input is exactly its centre 112x112 (no second resampling) and a later aligner can re-detect the
face within the margin. Only numpy and Pillow are needed here; detectors live in `detect.py`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from PIL import Image

Landmarks = npt.NDArray[np.float64]

ALIGNED_SIZE = 112
ARCFACE_TEMPLATE: Landmarks = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)
CANONICAL_MARGIN = 56
CANONICAL_SIZE = ALIGNED_SIZE + 2 * CANONICAL_MARGIN  # 224
CANONICAL_JPEG_QUALITY = 95
# The model's input inside a canonical crop: left, top, right, bottom.
CANONICAL_CENTRE = (
    CANONICAL_MARGIN,
    CANONICAL_MARGIN,
    CANONICAL_MARGIN + ALIGNED_SIZE,
    CANONICAL_MARGIN + ALIGNED_SIZE,
)


@dataclass(frozen=True)
class Face:
    """One detected face: box (x1, y1, x2, y2), landmarks (5, 2) in ArcFace order, detector score."""

    box: tuple[float, float, float, float]
    landmarks: Landmarks = field(repr=False, compare=False)
    score: float = 1.0

    @property
    def size(self) -> float:
        """Side, in source pixels, of the region that `align` maps onto the 112x112 face."""
        return ALIGNED_SIZE / transform_scale(similarity_transform(self.landmarks, ARCFACE_TEMPLATE))


def similarity_transform(src: npt.ArrayLike, dst: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Least-squares similarity (no reflection) mapping src -> dst; the 2x3 M with dst ~ M @ [x, y, 1]."""
    s = np.asarray(src, np.float64)
    d = np.asarray(dst, np.float64)
    if s.shape != d.shape or s.ndim != 2 or s.shape[1] != 2 or len(s) < 2:
        raise ValueError(f"landmarks must be matching (N, 2) arrays with N >= 2, got {s.shape} and {d.shape}")
    mu_s, mu_d = s.mean(0), d.mean(0)
    sc, dc = s - mu_s, d - mu_d
    var_s = float((sc**2).sum()) / len(s)
    if var_s <= 0:
        raise ValueError("landmarks are all at one point")
    cov = dc.T @ sc / len(s)
    u, sv, vt = np.linalg.svd(cov)
    sign = np.array([1.0, 1.0 if np.linalg.det(u) * np.linalg.det(vt) >= 0 else -1.0])
    r = u @ np.diag(sign) @ vt
    scale = float((sv * sign).sum()) / var_s
    t = mu_d - scale * r @ mu_s
    out: npt.NDArray[np.float64] = np.hstack([scale * r, t[:, None]])
    return out


def transform_scale(m: npt.NDArray[np.float64]) -> float:
    """The uniform scale of a 2x3 similarity."""
    return float(np.sqrt(abs(np.linalg.det(m[:, :2]))))


def apply(m: npt.NDArray[np.float64], points: npt.ArrayLike) -> Landmarks:
    """Map (N, 2) points through a 2x3 affine matrix."""
    p = np.asarray(points, np.float64)
    out: Landmarks = p @ m[:, :2].T + m[:, 2]
    return out


def template(size: int = ALIGNED_SIZE, margin: int = 0) -> Landmarks:
    """The ArcFace template for a `size` face (scaled from 112) inside a frame with `margin` on each side."""
    out: Landmarks = ARCFACE_TEMPLATE * (size / ALIGNED_SIZE) + margin
    return out


def align(image: Image.Image, landmarks: npt.ArrayLike, size: int = ALIGNED_SIZE, *, margin: int = 0) -> Image.Image:
    """Warp `image` so that `landmarks` land on the template: RGB, (size + 2*margin) square, black outside.

    A face much larger than the output is first reduced by an integer factor (box filter), so that
    large photos are not aliased by the bilinear warp; LFW-sized faces are warped directly.
    """
    lm = np.asarray(landmarks, np.float64)
    if lm.shape != (5, 2) or not np.isfinite(lm).all():
        raise ValueError(f"landmarks must be a finite (5, 2) array, got shape {lm.shape}")
    img = image.convert("RGB")
    m = similarity_transform(lm, template(size, margin))
    k = int(1.0 / transform_scale(m))
    if k >= 2:
        img = img.reduce(k)
        lm = (lm + 0.5) / k - 0.5  # pixel centres of the reduced image
        m = similarity_transform(lm, template(size, margin))
    inv = np.linalg.inv(np.vstack([m, [0.0, 0.0, 1.0]]))[:2]
    a = inv[:, :2]
    # PIL samples output pixel (x, y) at input a @ (x + .5, y + .5) + c with pixel centres at +.5;
    # landmarks put centres on integers (as cv2.warpAffine does), hence the shift.
    c = inv[:, 2] + 0.5 - a @ np.array([0.5, 0.5])
    coeffs = (float(a[0, 0]), float(a[0, 1]), float(c[0]), float(a[1, 0]), float(a[1, 1]), float(c[1]))
    out = size + 2 * margin
    return img.transform((out, out), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)


def canonical_crop(image: Image.Image, landmarks: npt.ArrayLike) -> Image.Image:
    """The 224x224 canonical enrolment crop: the 112 ArcFace face with a 56-pixel margin on every side."""
    return align(image, landmarks, ALIGNED_SIZE, margin=CANONICAL_MARGIN)


def encode_canonical(crop: Image.Image) -> bytes:
    """JPEG (quality 95, no chroma subsampling) bytes of a canonical crop, as the vault stores it."""
    if crop.size != (CANONICAL_SIZE, CANONICAL_SIZE):
        raise ValueError(f"a canonical crop is {CANONICAL_SIZE}x{CANONICAL_SIZE}, got {crop.size[0]}x{crop.size[1]}")
    buf = io.BytesIO()
    crop.convert("RGB").save(buf, format="JPEG", quality=CANONICAL_JPEG_QUALITY, subsampling=0)
    return buf.getvalue()


def pick_central(faces: list[Face], image_size: tuple[int, int]) -> Face | None:
    """The face whose box centre is nearest the image centre (the LFW convention); None if none."""
    if not faces:
        return None
    cx, cy = image_size[0] / 2, image_size[1] / 2
    return min(faces, key=lambda f: ((f.box[0] + f.box[2]) / 2 - cx) ** 2 + ((f.box[1] + f.box[3]) / 2 - cy) ** 2)
