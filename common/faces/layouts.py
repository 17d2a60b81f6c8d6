"""The image layouts facefed trains and evaluates on, decided by size alone (no torch needed).

- CANONICAL: the 224x224 canonical enrolment crop (the aligned face at scale 1, 56-pixel margin);
  the model's input is its centre 112x112.
- ALIGNED: an aligned 112x112 face, the model's input as is.
- FIXED_CROP: a 250x250 LFW deep-funneled frame; only through FIXED_CROP_FALLBACK (the
  pre-alignment preprocessing, box 65, 60, 185, 190 resized to 112), so old vaults keep working.
"""

from __future__ import annotations

from facefed.common.faces.align import ALIGNED_SIZE, CANONICAL_SIZE

CANONICAL = "canonical"
ALIGNED = "aligned"
FIXED_CROP = "fixed-crop"
LFW_SIZE = (250, 250)
FIXED_CROP_FALLBACK = (65, 60, 185, 190)  # left, top, right, bottom in the 250x250 frame


def layout_of(size: tuple[int, int]) -> str | None:
    """CANONICAL, ALIGNED or FIXED_CROP for an image of this size; None for anything else."""
    if size == (CANONICAL_SIZE, CANONICAL_SIZE):
        return CANONICAL
    if size == (ALIGNED_SIZE, ALIGNED_SIZE):
        return ALIGNED
    if size == LFW_SIZE:
        return FIXED_CROP
    return None


def refused_layout(size: tuple[int, int], what: str) -> str:
    """The one-line reason an image of this size is not an accepted layout."""
    return (
        f"{what}: {size[0]}x{size[1]} is not an aligned face (a {CANONICAL_SIZE}x{CANONICAL_SIZE} canonical "
        f"crop, an aligned {ALIGNED_SIZE}x{ALIGNED_SIZE} face, or a {LFW_SIZE[0]}x{LFW_SIZE[1]} LFW frame); "
        "enrol raw photos with `facefed-client vault add`, which detects and aligns them"
    )
