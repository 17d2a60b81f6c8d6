"""docs/configuration.md is generated from the config models and must match them; the unknown-key
error points at it; every key an example config uses is documented there."""

from __future__ import annotations

import re
import tomllib

import pytest
from federation_support import ROOT

from facefed.common.config import ConfigError, TrainConfig, validate_config
from facefed.common.configdoc import render
from facefed.common.fedconfig import EvalConfig, FederationConfig


def test_the_reference_is_generated_from_the_models():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert doc == render(), "regenerate: python -m facefed.common.configdoc > docs/configuration.md"
    for model, prefix in ((FederationConfig, ""), (EvalConfig, "evaluate."), (TrainConfig, "train.")):
        for name in model.model_fields:
            if name not in ("evaluate", "train"):
                assert f"| `{prefix}{name}` |" in doc
    assert "delta and the privacy unit are fixed per site" in doc and "1/`train.min_people`" in doc


def test_example_configs_use_documented_keys_and_the_error_points_at_the_reference():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    for path in (ROOT / "configs").rglob("*.toml"):
        data = tomllib.loads(path.read_text())
        if "train" not in data:  # a site's training config (`facefed-client train`): the [train] keys
            data = {"train": data}
        for key, value in data.items():
            if isinstance(value, dict):
                for sub in value:
                    assert f"`{key}.{sub}`" in doc, (path, key, sub)
            else:
                assert f"`{key}`" in doc, (path, key)
    with pytest.raises(ConfigError, match=re.escape("docs/configuration.md lists every accepted key")):
        validate_config({"train": {"noise_multiplier": 1.0, "clip": 1.0}}, FederationConfig)
