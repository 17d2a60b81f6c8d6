"""Ordinary photos made from real LFW faces: larger than any aligned layout, the face turned and off-centre."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def raw_photo(face: Image.Image, *, angle: float, scale: float, at: tuple[int, int]) -> Image.Image:
    """A 640x480 'photo': the LFW image rotated and scaled, pasted off-centre on a textured canvas."""
    rng = np.random.default_rng(0)
    canvas = Image.fromarray(rng.integers(90, 160, (480, 640, 3), dtype=np.uint8)).resize((640, 480))
    img = face.resize((round(250 * scale), round(250 * scale)), Image.Resampling.BICUBIC)
    img = img.rotate(angle, resample=Image.Resampling.BICUBIC, expand=False, fillcolor=(120, 120, 120))
    canvas.paste(img, at)
    return canvas


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92)
    return buf.getvalue()
