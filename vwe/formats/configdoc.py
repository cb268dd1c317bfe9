"""Every setting, findable from the command line: `vwe config show` (the resolved YAML, each key with
its one-line doc) and `vwe config keys` (per section: key, type, default, allowed values, doc)."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any

import yaml

from vwe.formats.config import Config
from vwe.runtime.errors import ConfigError


def _sections() -> list[tuple[str, type]]:
    hints = typing.get_type_hints(Config)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(Config)]


def _fields(section_cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(section_cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(section_cls)]


def _type_text(tp: Any) -> str:
    if typing.get_origin(tp) in (list, tuple):
        return f"list[{_type_text(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def _constraint(f: dataclasses.Field) -> str:
    meta = f.metadata
    if meta.get("choices"):
        return " | ".join(map(str, meta["choices"]))
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None:
        return f"{lo}..{hi}"
    if lo is not None:
        return f">= {lo}"
    if hi is not None:
        return f"<= {hi}"
    return ""


def _scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("\n...").strip()


def render_config(cfg: Config) -> str:
    """The resolved config as YAML (loadable by `vwe ... --config`), each key followed by its doc."""
    lines = []
    for name, cls in _sections():
        lines.append(f"{name}:")
        section = getattr(cfg, name)
        for f, _ in _fields(cls):
            doc = " ".join(filter(None, [f.metadata.get("doc", ""), f"[{_constraint(f)}]" if _constraint(f) else ""]))
            entry = f"  {f.name}: {_scalar(getattr(section, f.name))}"
            lines.append(f"{entry:<44} # {doc}" if doc else entry)
    return "\n".join(lines) + "\n"


def keys_table(section: str | None = None) -> str:
    """Per section: each key with its type, default, allowed values and doc."""
    names = [n for n, _ in _sections()]
    if section is not None and section not in names:

        raise ConfigError(f"no config section '{section}' (sections: {', '.join(names)})")
    defaults = Config()
    out = []
    for name, cls in _sections():
        if section is not None and name != section:
            continue
        out.append(f"{name}:")
        for f, tp in _fields(cls):
            allowed = _constraint(f)
            out.append(f"  {name}.{f.name}  ({_type_text(tp)}, default {_scalar(getattr(getattr(defaults, name), f.name))}"
                       f"{'; ' + allowed if allowed else ''})")
            if f.metadata.get("doc"):
                out.append(f"      {f.metadata['doc']}")
        out.append("")
    return "\n".join(out)
