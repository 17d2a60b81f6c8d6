"""The on-store format of one share: header, padded payload, HMAC-SHA256 tag.

    header   magic "FFVS", format version, x, k, n, share id, image id, owner, padded length
    payload  the share of (u32 true length || image bytes), then random bytes up to `padded length`
    tag      HMAC-SHA256(tag key, header || payload)

Why this shape:
- The true length is *inside* the shared secret, so a store holder sees only the bucket size.
- Buckets are powers of two from 4 KiB. The 250x250 LFW JPEGs (6-14 KB) all land in 8 or 16 KiB, so
  a store cannot match a share to a known photo by its exact size; 4 KiB steps would give three
  classes on LFW and grow with the spread of real photos, fingerprinting outliers. The price is disk
  (about 1.6x the JPEG bytes on LFW), hardly speed: split/combine work on the true bytes only, the
  padding is a CSPRNG fill, indistinguishable from share bytes (each share byte of a k >= 2 sharing
  is uniform), and only the HMAC reads it.
- The tag covers the header, so a share copied to another image id, x-coordinate or share id fails
  verification, as does any flipped bit.
- `owner` is a keyed hash of the person's pseudonym: the vault can attribute a stray share to a
  person (erase scans use it), a store holder without the vault key cannot. It does let one store
  group its own shares by person, which the write order of an import reveals anyway.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

MAGIC = b"FFVS"
FORMAT_VERSION = 1
HEADER = struct.Struct(">4sBBBB16s16s16sI")
TAG_LEN = 32
LEN_PREFIX = struct.Struct(">I")
MIN_BUCKET = 4096
MAX_IMAGE_BYTES = 32 * 1024 * 1024  # far above any face photo; keeps a share within a holder's limit
OVERHEAD = HEADER.size + TAG_LEN


class ShareFormatError(ValueError):
    """The bytes are not a valid share for what the vault expects; the message says why."""


@dataclass(frozen=True)
class ShareHeader:
    x: int
    k: int
    n: int
    share_id: str  # 32 hex digits
    image_id: str  # 32 hex digits
    owner: bytes  # 16 bytes, keyed hash of the pseudonym
    padded_len: int
    version: int = FORMAT_VERSION

    def pack(self) -> bytes:
        return HEADER.pack(
            MAGIC,
            self.version,
            self.x,
            self.k,
            self.n,
            bytes.fromhex(self.share_id),
            bytes.fromhex(self.image_id),
            self.owner,
            self.padded_len,
        )


def bucket(secret_len: int) -> int:
    """Padded payload size for a secret (length prefix included): next power of two, at least 4 KiB."""
    return max(MIN_BUCKET, 1 << max(0, secret_len - 1).bit_length())


class ShareKeys:
    """Sub-keys derived from the vault's master key, one per purpose."""

    def __init__(self, master: bytes):
        if len(master) < 32:
            raise ValueError("vault key must be at least 32 bytes")
        self.tag_key = hmac.new(master, b"facefed share tag v1", hashlib.sha256).digest()
        self._owner_key = hmac.new(master, b"facefed share owner v1", hashlib.sha256).digest()
        self._content_key = hmac.new(master, b"facefed image content v1", hashlib.sha256).digest()

    def owner(self, pseudonym: str) -> bytes:
        return hmac.new(self._owner_key, pseudonym.encode(), hashlib.sha256).digest()[:16]

    def content_hash(self, data: bytes) -> str:
        """Keyed hash of image bytes (finds duplicates; a plain hash of a face image would be linkable)."""
        return hmac.new(self._content_key, data, hashlib.sha256).hexdigest()


def seal(keys: ShareKeys, header: ShareHeader, share: bytes, padding: bytes) -> bytes:
    """The complete share file: header, share bytes, padding, tag."""
    if len(share) + len(padding) != header.padded_len:
        raise ValueError(f"payload {len(share)}+{len(padding)} bytes does not fill bucket {header.padded_len}")
    head = header.pack()
    mac = hmac.new(keys.tag_key, head, hashlib.sha256)
    mac.update(share)
    mac.update(padding)
    return b"".join((head, share, padding, mac.digest()))


def unseal(keys: ShareKeys, blob: bytes) -> tuple[ShareHeader, memoryview]:
    """Check magic, version, length and tag; return the header and the payload (padding included)."""
    if len(blob) < OVERHEAD:
        raise ShareFormatError(f"truncated: {len(blob)} bytes")
    magic, version, x, k, n, sid, iid, owner, padded = HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise ShareFormatError("not a facefed share (bad magic)")
    if version != FORMAT_VERSION:
        raise ShareFormatError(f"share format version {version}, this vault reads {FORMAT_VERSION}")
    if len(blob) != OVERHEAD + padded:
        raise ShareFormatError(f"length {len(blob)} does not match its header ({OVERHEAD + padded})")
    view = memoryview(blob)
    expected = hmac.digest(keys.tag_key, view[:-TAG_LEN], "sha256")  # one-shot: no HMAC object
    if not hmac.compare_digest(expected, view[-TAG_LEN:]):
        raise ShareFormatError("integrity tag does not verify (modified, or written by another vault)")
    header = ShareHeader(x, k, n, sid.hex(), iid.hex(), owner, padded, version)
    return header, view[HEADER.size : -TAG_LEN]


_EXPECT = struct.Struct(">4sBBBB16s16s")  # the header up to the image id; then owner, then padded length
_OWNER_END = _EXPECT.size + 16


def unseal_expected(
    keys: ShareKeys, blob: bytes, *, share_id: str, image_id: str, x: int, k: int, n: int, padded: int
) -> memoryview:
    """The read hot path: verify the tag and that the header is exactly the expected one with two
    byte comparisons, no header object. Any mismatch is re-checked slowly for a precise reason."""
    view = memoryview(blob)
    if (
        len(blob) == OVERHEAD + padded
        and view[: _EXPECT.size]
        == _EXPECT.pack(MAGIC, FORMAT_VERSION, x, k, n, bytes.fromhex(share_id), bytes.fromhex(image_id))
        and LEN_PREFIX.unpack_from(blob, _OWNER_END)[0] == padded
        and hmac.compare_digest(hmac.digest(keys.tag_key, view[:-TAG_LEN], "sha256"), view[-TAG_LEN:])
    ):
        return view[HEADER.size : -TAG_LEN]
    header, payload = unseal(keys, blob)
    check_header(header, share_id=share_id, image_id=image_id, x=x, k=k, n=n)
    if header.padded_len != padded:
        raise ShareFormatError(f"padded length {header.padded_len}, manifest says {padded}")
    return payload


def check_header(header: ShareHeader, *, share_id: str, image_id: str, x: int, k: int, n: int) -> None:
    """A share with a valid tag can still sit in the wrong place (copied or renamed): refuse that."""
    for what, got, want in (
        ("share id", header.share_id, share_id),
        ("image id", header.image_id, image_id),
        ("x-coordinate", header.x, x),
        ("threshold k", header.k, k),
        ("n", header.n, n),
    ):
        if got != want:
            raise ShareFormatError(f"header {what} is {got}, expected {want} (share moved or renamed)")
