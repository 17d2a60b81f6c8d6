"""A raw photo -> the canonical enrolment crop the vault stores.

Exactly one usable face is required (NoFace, SeveralFaces, FaceTooSmall otherwise, naming the
file); the camera's EXIF orientation is applied first. The result is the 224x224 canonical crop
(the face aligned onto the ArcFace template at scale 1 with a 56-pixel margin), JPEG quality 95:
background and other people are dropped, and a later aligner can still re-detect within the margin.
Landmarks of private photos are never cached.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from facefed.common.faces.align import canonical_crop, encode_canonical
from facefed.common.faces.detect import FaceError, single_face


class UnreadablePhoto(FaceError):
    """Bytes that are not a decodable JPEG/PNG photo."""


def open_photo(data: bytes, *, what: str) -> Image.Image:
    """Decode JPEG/PNG bytes to RGB, upright (EXIF orientation applied)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            raw = Image.open(io.BytesIO(data))
            if raw.format not in ("JPEG", "PNG"):
                raise UnreadablePhoto(f"{what}: {raw.format} image; only JPEG and PNG are accepted")
            return ImageOps.exif_transpose(raw).convert("RGB")
    except UnreadablePhoto:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as e:
        raise UnreadablePhoto(f"{what}: not a decodable JPEG/PNG image ({e})") from None


def enrolment_crop(data: bytes, *, what: str, backend: str | None = None) -> bytes:
    """JPEG bytes of the canonical crop of the one face in the photo `data` (`what` names it in errors)."""
    image = open_photo(data, what=what)
    face = single_face(image, what=what, backend=backend)
    return encode_canonical(canonical_crop(image, face.landmarks))
