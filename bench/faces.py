"""Face detection + alignment: speed per backend, and LFW accuracy of the pretrained model, fixed crop vs aligned.

    python bench/faces.py [--no-view2] [--speed-images 300]

Speed: detect + pick the central face + align to 112x112, per image, JPEG decoding excluded, one
process, 2 threads; on 250x250 LFW images (pairsDevTest) and on 640x480 frames (an LFW face
enlarged 1.6x on a grey canvas). The fixed crop (crop + resize) is the baseline. The landmarks
cache is not used for speed.
Accuracy: the CASIA MobileFaceNet as pretrained, flip averaging, LFW pairsDevTest (10 stratified
folds) with the fixed crop and aligned, and View 2 pairs.txt (10 official folds) aligned: the one
number to quote. Aligned rows per backend: `dlib-hog` (HOG alone) and `dlib` (HOG, then dlib's CNN
where HOG finds no face), side by side. Output also goes to bench-out/faces.txt.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from facefed.common.evaluate import EvalCache, EvalResult  # noqa: E402
from facefed.common.faces import FIXED_CROP_FALLBACK, align, available_backends, get_detector, pick_central  # noqa: E402
from facefed.common.lfw import LFW  # noqa: E402
from facefed.common.model.mobilefacenet import build_embedder  # noqa: E402
from facefed.common.paths import pretrained_path  # noqa: E402

OUT = ROOT / "bench-out"


def speed(images: list[Image.Image], backend: str | None) -> float:
    """Images per second: detect + central face + align (backend None: the fixed crop)."""
    if backend is not None:
        detector = get_detector(backend)
        detector(images[0])  # load the model outside the clock
    t = time.perf_counter()
    for img in images:
        if backend is None:
            img.crop(FIXED_CROP_FALLBACK).resize((112, 112), Image.Resampling.BILINEAR)
            continue
        face = pick_central(detector(img), img.size)
        if face is not None:
            align(img, face.landmarks)
    return len(images) / (time.perf_counter() - t)


def vga(img: Image.Image) -> Image.Image:
    canvas = Image.new("RGB", (640, 480), (128, 128, 128))
    big = img.resize((400, 400), Image.Resampling.BICUBIC)
    canvas.paste(big, (120, 40))
    return canvas


def row(name: str, r: EvalResult) -> str:
    t = r.tar_at_far[1e-3]
    fell = f"{len(r.fallbacks)} fixed-crop fallback(s)" if r.fallbacks else ""
    return (
        f"| {name} | {r.n_pairs} | {100 * r.accuracy_mean:.2f} ± {100 * r.accuracy_std:.2f} % | {r.auc:.4f} | "
        f"{100 * t.tar:.1f} % ({t.n_impostor} impostors, {t.impostors_accepted} accepted) | {fell} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-view2", action="store_true", help="skip View 2 pairs.txt (about 7,700 images)")
    ap.add_argument("--speed-images", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(2)
    OUT.mkdir(exist_ok=True)
    lines: list[str] = []

    def say(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    lfw = LFW()
    model = build_embedder(pretrained_path()).eval()
    say(f"facefed bench/faces.py: {os.cpu_count()} CPUs visible, torch threads {torch.get_num_threads()}")
    keys = sorted({k for fold in lfw.pairs("pairsDevTest.txt") for p in fold for k in (p.a, p.b)})
    keys = keys[:: max(1, len(keys) // args.speed_images)][: args.speed_images]
    data = lfw.load_images(keys)
    imgs = [Image.open(io.BytesIO(data[k])).convert("RGB") for k in keys]
    frames = [vga(im) for im in imgs[:50]]
    say("")
    say("| aligner | images/s, 250x250 LFW | images/s, 640x480 |")
    say("| --- | --- | --- |")
    say(f"| fixed crop (baseline) | {speed(imgs, None):.0f} | n/a |")
    for backend in available_backends():
        name = get_detector(backend).name
        say(f"| {backend} ({name}) | {speed(imgs, backend):.1f} | {speed(frames, backend):.1f} |")
    say("")
    say("| LFW protocol, pretrained CASIA MobileFaceNet | pairs | accuracy (10-fold) | AUC | TAR @ FAR 1e-3 | note |")
    say("| --- | --- | --- | --- | --- | --- |")
    # every backend on the same pairs; HOG alone first, so that `dlib` (HOG, then the CNN on HOG's
    # misses) takes HOG's landmarks from the cache and detects only the misses
    backends = sorted(available_backends(), key=lambda b: b != "dlib-hog")
    runs: list[tuple[str, str, str, str | None]] = [
        ("pairsDevTest, fixed crop", "pairsDevTest.txt", "fixed-crop", None)
    ]
    for b in backends:
        runs.append((f"pairsDevTest, aligned ({b})", "pairsDevTest.txt", "aligned", b))
        if not args.no_view2:
            runs.append((f"View 2 pairs.txt, aligned ({b})", "pairs.txt", "aligned", b))
    for name, pairs, pre, backend in runs:
        t = time.perf_counter()
        cache = EvalCache(lfw, pairs, flip=True, preprocess=pre, backend=backend)
        r = cache.evaluate(model)
        say(row(name, r) + f"  <!-- {time.perf_counter() - t:.0f} s -->")
        if r.fallbacks:
            say(f"    no face detected (fixed-crop fallback): {', '.join(r.fallbacks)}")
    (OUT / "faces.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
