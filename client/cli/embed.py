"""`facefed-client embed` and `facefed-client compare`: use a trained model on photos.

Photos are detected and aligned (exactly one face each); canonical 224 crops and aligned 112 faces
are used as they are (common/embedder.py). `--model` is a facefed checkpoint, which carries its
decision threshold, or the pretrained CASIA weights with `--threshold`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from facefed.common.cli import clean_errors

MODEL_HELP = "facefed checkpoint (e.g. from `facefed-server export`), or the pretrained .pth with --threshold"
DEVICE_HELP = "auto (cuda when available), cpu or cuda"


def _load(model: Path, device: str, threshold: float | None) -> Any:
    from facefed.common.embedder import load  # torch loads here, not at CLI start-up

    return load(model, device=device, threshold=threshold)


@clean_errors()
def embed(
    images: list[Path] = typer.Argument(..., help="photos (one face each), canonical 224 crops or aligned 112 faces"),
    model: Path = typer.Option(..., "--model", help=MODEL_HELP),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object with the full embeddings"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """Print the unit embedding of each image (flip-averaged, as evaluation computes it)."""
    m = _load(model, device, None)
    vectors = m.embed(images)
    if as_json:
        doc = {
            "model": str(model),
            "device": str(m.device),
            "dim": m.dim,
            "embeddings": [
                {"image": str(p), "embedding": [round(float(x), 7) for x in v]} for p, v in zip(images, vectors)
            ],
        }
        print(json.dumps(doc))
        return
    for p, v in zip(images, vectors):
        head = " ".join(f"{x:+.4f}" for x in v[:6])
        print(f"{p}: {m.dim}-d unit embedding [{head} ...]")


@clean_errors()
def compare(
    image_a: Path = typer.Argument(..., help="first photo (one face) or aligned face"),
    image_b: Path = typer.Argument(..., help="second photo (one face) or aligned face"),
    model: Path = typer.Option(..., "--model", help=MODEL_HELP),
    threshold: float = typer.Option(
        None, "--threshold", help="decision threshold (cosine); default: the one stored in the checkpoint"
    ),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """Cosine similarity of two faces and the decision (same / different person) at the threshold."""
    m = _load(model, device, threshold)
    c = m.compare(image_a, image_b)
    if as_json:
        doc = {"a": str(image_a), "b": str(image_b), "model": str(model), **c.to_dict()}
        doc["threshold_source"] = m.threshold.validation if m.threshold else None
        print(json.dumps(doc))
        return
    verdict = "same person" if c.same else "different people"
    print(f"cosine {c.cosine:.4f}, threshold {m.threshold.describe()}: {verdict}")


def register(app: typer.Typer) -> None:
    """Add the `embed` and `compare` commands to the main CLI."""
    app.command("embed")(embed)
    app.command("compare")(compare)
