"""Faces as the field aligns them: detection, 5-point landmarks, similarity alignment (docs/faces.md).

    from facefed.common.faces import detect, pick_central, align, align_single
    faces = detect(image)                        # list[Face], best first (PIL image of any size)
    crop = align(image, faces[0].landmarks)      # 112x112 RGB, the model's input
    crop = align_single(image, what=str(path))   # exactly one usable face, else NoFace/SeveralFaces/FaceTooSmall

`canonical_crop`/`encode_canonical` make what the vault stores (224x224, margin 56, JPEG q95);
`lfw.py` aligns LFW images with a landmarks cache.
"""

from __future__ import annotations

from facefed.common.faces.align import (
    ALIGNED_SIZE,
    ARCFACE_TEMPLATE,
    CANONICAL_CENTRE,
    CANONICAL_MARGIN,
    CANONICAL_SIZE,
    Face,
    align,
    canonical_crop,
    encode_canonical,
    pick_central,
    similarity_transform,
    template,
)
from facefed.common.faces.detect import (
    DEFAULT_BACKEND,
    DLIB5_TEMPLATE,
    MIN_FACE_PX,
    AlignerUnavailable,
    Detector,
    FaceError,
    FaceTooSmall,
    NoFace,
    SeveralFaces,
    align_single,
    available_backends,
    detect,
    get_detector,
    register_backend,
    single_face,
)
from facefed.common.faces.enrol import UnreadablePhoto, enrolment_crop, open_photo
from facefed.common.faces.layouts import FIXED_CROP_FALLBACK, layout_of

__all__ = [
    "ALIGNED_SIZE",
    "ARCFACE_TEMPLATE",
    "CANONICAL_CENTRE",
    "CANONICAL_MARGIN",
    "CANONICAL_SIZE",
    "DEFAULT_BACKEND",
    "DLIB5_TEMPLATE",
    "FIXED_CROP_FALLBACK",
    "MIN_FACE_PX",
    "AlignerUnavailable",
    "Detector",
    "Face",
    "FaceError",
    "FaceTooSmall",
    "NoFace",
    "SeveralFaces",
    "UnreadablePhoto",
    "align",
    "align_single",
    "available_backends",
    "canonical_crop",
    "detect",
    "encode_canonical",
    "enrolment_crop",
    "get_detector",
    "layout_of",
    "open_photo",
    "pick_central",
    "register_backend",
    "similarity_transform",
    "single_face",
    "template",
]
