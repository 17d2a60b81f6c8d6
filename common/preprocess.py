"""Image bytes -> the embedder's input: decode, fixed crop, 112x112, the checkpoint's scaling.

The LFW deep-funneled images are already aligned (every face sits at the same place in the 250x250
frame), so a fixed crop is right for them: box (65, 60, 185, 190) = left, top, right, bottom, resized
to 112x112. Raw photos are not: they need face detection and a 5-point similarity alignment (eyes,
nose tip, mouth corners mapped onto the ArcFace 112x112 template, e.g. with a RetinaFace/MTCNN
detector and a least-squares similarity transform) before this step. Feeding unaligned photos
through the fixed crop gives embeddings of the wrong region and silently poor accuracy.

Faces are kept in memory as uint8 CHW tensors (4x smaller than floats); `to_input` scales a batch
the way the CASIA checkpoint was trained: x/255, then (x - 0.5)/0.5.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from facefed.common.errors import FacefedError
from facefed.common.model.mobilefacenet import INPUT_SIZE

LFW_CROP = (65, 60, 185, 190)  # left, top, right, bottom in the 250x250 deep-funneled frame
LFW_SIZE = (250, 250)
MAX_IMAGE_BYTES = 20 << 20
MAX_PIXELS = 40_000_000


class BadImage(FacefedError, ValueError):
    """Bytes that are not a decodable JPEG/PNG face image of the expected frame."""


def decode_face(
    data: bytes, *, crop: tuple[int, int, int, int] | None | str = "auto", what: str = "image"
) -> torch.Tensor:
    """JPEG/PNG bytes -> uint8 tensor (3, 112, 112).

    `crop="auto"` accepts the two aligned layouts: a 250x250 LFW deep-funneled frame (fixed crop
    LFW_CROP) or an already aligned 112x112 face (used as is); anything else is refused. An explicit
    box crops any frame; `crop=None` resizes the whole image.
    """
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
        if img.size == (INPUT_SIZE, INPUT_SIZE):
            crop = None
        elif img.size == LFW_SIZE:
            crop = LFW_CROP
        else:
            raise BadImage(
                f"{what}: {img.size[0]}x{img.size[1]} is neither an aligned {LFW_SIZE[0]}x{LFW_SIZE[1]} "
                f"LFW frame nor an aligned {INPUT_SIZE}x{INPUT_SIZE} face; detect and align raw photos "
                "first (see common/preprocess.py)"
            )
    if crop is not None:
        if not (isinstance(crop, tuple) and len(crop) == 4):
            raise ValueError(f"crop must be 'auto', None or a (left, top, right, bottom) box, got {crop!r}")
        if crop[2] > img.size[0] or crop[3] > img.size[1]:
            raise BadImage(f"{what}: {img.size[0]}x{img.size[1]} is smaller than the crop box {crop}")
        img = img.crop(crop)
    if img.size != (INPUT_SIZE, INPUT_SIZE):
        img = img.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def decode_faces(
    datas: Iterable[bytes], *, threads: int = 2, crop: tuple[int, int, int, int] | None | str = "auto"
) -> torch.Tensor:
    """Many images -> uint8 (N, 3, 112, 112). PIL releases the GIL while decoding, so threads help."""
    datas = list(datas)
    if not datas:
        return torch.empty((0, 3, INPUT_SIZE, INPUT_SIZE), dtype=torch.uint8)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        faces = list(pool.map(lambda d: decode_face(d, crop=crop), datas))
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
