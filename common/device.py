"""`--device auto|cpu|cuda` for embedding, evaluation and local training: auto = cuda when available."""

from __future__ import annotations

from typing import TYPE_CHECKING

from facefed.common.errors import FacefedError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda")


class DeviceUnavailable(FacefedError, ValueError):
    """The requested device does not exist on this machine."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """ "auto" -> cuda if torch sees a GPU, else cpu; "cuda" without one is refused (one line)."""
    import torch

    if isinstance(device, torch.device):
        return device
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"device {device!r}: torch sees no CUDA GPU here; use --device cpu (or auto)")
        return torch.device(name)
    raise DeviceUnavailable(f"device must be auto, cpu or cuda, got {device!r}")
