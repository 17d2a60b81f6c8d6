"""Where the real data and weights are: configuration or environment, never a fixed path.

`FACEFED_LFW` names the LFW deep-funneled archive (`lfw-deepfunneled.tgz`) or its extracted tree;
`FACEFED_PRETRAINED` names the CASIA MobileFaceNet state_dict. The Makefile and `.ci/run` set both
to `../shared/...` when that folder sits beside the clone.
"""

from __future__ import annotations

import os
from pathlib import Path

from facefed.common.errors import FacefedError

LFW_ENV = "FACEFED_LFW"
PRETRAINED_ENV = "FACEFED_PRETRAINED"

LFW_HELP = (
    "LFW not found. Download the deep-funneled archive `lfw-deepfunneled.tgz` (with its pairs files) "
    "from the LFW website and either pass --lfw PATH or set FACEFED_LFW=/path/to/lfw-deepfunneled.tgz "
    "(an extracted tree works too). In a checkout with ../shared beside it, the Makefile finds "
    "../shared/datasets/lfw/lfw-deepfunneled.tgz by itself."
)
PRETRAINED_HELP = (
    "Pretrained MobileFaceNet not found. Pass the checkpoint in the config (`pretrained = PATH`) or set "
    "FACEFED_PRETRAINED=/path/to/arcface_mobilefacenet.pth (see ../shared/weights/mobilefacenet-casia/README.md)."
)


class DataNotFound(FacefedError, FileNotFoundError):
    """A dataset or weight file that configuration points at (or fails to point at) is missing."""


def _resolve(explicit: str | os.PathLike[str] | None, env: str, help_text: str) -> Path:
    value = explicit if explicit not in (None, "") else os.environ.get(env)
    if not value:
        raise DataNotFound(help_text)
    path = Path(value).expanduser()
    if not path.exists():
        raise DataNotFound(f"{path} does not exist. {help_text}")
    return path


def lfw_path(explicit: str | os.PathLike[str] | None = None, *, how: str = "pass --lfw PATH") -> Path:
    """The LFW archive or tree: an explicit value wins, else $FACEFED_LFW. `how` names the caller's
    own way to give it (an option or a config key), so the message names only what exists."""
    return _resolve(explicit, LFW_ENV, LFW_HELP.replace("pass --lfw PATH", how))


def pretrained_path(
    explicit: str | os.PathLike[str] | None = None, *, how: str = "set `pretrained = PATH` in the config"
) -> Path:
    """The pretrained checkpoint: an explicit value wins, else $FACEFED_PRETRAINED."""
    return _resolve(
        explicit,
        PRETRAINED_ENV,
        PRETRAINED_HELP.replace("Pass the checkpoint in the config (`pretrained = PATH`)", how[0].upper() + how[1:]),
    )
