"""Helpers shared by the vault tests: real LFW faces, store directories, read-only directories."""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest

from facefed.common.lfw import LFW, partition_people

Faces = dict[str, list[tuple[str, bytes]]]  # person -> [(file name, JPEG bytes)]


@lru_cache(maxsize=4)
def _faces(path: str, n_people: int, min_images: int) -> tuple[tuple[str, tuple[tuple[str, bytes], ...]], ...]:
    lfw = LFW(path)
    counts = lfw.counts()
    # A deterministic slice of site 0's training people, early in the archive so the scan stops early.
    names = [n for n in partition_people(lfw.people("peopleDevTrain.txt"), 3)[0] if counts[n] >= min_images]
    names = sorted(names)[:n_people]
    keys = [k for n in names for k in lfw.keys(n)]
    images = lfw.load_images(keys)
    return tuple((n, tuple((Path(k.relpath).name, images[k]) for k in keys if k.name == n)) for n in names)


def load_faces(lfw: LFW, n_people: int = 12, min_images: int = 1) -> Faces:
    """Real faces of `n_people` people (cached: all test modules use the same 12 to read LFW once)."""
    return {name: list(imgs) for name, imgs in _faces(str(lfw.path), n_people, min_images)}


def fresh_jpeg(data: bytes, salt: int = 0) -> bytes:
    """The same face as new, different bytes (re-encoded, with `salt` in a comment): an image the
    vault has not seen, for tests that need one after the fixture stored every face once."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        out = io.BytesIO()
        img.save(out, "JPEG", quality=90, comment=f"facefed test {salt}".encode())
    return out.getvalue()


def make_stores(root: Path, n: int) -> list[str]:
    stores = []
    for i in range(1, n + 1):
        d = root / f"store{i}"
        d.mkdir(parents=True)
        stores.append(str(d))
    return stores


def share_files(store: str | Path) -> list[Path]:
    return sorted(p for p in Path(store).iterdir() if not p.name.startswith("."))


def header_fields(blob: bytes) -> dict:
    """Parse a share header without the key (what a store holder could see)."""
    magic, version, x, k, n, sid, iid, owner, padded = struct.unpack_from(">4sBBBB16s16s16sI", blob)
    return {
        "magic": magic,
        "x": x,
        "k": k,
        "n": n,
        "share_id": sid.hex(),
        "image_id": iid.hex(),
        "owner": owner,
        "padded": padded,
    }


@contextlib.contextmanager
def read_only(path: Path):
    """Make a directory read-only for this process, root included (chattr +i), then restore it."""
    root = os.geteuid() == 0
    mode = path.stat().st_mode
    os.chmod(path, 0o555)
    if root and subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        os.chmod(path, mode)
        pytest.skip("running as root and chattr +i is not available: cannot make a read-only directory")
    try:
        yield
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        os.chmod(path, mode)


@contextlib.contextmanager
def offline(store: str | Path):
    """Take a store directory away (an unmounted disk looks like this) and bring it back."""
    store = Path(store)
    hidden = store.with_name(store.name + ".away")
    shutil.move(store, hidden)
    try:
        yield
    finally:
        shutil.move(hidden, store)
