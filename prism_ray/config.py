"""Config machinery: BaseConfig, ConfigError, YAML files merged + `--set key=value` overrides, validated."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

C = TypeVar("C", bound="BaseConfig")


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or out of range; the message names the field."""


class BaseConfig(BaseModel):
    """Frozen, strict-about-unknown-keys base for every config section."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def check(self) -> None:
        """Cross-field checks run once at load (`build_config`); raise ConfigError naming the field."""

    def config_hash(self) -> str:
        """Stable 16-hex-digit hash of the whole config (goes into every output row)."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# --- loading ---------------------------------------------------------------------------------


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "<root>"
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    extra = f"; and {err.error_count() - 1} more" if err.error_count() > 1 else ""
    return f"config field '{field}': {first['msg']}{shown}{extra}"


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config field '{dotted}': '{key}' is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: Sequence[str]) -> dict:
    """`["a.b=3", "c=[1, 2]"]` -> nested dict; values are parsed as YAML scalars/lists."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value")
        key, raw = item.split("=", 1)
        if not key.strip():
            raise ConfigError(f"override '{item}': empty key")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def build_config(cls: type[C], data: dict | None = None, overrides: Sequence[str] = ()) -> C:
    """Validate `data` + overrides into `cls`; any problem is one ConfigError line naming the field."""
    merged = _merge(data or {}, parse_overrides(overrides))
    try:
        config = cls.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None
    config.check()
    return config


def load_config(
    cls: type[C], paths: str | Path | Sequence[str | Path] | None = None, overrides: Sequence[str] = ()
) -> C:
    """Merge YAML files in order (a later file wins, section by section), then `key=value` overrides.

    Job parameters and compute/launch settings live in separate files
    (`--config configs/augment_sd15.yaml --config configs/compute/gpu.yaml`).
    """
    if paths is None:
        paths = []
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    data: dict = {}
    for path in paths:
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"config file '{path}': {err.strerror}") from None
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file '{path}': not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file '{path}': top level must be a mapping")
        data = _merge(data, loaded)
    return build_config(cls, data, overrides)
