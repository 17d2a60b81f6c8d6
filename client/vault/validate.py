"""Input checks done before anything is written: image bytes, person ids, request ids."""

from __future__ import annotations

import io
import struct
import unicodedata
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
        if fmt == "JPEG":
            check_jpeg_structure(bytes(data), name)
    except InvalidImage:
        raise
    except UnidentifiedImageError:
        raise InvalidImage(f"{name}: not a JPEG or PNG image (unrecognised content)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise InvalidImage(f"{name}: not a decodable JPEG/PNG image ({e})") from None
    if aligned and layout_of((w, h)) is None:
        raise InvalidImage(refused_layout((w, h), name))
    return fmt, w, h


_RST = range(0xD0, 0xD8)
_STANDALONE = {0x01, *_RST}


def check_jpeg_structure(data: bytes, name: str = "image") -> None:
    """The decoder fills what it cannot decode with grey and says nothing: walk the JPEG's markers and
    refuse what libjpeg would only warn about: a scan cut short by an end-of-image marker with more
    scan data after it (the tail of the image would be lost), segments that overrun the file, a
    missing end-of-image marker. A second image after the end (MPF, thumbnails) is allowed."""
    n, i = len(data), 2
    if data[:2] != b"\xff\xd8":
        raise InvalidImage(f"{name}: not a JPEG (no start-of-image marker)")
    while True:
        if i + 1 >= n:
            raise InvalidImage(f"{name}: corrupt JPEG: no end-of-image marker (truncated file)")
        if data[i] != 0xFF:
            raise InvalidImage(f"{name}: corrupt JPEG: stray bytes between segments at offset {i}")
        while i + 1 < n and data[i + 1] == 0xFF:  # fill bytes
            i += 1
        if i + 1 >= n:
            raise InvalidImage(f"{name}: corrupt JPEG: no end-of-image marker (truncated file)")
        marker = data[i + 1]
        if marker == 0xD9:
            end = i + 2
            break
        if marker in _STANDALONE:
            i += 2
            continue
        if i + 4 > n:
            raise InvalidImage(f"{name}: corrupt JPEG: truncated segment at offset {i}")
        (length,) = struct.unpack_from(">H", data, i + 2)
        if length < 2 or i + 2 + length > n:
            raise InvalidImage(f"{name}: corrupt JPEG: segment at offset {i} overruns the file")
        i += 2 + length
        if marker == 0xDA:  # entropy-coded data up to the next marker that is not stuffing or a restart
            j = i
            while True:
                j = data.find(b"\xff", j)
                if j < 0 or j + 1 >= n:
                    raise InvalidImage(f"{name}: corrupt JPEG: scan data runs to the end of the file (truncated)")
                nxt = data[j + 1]
                if nxt == 0x00 or nxt in _RST:
                    j += 2
                elif nxt == 0xFF:
                    j += 1
                else:
                    break
            i = j
    tail = data[end:].rstrip(b"\x00\xff\r\n ")
    if tail and not tail.startswith(b"\xff\xd8") and b"\xff\xd9" in tail[-64:]:
        raise InvalidImage(
            f"{name}: corrupt JPEG: an end-of-image marker inside the scan ({len(data) - end} bytes of image data "
            f"after it would be lost)"
        )


def check_person_id(person_id: str) -> str:
    """Operator-chosen person ids: 1..128 printable characters, no surrounding whitespace; returned
    in Unicode NFC (composed), so two spellings of one name are one person, and one tombstone."""
    return unicodedata.normalize("NFC", _check_id(person_id, "person id", InvalidPersonId))


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
