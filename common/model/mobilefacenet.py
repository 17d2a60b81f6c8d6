"""The face embedder: MobileFaceNet (112x112 RGB in, 128-d unit embedding out), Opacus-valid.

DP-SGD needs per-sample gradients, which BatchNorm breaks (it mixes samples). So the network comes
in three normalisation flavours with the same parameter names otherwise:
- `folded` (default): each pretrained BatchNorm is folded into the convolution before it (eval-mode
  statistics become a per-channel scale on the weight and a bias), which keeps the pretrained
  function exactly. No normalisation layer is left.
- `group`: GroupNorm after each convolution; for training from scratch, where there is nothing to fold.
- `batch`: the original BatchNorm layout, only to read the CASIA checkpoint and to test folding.

Forward runs a fixed list of named stages. `model.train_from` names the first trainable stage:
everything before it is frozen (never updated, never shared); training runs the frozen prefix once
per image (`forward_prefix`, cacheable) and the trainable tail (`forward_tail`) per step. The
federation aggregates exactly the tail (`shared_state`).

Layout and key names follow the published CASIA checkpoint (see the weights README), minus its
`arcface.` prefix.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from facefed.common.durable import atomic_write_bytes
from facefed.common.errors import FacefedError
from facefed.common.model.stages import EMBEDDING_DIM, STAGES

Norm = Literal["folded", "group", "batch"]
INPUT_SIZE = 112
# /2: meta also carries `preprocessing`, `provenance` and (once evaluated) `threshold`
# (common/calibration.py); /1 files (no such keys) still load.
CHECKPOINT_FORMAT = "facefed-embedder/2"
READABLE_FORMATS = ("facefed-embedder/1", CHECKPOINT_FORMAT)
PRETRAINED_PREFIX = "arcface."
BN_EPS = 1e-5  # torch's BatchNorm default, which the CASIA checkpoint was trained with


class CheckpointMismatch(FacefedError, ValueError):
    """A state dict whose keys or shapes do not fit the model; the message names the first mismatch."""


def _norm(kind: Norm, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels, eps=BN_EPS)
    if kind == "group":
        # Groups of 8 channels (or fewer for small layers): per-sample statistics, Opacus-valid.
        return nn.GroupNorm(max(1, channels // 8), channels)
    return nn.Identity()


class ConvUnit(nn.Module):
    """conv (+ norm) (+ PReLU). With `folded` normalisation the conv carries the bias."""

    def __init__(
        self, cin: int, cout: int, k: int = 1, s: int = 1, p: int = 0, groups: int = 1, *, norm: Norm, act: bool = True
    ):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, p, groups=groups, bias=norm == "folded")
        if norm != "folded":
            self.bn = _norm(norm, cout)
        if act:
            self.prelu = nn.PReLU(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if hasattr(self, "bn"):
            x = self.bn(x)
        if hasattr(self, "prelu"):
            x = self.prelu(x)
        return x


class DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 expand, 3x3 depthwise, 1x1 project (linear), optional residual."""

    def __init__(self, cin: int, cout: int, stride: int, hidden: int, *, norm: Norm, residual: bool):
        super().__init__()
        self.conv = ConvUnit(cin, hidden, norm=norm)
        self.conv_dw = ConvUnit(hidden, hidden, 3, stride, 1, groups=hidden, norm=norm)
        self.project = ConvUnit(hidden, cout, norm=norm, act=False)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.project(self.conv_dw(self.conv(x)))
        return x + y if self.residual else y


class Residual(nn.Module):
    def __init__(self, channels: int, blocks: int, hidden: int, *, norm: Norm):
        super().__init__()
        self.model = nn.Sequential(
            *[DepthWise(channels, channels, 1, hidden, norm=norm, residual=True) for _ in range(blocks)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.model(x)
        return y


class MobileFaceNet(nn.Module):
    def __init__(self, norm: Norm = "folded", train_from: str = "conv1"):
        super().__init__()
        if norm not in ("folded", "group", "batch"):
            raise ValueError(f"norm must be folded, group or batch, got {norm!r}")
        self.norm: Norm = norm
        bias = norm == "folded"
        self.conv1 = ConvUnit(3, 64, 3, 2, 1, norm=norm)
        self.conv2_dw = ConvUnit(64, 64, 3, 1, 1, groups=64, norm=norm)
        self.conv_23 = DepthWise(64, 64, 2, 128, norm=norm, residual=False)
        self.conv_3 = Residual(64, 4, 128, norm=norm)
        self.conv_34 = DepthWise(64, 128, 2, 256, norm=norm, residual=False)
        self.conv_4 = Residual(128, 6, 256, norm=norm)
        self.conv_45 = DepthWise(128, 128, 2, 512, norm=norm, residual=False)
        self.conv_5 = Residual(128, 2, 256, norm=norm)
        self.sep = nn.Conv2d(128, 512, 1, bias=bias)
        self.sep_bn = _norm(norm, 512)
        self.prelu = nn.PReLU(512)
        self.GDC_dw = nn.Conv2d(512, 512, 7, groups=512, bias=bias)
        self.GDC_bn = _norm(norm, 512)
        self.features = nn.Conv2d(512, EMBEDDING_DIM, 1, bias=bias)
        # The last norm is kept as an identity for `group` (GroupNorm of a 1x1 map over 128 channels
        # would fight the L2 normalisation that follows).
        self.last_bn = _norm(norm, EMBEDDING_DIM) if norm == "batch" else nn.Identity()
        self.train_from = train_from

    # -- stages --------------------------------------------------------------------------------
    @property
    def train_from(self) -> str:
        return self._train_from

    @train_from.setter
    def train_from(self, stage: str) -> None:
        if stage not in STAGES:
            raise ValueError(f"train_from must be one of {', '.join(STAGES)}; got {stage!r}")
        self._train_from = stage
        first = STAGES.index(stage)
        for i, name in enumerate(STAGES):
            for p in self._stage_params(name):
                p.requires_grad_(i >= first)

    def _stage_modules(self, name: str) -> list[nn.Module]:
        if name == "sep":
            return [self.sep, self.sep_bn, self.prelu]
        if name == "GDC_dw":
            return [self.GDC_dw, self.GDC_bn]
        if name == "features":
            return [self.features, self.last_bn]
        return [getattr(self, name)]

    def _stage_params(self, name: str) -> Iterable[nn.Parameter]:
        for m in self._stage_modules(name):
            yield from m.parameters()

    def _run_stage(self, name: str, x: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
        y: torch.Tensor
        if name == "sep":
            y = self.prelu(self.sep_bn(self.sep(x)))
        elif name == "GDC_dw":
            y = self.GDC_bn(self.GDC_dw(x))
        elif name == "features":
            z: torch.Tensor = self.last_bn(self.features(x)).flatten(1)
            y = F.normalize(z, dim=1) if normalize else z
        else:
            y = getattr(self, name)(x)
        return y

    def forward_prefix(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen stages before `train_from` (identity when everything trains)."""
        for name in STAGES[: STAGES.index(self.train_from)]:
            x = self._run_stage(name, x)
        return x

    def forward_tail(self, h: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
        """The trainable stages, from `forward_prefix`'s output to the unit embedding (or, with
        `normalize=False`, to the embedding layer's output before L2 normalisation)."""
        for name in STAGES[STAGES.index(self.train_from) :]:
            h = self._run_stage(name, h, normalize=normalize)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tail(self.forward_prefix(x))

    def tail_param_names(self) -> list[str]:
        first = STAGES.index(self.train_from)
        ids = {id(p) for name in STAGES[first:] for p in self._stage_params(name)}
        return [n for n, p in self.named_parameters() if id(p) in ids]


class Tail(nn.Module):
    """The trainable part as its own module (parameters shared with the embedder), for Opacus."""

    _model: MobileFaceNet  # not a submodule (set past nn.Module's registry): its parameters are in `parts`

    def __init__(self, model: MobileFaceNet):
        super().__init__()
        first = STAGES.index(model.train_from)
        self.stage_names = list(STAGES[first:])
        self.parts = nn.ModuleList([m for n in self.stage_names for m in model._stage_modules(n)])
        object.__setattr__(self, "_model", model)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self._model.forward_tail(h)


# -- BatchNorm folding and the CASIA checkpoint --------------------------------------------------
def _conv_bn_pairs(model: MobileFaceNet) -> list[tuple[str, str]]:
    """(conv key prefix, BatchNorm key prefix) for every conv followed by a norm, in the folded naming."""
    pairs = []
    for name, mod in model.named_modules():
        if isinstance(mod, ConvUnit):
            pairs.append((f"{name}.conv", f"{name}.bn"))
    pairs += [("sep", "sep_bn"), ("GDC_dw", "GDC_bn"), ("features", "last_bn")]
    return pairs


def fold_batchnorm(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A `batch` state dict -> the equivalent `folded` one (eval-mode statistics folded into convs).

    conv(x) * g / sqrt(v + eps) + (b - m * g / sqrt(v + eps)) == BN(conv(x)) in eval mode.
    """
    template = MobileFaceNet("folded")
    out: dict[str, torch.Tensor] = {}
    folded_convs = set()
    for conv, bn in _conv_bn_pairs(template):
        need = [f"{conv}.weight"] + [f"{bn}.{k}" for k in ("weight", "bias", "running_mean", "running_var")]
        for k in need:
            if k not in raw:
                raise CheckpointMismatch(f"checkpoint lacks `{k}` (needed to fold `{bn}` into `{conv}`)")
        w = raw[f"{conv}.weight"].double()
        scale = raw[f"{bn}.weight"].double() / torch.sqrt(raw[f"{bn}.running_var"].double() + BN_EPS)
        out[f"{conv}.weight"] = (w * scale.view(-1, 1, 1, 1)).float()
        out[f"{conv}.bias"] = (raw[f"{bn}.bias"].double() - raw[f"{bn}.running_mean"].double() * scale).float()
        folded_convs.add(conv)
    for k, v in raw.items():
        if k.endswith(".num_batches_tracked") or any(k.startswith(f"{bn}.") for _, bn in _conv_bn_pairs(template)):
            continue
        if k.rsplit(".", 1)[0] in folded_convs:
            continue
        out[k] = v
    return out


def check_state(model: nn.Module, state: dict[str, torch.Tensor], *, what: str, partial: bool = False) -> None:
    """Raise CheckpointMismatch naming the first missing, unexpected or mis-shaped key."""
    expected = model.state_dict()
    for k, v in expected.items():
        if k not in state:
            if partial:
                continue
            raise CheckpointMismatch(f"{what}: missing key `{k}` (shape {tuple(v.shape)})")
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointMismatch(
                f"{what}: key `{k}` has shape {tuple(state[k].shape)}, the model expects {tuple(v.shape)}"
            )
    for k in state:
        if k not in expected:
            raise CheckpointMismatch(f"{what}: unexpected key `{k}` (not in a {type(model).__name__})")


def load_pretrained_state(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The CASIA checkpoint (`arcface.`-prefixed BatchNorm state dict), folded, checked."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a non-checkpoint file
        raise CheckpointMismatch(f"{path}: not a readable PyTorch state dict ({e})") from e
    if not isinstance(raw, dict):
        raise CheckpointMismatch(f"{path}: expected a state dict, found {type(raw).__name__}")
    raw = {k[len(PRETRAINED_PREFIX) :] if k.startswith(PRETRAINED_PREFIX) else k: v for k, v in raw.items()}
    check_state(MobileFaceNet("batch"), raw, what=str(path))
    return fold_batchnorm(raw)


def build_embedder(
    pretrained: str | os.PathLike[str] | None = None, *, train_from: str | None = None, norm: Norm | None = None
) -> MobileFaceNet:
    """A folded, Opacus-valid embedder: from the CASIA checkpoint, or from scratch (GroupNorm) if None.

    `train_from` defaults to `conv1` (all trainable) from scratch and to `features` (the last 512->128
    layer, the recipe bench/train.py selected) when fine-tuning a pretrained model.
    """
    if pretrained is not None:
        model = MobileFaceNet(norm or "folded", train_from or "features")
        state = load_pretrained_state(pretrained)
        check_state(model, state, what=str(pretrained))
        model.load_state_dict(state)
    else:
        model = MobileFaceNet(norm or "group", train_from or "conv1")
    return model.eval()


def prefix_fingerprint(model: MobileFaceNet) -> str:
    """sha256 of `train_from` and the frozen prefix's weights: keys caches of prefix features."""
    h = hashlib.sha256(model.train_from.encode())
    for name in STAGES[: STAGES.index(model.train_from)]:
        for p in model._stage_params(name):
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# -- what the federation exchanges -----------------------------------------------------------
def shared_state(model: MobileFaceNet) -> dict[str, torch.Tensor]:
    """The trainable tail's tensors (detached copies): exactly what sites send and the server averages."""
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in model.tail_param_names()}


def load_shared_state(model: MobileFaceNet, state: dict[str, torch.Tensor]) -> None:
    """Replace the tail with `state`; the keys must be exactly the tail's, with the same shapes."""
    names = model.tail_param_names()
    params = dict(model.named_parameters())
    for n in names:
        if n not in state:
            raise CheckpointMismatch(f"shared state: missing key `{n}` (train_from={model.train_from})")
        if tuple(state[n].shape) != tuple(params[n].shape):
            raise CheckpointMismatch(
                f"shared state: key `{n}` has shape {tuple(state[n].shape)}, the model expects {tuple(params[n].shape)}"
            )
    for n in state:
        if n not in params:
            raise CheckpointMismatch(f"shared state: unexpected key `{n}` (not a parameter of the embedder)")
        if n not in names:
            raise CheckpointMismatch(f"shared state: key `{n}` is frozen (before train_from={model.train_from})")
    with torch.no_grad():
        for n in names:
            params[n].copy_(state[n])


# -- checkpoints -----------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike[str], model: MobileFaceNet, meta: dict[str, Any] | None = None) -> str:
    """Save the whole embedder (all stages) plus JSON-able `meta`; atomic; returns the file's sha256."""
    import io

    meta = dict(meta or {})
    json.dumps(meta)  # refuse non-JSON meta now rather than at load time
    payload = {
        "format": CHECKPOINT_FORMAT,
        "norm": model.norm,
        "train_from": model.train_from,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": meta,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return sha256_file(path)


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[MobileFaceNet, dict[str, Any]]:
    """A facefed checkpoint -> (model, meta); the raw CASIA `.pth` is accepted too (meta says so)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointMismatch(f"{path}: not a readable PyTorch checkpoint ({e})") from e
    if isinstance(payload, dict) and payload.get("format") in READABLE_FORMATS:
        model = MobileFaceNet(payload["norm"], payload["train_from"])
        check_state(model, payload["state_dict"], what=str(path))
        model.load_state_dict(payload["state_dict"])
        return model.eval(), dict(payload["meta"])
    if isinstance(payload, dict) and any(k.startswith(PRETRAINED_PREFIX) for k in payload):
        return build_embedder(path), {"source": "pretrained", "sha256": sha256_file(path)}
    raise CheckpointMismatch(
        f"{path}: neither a facefed checkpoint (format {CHECKPOINT_FORMAT}) "
        f"nor the CASIA MobileFaceNet state dict (keys `{PRETRAINED_PREFIX}*`)"
    )


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
