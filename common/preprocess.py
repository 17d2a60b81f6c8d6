"""Image bytes -> the embedder's input: decode, take the aligned 112x112 face, the checkpoint's scaling.

Faces reach this step already aligned by `facefed.common.faces` (detection + 5-point similarity
onto the ArcFace template). `decode_face` accepts exactly these layouts:
- the 224x224 canonical enrolment crop the vault stores (the face at scale 1 with a 56-pixel
  margin): its centre 112x112 is the input, no resampling;
- an aligned 112x112 face, used as is;
- a 250x250 LFW deep-funneled frame, only through FIXED_CROP_FALLBACK (box 65, 60, 185, 190
  resized to 112): the pre-alignment preprocessing, kept so that old vaults keep working; every
  use is reported (a `FixedCropFallback` warning, and `decode_faces(layouts=...)` counts it).
Anything else (a raw photo) is refused: detect and align it first (`facefed.common.faces`).

Faces are kept in memory as uint8 CHW tensors (4x smaller than floats); `to_input` scales a batch
the way the CASIA checkpoint was trained: x/255, then (x - 0.5)/0.5.
"""

from __future__ import annotations

import io
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from facefed.common.errors import FacefedError
from facefed.common.faces.align import CANONICAL_CENTRE
from facefed.common.faces.layouts import (
    ALIGNED,
    CANONICAL,
    FIXED_CROP,
    FIXED_CROP_FALLBACK,
    LFW_SIZE,  # noqa: F401  (re-exported)
    layout_of,
    refused_layout,
)
from facefed.common.model.mobilefacenet import INPUT_SIZE

LFW_CROP = FIXED_CROP_FALLBACK  # old name


class FixedCropFallback(UserWarning):
    """A 250x250 LFW frame went through the fixed crop instead of detection + alignment."""


MAX_IMAGE_BYTES = 20 << 20
MAX_PIXELS = 40_000_000


class BadImage(FacefedError, ValueError):
    """Bytes that are not a decodable JPEG/PNG face image of the expected frame."""


def decode_face(
    data: bytes,
    *,
    crop: tuple[int, int, int, int] | None | str = "auto",
    what: str = "image",
    layouts: Counter[str] | None = None,
) -> torch.Tensor:
    """JPEG/PNG bytes -> uint8 tensor (3, 112, 112).

    `crop="auto"` accepts the layouts in the module docstring (the 250x250 frame through
    FIXED_CROP_FALLBACK, with a FixedCropFallback warning) and refuses anything else; `layouts`,
    if given, counts the layout of each decoded image. An explicit box crops any frame;
    `crop=None` resizes the whole image.
    """
    face, layout = _decode(data, crop, what)
    if layout == FIXED_CROP:
        warnings.warn(
            f"{what}: 250x250 LFW frame preprocessed with the fixed-crop fallback, not detection + alignment",
            FixedCropFallback,
            stacklevel=2,
        )
    if layouts is not None and layout is not None:
        layouts[layout] += 1
    return face


def _decode(data: bytes, crop: tuple[int, int, int, int] | None | str, what: str) -> tuple[torch.Tensor, str | None]:
    layout = None
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise BadImage(f"{what}: empty or not bytes")
    if len(data) > MAX_IMAGE_BYTES:
        raise BadImage(f"{what}: {len(data)} bytes is larger than the {MAX_IMAGE_BYTES}-byte limit")
    try:
        img: Image.Image = Image.open(io.BytesIO(data))
        if img.format not in ("JPEG", "PNG"):
            raise BadImage(f"{what}: format {img.format} is not JPEG or PNG")
        if img.width * img.height > MAX_PIXELS:
            raise BadImage(f"{what}: {img.width}x{img.height} pixels is too large")
        img = img.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise BadImage(f"{what}: cannot decode ({e})") from e
    if crop == "auto":
        layout = layout_of(img.size)
        if layout is None:
            raise BadImage(refused_layout(img.size, what))
        crop = {CANONICAL: CANONICAL_CENTRE, ALIGNED: None, FIXED_CROP: FIXED_CROP_FALLBACK}[layout]
    if crop is not None:
        if not (isinstance(crop, tuple) and len(crop) == 4):
            raise ValueError(f"crop must be 'auto', None or a (left, top, right, bottom) box, got {crop!r}")
        if crop[2] > img.size[0] or crop[3] > img.size[1]:
            raise BadImage(f"{what}: {img.size[0]}x{img.size[1]} is smaller than the crop box {crop}")
        img = img.crop(crop)
    if img.size != (INPUT_SIZE, INPUT_SIZE):
        img = img.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous(), layout


def decode_faces(
    datas: Iterable[bytes],
    *,
    threads: int = 2,
    crop: tuple[int, int, int, int] | None | str = "auto",
    layouts: Counter[str] | None = None,
) -> torch.Tensor:
    """Many images -> uint8 (N, 3, 112, 112). PIL releases the GIL while decoding, so threads help.

    With `crop="auto"`, `layouts` (if given) counts the images per layout; fixed-crop fallbacks
    are also reported once per call as a FixedCropFallback warning.
    """
    datas = list(datas)
    if not datas:
        return torch.empty((0, 3, INPUT_SIZE, INPUT_SIZE), dtype=torch.uint8)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        decoded = list(pool.map(lambda d: _decode(d, crop, "image"), datas))
    seen: Counter[str] = Counter(layout for _, layout in decoded if layout is not None)
    faces = [face for face, _ in decoded]
    if seen[FIXED_CROP]:
        warnings.warn(
            f"{seen[FIXED_CROP]} of {len(datas)} images are 250x250 LFW frames preprocessed with the "
            "fixed-crop fallback, not detection + alignment",
            FixedCropFallback,
            stacklevel=2,
        )
    if layouts is not None:
        layouts.update(seen)
    return torch.stack(faces)


def to_input(faces: torch.Tensor, flip: bool | Sequence[bool] | torch.Tensor = False) -> torch.Tensor:
    """uint8 (N, 3, 112, 112) -> float input in [-1, 1]; `flip` mirrors all, or those marked True."""
    x = faces.float().div_(127.5).sub_(1.0)  # == (x/255 - 0.5) / 0.5
    if isinstance(flip, bool):
        return x.flip(3) if flip else x
    mask = torch.as_tensor(flip, dtype=torch.bool)
    if mask.any():
        x[mask] = x[mask].flip(3)
    return x
