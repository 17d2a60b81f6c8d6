"""docs/configuration.md, generated from the config models so it cannot drift from them.

`python -m facefed.common.configdoc > docs/configuration.md` rewrites it; tests/test_configdoc.py
fails when the file and the models disagree. Every key, its type, default, range and description
comes from the pydantic fields; the rules that span keys (and the ones only a site can check) are
listed under "Rules".
"""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from facefed.common.config import TrainConfig
from facefed.common.fedconfig import EvalConfig, FederationConfig

RULES = [
    "`train.noise_multiplier` xor `train.target_epsilon`: give exactly one for DP training "
    "(`privacy_unit` person or image); a federation with `rounds > 1` uses `noise_multiplier` "
    "(epsilon grows round by round, bounded by `train.max_epsilon`).",
    "`train.delta` must be below 1/`train.min_people` (checked by the server), and below one over the "
    'number of people (or images, with `privacy_unit = "image"`) at each site (checked by the server '
    "against the people each site reported, then by the site).",
    "**delta and the privacy unit are fixed per site**: a site's accountant (STATE/accountant.json) "
    "keeps the delta and unit of its first training for good, so a later run with another `train.delta` "
    "or `train.privacy_unit` is refused by that site (`facefed-server train` refuses it first when the "
    "ledger knows the site's values).",
    "`train.target_epsilon` must not exceed `train.max_epsilon`; a round that would take a site past "
    "`train.max_epsilon` is refused by the site (kind `budget`) before any step.",
    "`train.center_noise = 0` is refused (it would release the mean without noise); with few people "
    "per site the centring is refused as mostly noise: leave it unset there.",
    "`sites`, if given, lists no site twice and at least `min_sites` sites.",
    "`train.train_from` is a stage of the MobileFaceNet (see the table).",
    "Unknown keys are errors (every model forbids them); the error names the key and this page.",
]


def _type(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "")
    if getattr(annotation, "__name__", None) and typing.get_origin(annotation) is None:
        text = annotation.__name__
    return text.replace("NoneType", "None")


def _range(info: FieldInfo) -> str:
    out = []
    for m in info.metadata:
        for attr, op in (
            ("gt", ">"),
            ("ge", ">="),
            ("lt", "<"),
            ("le", "<="),
            ("min_length", "len >="),
            ("max_length", "len <="),
        ):
            v = getattr(m, attr, None)
            if v is not None:
                out.append(f"{op} {v:g}" if isinstance(v, float) else f"{op} {v}")
        pattern = getattr(m, "pattern", None)
        if pattern:
            out.append(f"matches `{pattern}`")
    return ", ".join(out) or "-"


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    if info.default_factory is not None:
        return "(table)"
    d = info.default
    if d is None:
        return "unset"
    if isinstance(d, str):
        return f'`"{d}"`'
    if isinstance(d, bool):
        return f"`{str(d).lower()}`"
    return f"`{d}`"


def _table(model: type[BaseModel], prefix: str) -> list[str]:
    rows = ["| key | type | default | range | meaning |", "|---|---|---|---|---|"]
    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            continue  # a sub-table: its own section
        desc = (info.description or "").replace("|", "\\|").replace("\n", " ")
        typ = _type(info.annotation).replace("|", "\\|")
        rows.append(f"| `{prefix}{name}` | `{typ}` | {_default(info)} | {_range(info)} | {desc} |")
    return rows


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from the config models (`common/fedconfig.py`, `common/config.py`) by",
        "`python -m facefed.common.configdoc > docs/configuration.md`; a test fails when they disagree.",
        "",
        "A federation config (`facefed-server train --config FILE`, e.g. `configs/federation.toml`) is TOML",
        "with the top-level keys below, an `[evaluate]` table and a `[train]` table; `[train]` alone is",
        "also the config of `facefed-client train` (e.g. `configs/train.toml`).",
        "",
        "## Top level",
        "",
        *_table(FederationConfig, ""),
        "",
        "## `[evaluate]`: the server's per-round evaluation",
        "",
        (EvalConfig.__doc__ or "").strip(),
        "",
        *_table(EvalConfig, "evaluate."),
        "",
        "## `[train]`: each site's local training",
        "",
        " ".join((TrainConfig.__doc__ or "").split()),
        "",
        *_table(TrainConfig, "train."),
        "",
        "## Rules",
        "",
        *[f"- {r}" for r in RULES],
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
