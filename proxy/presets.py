"""Presets and config files: the file side of configuration, kept apart from the pydantic models.

The YAML presets live in the top-level configs/ folder and ship inside the package as
`w2s_presets` (setup.py), found here with importlib.resources, so an installed wheel has them
from any directory; `W2S_CONFIG_DIR` points at another folder of the same layout instead.
Top-level files there are whole configs (`paper-cbs-w4k4l30`); upstreams/, scorers/ and search/
hold the presets of each config part.

A config file has three parts, `upstream`, `scorer` and `search`; each is a mapping, the name of
a preset of that part (`search: cbs-w4k4l30`) or a refined preset (`{preset: NAME, ...fields}`).
`server.modes` values are search presets the same way. Every name is resolved to a plain
mapping here, before validation: proxy.config's models never read a file.
"""
from __future__ import annotations

import importlib.resources
import os
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from proxy.config import AppConfig, ConfigError, SearchConfig, ServerConfig, cap_problem, format_validation_error

PARTS = {"upstream": "upstreams", "scorer": "scorers", "search": "search"}
"""Config part -> its presets' subfolder."""

_PACKAGE = "w2s_presets"
_SUFFIX = ".yaml"


def presets_dir() -> Traversable:
    """$W2S_CONFIG_DIR if set, else the installed `w2s_presets` package.

    A source tree run without installing (PYTHONPATH=.) has no `w2s_presets` to import; it
    reads the configs/ folder beside proxy/ instead.
    """
    override = os.environ.get("W2S_CONFIG_DIR")
    if override:
        return Path(override)
    try:
        return importlib.resources.files(_PACKAGE)
    except ModuleNotFoundError:
        source = Path(__file__).resolve().parent.parent / "configs"
        if source.is_dir():
            return source
        raise ConfigError(f"presets not found: package {_PACKAGE!r} is not installed (reinstall w2s-proxy)") from None


def _folder(part: str | None) -> Traversable:
    root = presets_dir()
    if part is None:
        return root
    if part not in PARTS:
        raise ConfigError(f"unknown config part {part!r} (known: {', '.join(PARTS)})")
    return root.joinpath(PARTS[part])


def preset_names(part: str | None = None) -> list[str]:
    """Preset names of a config part ("upstream", "scorer", "search"); None: whole-config presets."""
    folder = _folder(part)
    if not folder.is_dir():
        return []
    return sorted(p.name.removesuffix(_SUFFIX) for p in folder.iterdir() if p.name.endswith(_SUFFIX) and p.is_file())


def _known(names: list[str]) -> str:
    return ", ".join(names) or "none"


def _parse_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    return data


def _read_preset(part: str | None, name: str) -> dict[str, Any]:
    file = None if "/" in name or "\\" in name or name.startswith(".") else _folder(part).joinpath(name + _SUFFIX)
    if file is None or not file.is_file():
        what = "config" if part is None else part
        raise ConfigError(f"{what}: unknown preset {name!r} (known: {_known(preset_names(part))})")
    return _parse_yaml(file.read_text(encoding="utf-8"), f"{part or 'config'} preset {name!r}")


def load_preset(part: str, name: str) -> dict[str, Any]:
    """The mapping of preset `name` of a config part; an unknown name lists the known ones."""
    return _read_preset(part, name)


def resolve_part(part: str, value: Any) -> Any:
    """A part's value with preset names resolved: `NAME` and `{preset: NAME, ...}` become mappings."""
    if isinstance(value, str):
        return load_preset(part, value)
    if isinstance(value, dict) and "preset" in value:
        merged = dict(load_preset(part, str(value["preset"])))
        merged.update({k: v for k, v in value.items() if k != "preset"})
        return merged
    return value


def resolve_server(section: Any) -> Any:
    """The `server` section with each `modes` value's search preset resolved."""
    if isinstance(section, dict) and isinstance(section.get("modes"), dict):
        modes = {name: resolve_part("search", spec) for name, spec in section["modes"].items()}
        return {**section, "modes": modes}
    return section


def resolve_presets(data: dict[str, Any]) -> dict[str, Any]:
    """A whole config mapping with every preset name resolved, ready for AppConfig validation."""
    resolved = {k: resolve_part(k, v) if k in PARTS else v for k, v in data.items()}
    if "server" in resolved:
        resolved["server"] = resolve_server(resolved["server"])
    return resolved


def default_modes(server: ServerConfig) -> dict[str, SearchConfig]:
    """Every search preset as a mode under its own name, those over the server's caps left out."""
    modes = {}
    for name in preset_names("search"):
        data = load_preset("search", name)
        try:
            mode = SearchConfig.model_validate(data)
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, f"search preset {name}")) from None
        if cap_problem(mode, server.caps) is None:
            modes[name] = mode
    return modes


def server_modes(server: ServerConfig) -> dict[str, SearchConfig]:
    """The modes a server offers: `server.modes`, or when unset every search preset within the caps."""
    return dict(server.modes) if server.modes is not None else default_modes(server)


def build_config(data: dict[str, Any], **search_overrides: Any) -> AppConfig:
    """Resolve presets, apply search overrides, validate."""
    if not isinstance(data, dict):
        raise ConfigError("config: expected a mapping")
    resolved = resolve_presets(data)
    if search_overrides:
        search = dict(resolved.get("search") or {})
        search.update({k: v for k, v in search_overrides.items() if v is not None})
        resolved["search"] = search
    try:
        return AppConfig.model_validate(resolved)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def _looks_like_a_name(text: str) -> bool:
    return not any(sep in text for sep in ("/", "\\")) and not text.endswith((".yaml", ".yml"))


def read_config(path: str | Path) -> dict[str, Any]:
    """A config file's mapping, or a whole-config preset's (`paper-cbs-w4k4l30`) when no file has that name."""
    p = Path(path)
    if p.is_file():
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
        return _parse_yaml(text, str(p))
    if isinstance(path, str) and _looks_like_a_name(path):
        if path in preset_names():
            return _read_preset(None, path)
        raise ConfigError(f"config: no file and no preset named {path!r} "
                          f"(presets: {_known(preset_names())}; or give a YAML file's path)")
    if p.exists():
        raise ConfigError(f"{p}: not a file")
    raise ConfigError(f"config file not found: {p} (presets, given by name: {_known(preset_names())})")


def load_config(path: str | Path, **search_overrides: Any) -> AppConfig:
    """Load a config file, or a whole-config preset by name (e.g. `paper-cbs-w4k4l30`)."""
    return build_config(read_config(path), **search_overrides)


def _summary(part: str | None, data: dict[str, Any]) -> str:
    """One line on what a preset resolves to: its model and kind, its pair, its search shape."""
    if part == "upstream":
        return f"{data.get('kind', 'openai-completions')}  model {data.get('model', '?')}" + (
            f"  at {data['base_url']}" if data.get("base_url") else "")
    if part == "scorer":
        def side(name: str) -> str:
            spec = data.get(name) or {}
            return str(spec.get("path", "?")) if isinstance(spec, dict) else str(spec)
        return f"{data.get('kind', 'implicit')}  tuned {side('tuned')}  untuned {side('untuned')}"
    if part == "search":
        shape = "  ".join(f"{k.upper()} {'-' if data[k] is None else data[k]}" for k in ("w", "k", "l") if k in data)
        return shape + (f"  max_new_tokens {data['max_new_tokens']}" if "max_new_tokens" in data else "")
    def named(value: Any) -> str:
        if isinstance(value, dict):
            return f"{value['preset']} (refined)" if "preset" in value else "(inline)"
        return str(value)
    return "  ".join(f"{k} {named(v)}" for k, v in data.items() if k in PARTS)


def describe_presets() -> str:
    """Every preset a config may name, by part, one line each: `w2s presets`."""
    lines = []
    for part, title in ((None, "configs (--config NAME)"), *((p, f"{p} presets ({p}: NAME)") for p in PARTS)):
        names = preset_names(part)
        lines.append(f"{title}:")
        width = max((len(n) for n in names), default=0)
        for name in names:
            try:
                summary = _summary(part, _read_preset(part, name))
            except ConfigError as e:
                summary = f"(unreadable: {e})"
            lines.append(f"  {name.ljust(width)}  {summary}")
        if not names:
            lines.append("  (none)")
        lines.append("")
    return "\n".join(lines)
