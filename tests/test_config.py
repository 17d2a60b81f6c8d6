"""TrainConfig and the generic TOML loader: unknown keys and out-of-range values name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

from facefed.common.config import ConfigError, TrainConfig, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_shipped_configs_load():
    found = sorted(CONFIGS.glob("train*.toml"))
    assert found
    for path in found:
        assert isinstance(load_config(path, TrainConfig), TrainConfig)


@pytest.mark.parametrize(
    "text, key, problem",
    [
        ("noise_multiplier = 1.0\nlearning_rate = 0.1\n", "learning_rate", "unknown key"),
        ("noise_multiplier = 1.0\nsample_rate = 1.5\n", "sample_rate", "less than or equal to 1"),
        ("noise_multiplier = -0.5\n", "noise_multiplier", "greater than or equal to 0"),
        ("noise_multiplier = 1.0\ndelta = 1.0\n", "delta", "less than 1"),
        ('noise_multiplier = 1.0\nprivacy_unit = "family"\n', "privacy_unit", "'person', 'image' or 'none'"),
        ('noise_multiplier = 1.0\nsteps = "many"\n', "steps", "valid integer"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, key, problem):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path, TrainConfig)
    assert f"config {path}: key `{key}`:" in str(e.value) and problem in str(e.value)


def test_cross_field_rules(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of noise_multiplier and target_epsilon"):
        load_config(write(tmp_path, 'privacy_unit = "person"\n'), TrainConfig)
    with pytest.raises(ConfigError, match="over max_epsilon"):
        load_config(write(tmp_path, "target_epsilon = 9.0\nmax_epsilon = 8.0\n"), TrainConfig)
    assert load_config(write(tmp_path, 'privacy_unit = "none"\n'), TrainConfig).privacy_unit == "none"
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "steps = = 3\n"), TrainConfig)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml", TrainConfig)


def test_delta_must_be_below_one_over_people():
    cfg = TrainConfig(noise_multiplier=1.0, delta=1e-2)
    cfg.check_people(50)
    with pytest.raises(ValueError, match=r"delta 0.01 must be below 1/200"):
        cfg.check_people(200)
    with pytest.raises(ValueError, match="fewer than min_people"):
        TrainConfig(noise_multiplier=1.0, min_people=5).check_people(3)


def test_nested_keys_are_dotted(tmp_path):
    class Inner(BaseModel):
        model_config = ConfigDict(extra="forbid")
        rate: float

    class Outer(BaseModel):
        model_config = ConfigDict(extra="forbid")
        train: Inner

    with pytest.raises(ConfigError, match=r"key `train\.rate`: Input should be a valid number"):
        load_config(write(tmp_path, '[train]\nrate = "x"\n'), Outer)
    with pytest.raises(ConfigError, match=r"key `train\.typo`: unknown key"):
        load_config(write(tmp_path, "[train]\nrate = 1\ntypo = 2\n"), Outer)
