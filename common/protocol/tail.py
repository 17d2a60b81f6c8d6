"""How the shared tail travels between server and sites: one flat float32 vector plus its layout.

Flower stores and transfers every Array of a message as its own object, one HTTP request per object
per hop (ServerApp -> SuperLink -> SuperNode -> ClientApp and back). The tail is two dozen tensors,
so sending it as one vector cuts the requests of a round by an order of magnitude, which is most of
the federation's own overhead on a small machine. The layout (tensor names and shapes, in order)
goes alongside in a ConfigRecord; the receiver checks it against what it expects before unpacking,
so an extra tensor (a head, say) changes both the layout and the length and is refused.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from facefed.common.errors import FacefedError

TAIL = "tail"  # the one array in the ArrayRecord
NAMES, SHAPES = "layout-names", "layout-shapes"  # ConfigRecord keys


class LayoutError(FacefedError, ValueError):
    """A flat vector whose layout or length does not match; the message says what differs."""


def shape_str(shape) -> str:
    return ",".join(str(int(d)) for d in shape)


def layout(state: Mapping[str, object]) -> tuple[list[str], list[str]]:
    return list(state), [shape_str(np.shape(v)) for v in state.values()]


def pack(state: Mapping[str, object]) -> tuple[np.ndarray, list[str], list[str]]:
    """(flat float32 vector, names, shapes) of a name -> tensor mapping (torch or numpy)."""
    parts = [
        np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v, dtype=np.float32).ravel()
        for v in state.values()
    ]
    flat = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    names, shapes = layout(state)
    return flat, names, shapes


def unpack(flat: np.ndarray, names: list[str], shapes: list[str]) -> dict[str, np.ndarray]:
    if len(names) != len(shapes) or len(set(names)) != len(names):
        raise LayoutError("layout names and shapes do not pair up (or a name repeats)")
    dims = [tuple(int(d) for d in s.split(",")) if s else () for s in shapes]
    sizes = [int(np.prod(d)) for d in dims]
    if flat.ndim != 1 or flat.size != sum(sizes):
        raise LayoutError(f"flat vector has {flat.size} values, its layout needs {sum(sizes)}")
    out, pos = {}, 0
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
