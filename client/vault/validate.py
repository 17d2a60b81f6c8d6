"""Input checks done before anything is written: image bytes, person ids, request ids."""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from facefed.client.vault.errors import InvalidImage, InvalidPersonId
from facefed.client.vault.sharefile import MAX_IMAGE_BYTES
from facefed.common.faces.layouts import layout_of, refused_layout

IMAGE_FORMATS = ("JPEG", "PNG")
MIN_SIDE = 16  # smaller than this is no face crop
MAX_SIDE = 8192
MAX_PIXELS = 40_000_000  # decompression-bomb guard, checked before decoding
MAX_ID_LEN = 128


def check_image(data: bytes, name: str = "image", *, aligned: bool = True) -> tuple[str, int, int]:
    """Raise InvalidImage unless `data` is a fully decodable JPEG/PNG of sane size; (format, w, h).

    With `aligned` (what the vault stores) the image must also be a layout training accepts (a
    canonical 224 crop, an aligned 112 face, or a 250x250 LFW frame): nothing enters the vault that
    training would refuse. `aligned=False` checks a raw photo before detection and alignment.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidImage(f"{name}: expected image bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise InvalidImage(f"{name}: empty file")
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidImage(f"{name}: {len(data)} bytes is larger than the {MAX_IMAGE_BYTES} byte limit")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt, (w, h) = img.format, img.size
                if fmt not in IMAGE_FORMATS:
                    raise InvalidImage(f"{name}: {fmt} image; only JPEG and PNG are accepted")
                if not (MIN_SIDE <= w <= MAX_SIDE and MIN_SIDE <= h <= MAX_SIDE) or w * h > MAX_PIXELS:
                    raise InvalidImage(
                        f"{name}: {w}x{h} pixels is not a sane face image size (each side {MIN_SIDE}..{MAX_SIDE})"
                    )
                img.load()  # decode everything: truncated or corrupt data fails here, not at training
    except InvalidImage:
        raise
    except UnidentifiedImageError:
        raise InvalidImage(f"{name}: not a JPEG or PNG image (unrecognised content)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise InvalidImage(f"{name}: not a decodable JPEG/PNG image ({e})") from None
    if aligned and layout_of((w, h)) is None:
        raise InvalidImage(refused_layout((w, h), name))
    return fmt, w, h


def check_person_id(person_id: str) -> str:
    """Operator-chosen person ids: 1..128 printable characters, no surrounding whitespace."""
    return _check_id(person_id, "person id", InvalidPersonId)


def check_request_id(request_id: str) -> str:
    return _check_id(request_id, "request id", ValueError)


def _check_id(value: str, what: str, exc: type[Exception]) -> str:
    if not isinstance(value, str):
        raise exc(f"{what} must be a string, got {type(value).__name__}")
    if not value or len(value) > MAX_ID_LEN:
        raise exc(f"{what} {value[:40]!r} must be 1..{MAX_ID_LEN} characters")
    if not value.isprintable():
        raise exc(f"{what} {value!r} contains control or non-printable characters")
    if value != value.strip():
        raise exc(f"{what} {value!r} has leading or trailing whitespace")
    return value
