"""How the shared tail travels between server and sites: one flat float32 vector plus its layout.

Flower stores and transfers every Array of a message as its own object, one HTTP request per object
per hop (ServerApp -> SuperLink -> SuperNode -> ClientApp and back). The tail is two dozen tensors,
so sending it as one vector cuts the requests of a round by an order of magnitude, which is most of
the federation's own overhead on a small machine. The layout (tensor names and shapes, in order)
goes alongside in a ConfigRecord; the receiver checks it against what it expects before unpacking,
so an extra tensor (a head, say) changes both the layout and the length and is refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, SupportsInt, runtime_checkable

import numpy as np
import numpy.typing as npt

from facefed.common.errors import FacefedError

TAIL = "tail"  # the one array in the ArrayRecord
NAMES, SHAPES = "layout-names", "layout-shapes"  # ConfigRecord keys


class LayoutError(FacefedError, ValueError):
    """A flat vector whose layout or length does not match; the message says what differs."""


def shape_str(shape: Iterable[SupportsInt]) -> str:
    return ",".join(str(int(d)) for d in shape)


class _Host(Protocol):
    def numpy(self) -> npt.NDArray[Any]: ...


class _Tensor(Protocol):
    def cpu(self) -> _Host: ...


@runtime_checkable
class Detachable(Protocol):
    """A torch tensor, as far as packing needs one (this module does not import torch)."""

    def detach(self) -> _Tensor: ...


@runtime_checkable
class _Shaped(Protocol):
    @property
    def shape(self) -> Sequence[int]: ...


def _float32(v: object) -> npt.NDArray[np.float32]:
    """A torch tensor (anything with `detach`) or an array-like, as float32 numpy."""
    return np.asarray(v.detach().cpu().numpy() if isinstance(v, Detachable) else v, dtype=np.float32)


def _shape(v: object) -> Sequence[int]:
    return v.shape if isinstance(v, _Shaped) else np.shape(np.asarray(v))


def layout(state: Mapping[str, object]) -> tuple[list[str], list[str]]:
    return list(state), [shape_str(_shape(v)) for v in state.values()]


def pack(state: Mapping[str, object]) -> tuple[npt.NDArray[np.float32], list[str], list[str]]:
    """(flat float32 vector, names, shapes) of a name -> tensor mapping (torch or numpy)."""
    parts = [_float32(v).ravel() for v in state.values()]
    flat = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    names, shapes = layout(state)
    return flat, names, shapes


def unpack(flat: npt.NDArray[np.float32], names: list[str], shapes: list[str]) -> dict[str, npt.NDArray[np.float32]]:
    if len(names) != len(shapes) or len(set(names)) != len(names):
        raise LayoutError("layout names and shapes do not pair up (or a name repeats)")
    dims = [tuple(int(d) for d in s.split(",")) if s else () for s in shapes]
    sizes = [int(np.prod(d)) for d in dims]
    if flat.ndim != 1 or flat.size != sum(sizes):
        raise LayoutError(f"flat vector has {flat.size} values, its layout needs {sum(sizes)}")
    out: dict[str, npt.NDArray[np.float32]] = {}
    pos = 0
    for name, d, n in zip(names, dims, sizes, strict=True):
        out[name] = flat[pos : pos + n].reshape(d)
        pos += n
    return out


def compare(expected: tuple[list[str], list[str]], got: tuple[list[str], list[str]]) -> str | None:
    """None if the layouts are equal, else what differs (extra / missing / reshaped tensors)."""
    e, g = dict(zip(*expected, strict=True)), dict(zip(*got, strict=True))
    extra, missing = sorted(g.keys() - e.keys()), sorted(e.keys() - g.keys())
    if extra or missing:
        return f"tensors differ from the backbone sent: extra {extra[:5]}, missing {missing[:5]}"
    reshaped = [k for k in e if e[k] != g[k]]
    if reshaped:
        return f"`{reshaped[0]}` has shape ({g[reshaped[0]]}), the backbone has ({e[reshaped[0]]})"
    if expected[0] != got[0]:
        return "tensors are in another order than sent"
    return None
