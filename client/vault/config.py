"""`vault.toml`: format version, threshold, store URLs (in x-coordinate order), optional TLS dir."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from facefed.client.vault.errors import InvalidConfig

CONFIG_NAME = "vault.toml"
FORMAT_VERSION = 1


class VaultConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int = Field(FORMAT_VERSION, ge=FORMAT_VERSION, le=FORMAT_VERSION)
    threshold: int = Field(ge=1, le=255)
    stores: list[str] = Field(min_length=1, max_length=255)
    tls_dir: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> VaultConfig:
        if self.threshold > len(self.stores):
            raise ValueError(f"threshold {self.threshold} is larger than the number of stores ({len(self.stores)})")
        if len(set(self.stores)) != len(self.stores):
            raise ValueError("the same store is listed twice")
        return self

    def to_toml(self) -> str:
        # Only strings, ints and a list of strings: JSON string escapes are valid TOML basic strings.
        lines = [
            "# facefed vault. Stores are listed in x-coordinate order (first = x 1); do not reorder them.",
            f"format_version = {self.format_version}",
            f"threshold = {self.threshold}",
            "stores = [" + ", ".join(json.dumps(s) for s in self.stores) + "]",
        ]
        if self.tls_dir is not None:
            lines.append(f"tls_dir = {json.dumps(self.tls_dir)}")
        return "\n".join(lines) + "\n"


def load_config(vault_dir: Path) -> VaultConfig:
    path = vault_dir / CONFIG_NAME
    if not vault_dir.is_dir():
        raise InvalidConfig(
            f"no vault at {vault_dir}: directory does not exist (create one with `facefed-client vault init`)"
        )
    if not path.is_file():
        raise InvalidConfig(
            f"no vault at {vault_dir}: {CONFIG_NAME} is missing (create one with `facefed-client vault init`)"
        )
    try:
        raw = tomllib.loads(path.read_text())
        return VaultConfig.model_validate(raw)
    except tomllib.TOMLDecodeError as e:
        raise InvalidConfig(f"{path}: not valid TOML ({e})") from None
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise InvalidConfig(f"{path}: {where}: {first['msg']}") from None


def write_config(vault_dir: Path, config: VaultConfig) -> None:
    path = vault_dir / CONFIG_NAME
    tmp = path.with_suffix(".toml.tmp")
    with open(tmp, "w") as f:
        f.write(config.to_toml())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
