"""Config machinery: BaseConfig, ConfigError, YAML files merged + `--set key=value` overrides, validated."""

from __future__ import annotations

import difflib
import hashlib
import json
import typing
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

C = TypeVar("C", bound="BaseConfig")


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or out of range; the message names the field."""


@contextmanager
def config_field(field: str) -> Iterator[None]:
    """Checks of what a config value points to (a model folder, say) whose failure is the config's:
    a missing path or an unusable model inside the block becomes a ConfigError naming `field`."""
    try:
        yield
    except ConfigError:
        raise
    except (OSError, ValueError) as err:
        raise ConfigError(f"config field '{field}': {err}") from None


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


def _sections(annotation) -> list[type[BaseModel]]:
    """The config classes an annotation holds: X, `X | None`, `list[X]`, `dict[str, X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [c for arg in typing.get_args(annotation) for c in _sections(arg)]


def _close_key(cls: type[BaseModel], loc: tuple) -> str | None:
    """The known key nearest to the unknown one at `loc` (difflib), if any is close."""
    models = [cls]
    for part in loc[:-1]:
        if isinstance(part, int):  # a list item: same classes
            continue
        inner = [c for m in models if part in m.model_fields for c in _sections(m.model_fields[part].annotation)]
        models = inner or [m for m in models if m.__name__ == part]  # pydantic names a union member by class
    names = [name for m in models for name in m.model_fields]
    close = difflib.get_close_matches(str(loc[-1]), names, n=1)
    return close[0] if close else None


def _format_error(err: ValidationError, cls: type[BaseModel]) -> str:
    """Every problem on one line, each naming its field; the missing required fields together."""
    parts: list[str] = []
    missing: list[str] = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "missing":
            if not missing:
                parts.append("")  # the missing fields' place, filled below
            missing.append(f"'{field}'")
            continue
        if e["type"] == "extra_forbidden" and e["loc"]:
            close = _close_key(cls, e["loc"])
            parts.append(f"config field '{field}': unknown key" + (f", did you mean '{close}'?" if close else ""))
            continue
        value = e.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        parts.append(f"config field '{field}': {e['msg']}{shown}")
    if missing:
        s = "s" if len(missing) > 1 else ""
        parts[parts.index("")] = f"config field{s} {', '.join(missing)}: Field required"
    return "; ".join(parts)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Set `a.b.0.c` in a tree of dicts and lists: sections are created, list items are indexed."""
    keys = dotted.split(".")
    node: Any = tree
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        where = ".".join(keys[: depth + 1])
        if isinstance(node, list):
            if not key.lstrip("-").isdigit():
                raise ConfigError(f"config field '{where}': '{'.'.join(keys[:depth])}' is a list, use an index")
            index = int(key)
            if not -len(node) <= index < len(node):
                raise ConfigError(f"config field '{where}': index {index} out of range ({len(node)} items)")
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"config field '{where}': '{'.'.join(keys[:depth])}' is not a section")
        if last:  # a mapping merges into an existing section, as a later config file would
            both = isinstance(value, dict) and isinstance(node.get(key), dict)
            node[key] = _merge(node[key], value) if both else value
        else:
            node = node.setdefault(key, {})


def _parse_value(raw: str) -> Any:
    return yaml.safe_load(raw) if raw.strip() else ""


def parse_overrides(overrides: Sequence[str]) -> dict:
    """`["a.b=3", "c=[1, 2]"]` -> nested dict; values are parsed as YAML scalars/lists."""
    return apply_overrides({}, overrides)


def apply_overrides(tree: dict, overrides: Sequence[str]) -> dict:
    """A copy of `tree` with each `key=value` applied in order (`subgroups.0.quota=3` indexes a list)."""
    import copy

    tree = copy.deepcopy(tree)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value")
        key, raw = item.split("=", 1)
        if not key.strip():
            raise ConfigError(f"override '{item}': empty key")
        try:
            value = _parse_value(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override '{item}': value is not valid YAML ({getattr(err, 'problem', err)})") from None
        _set_dotted(tree, key.strip(), value)
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
    merged = apply_overrides(data or {}, overrides)
    try:
        config = cls.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format_error(err, cls)) from None
    config.check()
    return config


def with_unset_defaults(config: C, defaults: dict[str, dict], source: str) -> C:
    """`config` with `defaults[section][field]` for each field of a section that no YAML file or `--set`
    gave (pydantic's `model_fields_set`): e.g. the method settings a model family recommends."""
    update = {}
    for name, values in defaults.items():
        section = getattr(config, name, None)
        if not isinstance(section, BaseModel):
            raise ConfigError(f"{source}: {name!r} is not a section of the {type(config).__name__}")
        unset = {key: value for key, value in values.items() if key not in section.model_fields_set}
        if not unset:
            continue
        try:
            update[name] = type(section).model_validate({**section.model_dump(exclude_unset=True), **unset})
        except ValidationError as err:
            raise ConfigError(f"{source}: section '{name}': {_format_error(err, type(section))}") from None
    if not update:
        return config
    config = config.model_copy(update=update)
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
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"config file '{path}'{where}: not valid YAML ({problem})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file '{path}': top level must be a mapping")
        data = _merge(data, loaded)
    return build_config(cls, data, overrides)


# --- --print-config --------------------------------------------------------------------------

REQUIRED = "<required>"


def _with_defaults(cls: type[BaseModel], data: dict) -> dict:
    """`data` over `cls`'s defaults, nested sections included; a missing required field -> REQUIRED."""
    out: dict = {}
    for name, field in cls.model_fields.items():
        kinds = [a for a in (typing.get_args(field.annotation) or [field.annotation]) if isinstance(a, type)]
        section = next((k for k in kinds if issubclass(k, BaseModel)), None)  # X or `X | None`
        if name in data:
            value = data[name]
            if section and isinstance(value, dict):
                value = _with_defaults(section, value)
            out[name] = value
        elif field.is_required():
            out[name] = REQUIRED
        else:
            default = field.get_default(call_default_factory=True)
            out[name] = default.model_dump(mode="json") if isinstance(default, BaseModel) else default
    out.update({k: v for k, v in data.items() if k not in out})
    return out


def describe_config(
    cls: type[C], paths: str | Path | Sequence[str | Path] | None = None, overrides: Sequence[str] = ()
) -> str:
    """YAML for `--print-config`: the resolved config, or, when the only problems are required fields
    still missing, every default with those fields shown as `<required>`; other errors raise ConfigError."""
    try:
        config = load_config(cls, paths, overrides)
        return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    except ConfigError as original:
        try:  # the files were readable (load_config got past them): merge them again, as it does
            data: dict = {}
            for path in [paths] if isinstance(paths, (str, Path)) else (paths or []):
                data = _merge(data, yaml.safe_load(Path(path).read_text()) or {})
            data = apply_overrides(data, overrides)
            cls.model_validate(data)
        except ValidationError as err:
            if all(e["type"] == "missing" for e in err.errors()):
                return yaml.safe_dump(_with_defaults(cls, data), sort_keys=False)
        except (OSError, yaml.YAMLError, ConfigError, AttributeError, TypeError):
            pass
        raise original from None
