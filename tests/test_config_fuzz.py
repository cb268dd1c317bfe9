"""Fuzzing the config loader (issue 21): random YAML documents, dotted overrides and environment values.
Every outcome is a loaded config (exit 0) or a vwe error (exit 2 with a message), never another exception."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import tempfile
import typing
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from vwe.cli import main
from vwe.formats.config import Config, load_config
from vwe.runtime.errors import VweError

SECTIONS = {name: tp for name, tp in typing.get_type_hints(Config).items()}
KEYS = [f"{s}.{f.name}" for s, tp in SECTIONS.items() for f in dataclasses.fields(tp)]
ENV_NAMES = ["VWE_FUZZ_A", "VWE_FUZZ_B"]
EXAMPLES = int(os.environ.get("VWE_FUZZ_EXAMPLES", "250"))

# text that exercises the ${...} grammar: references, defaults, nesting, stray braces and dollars
env_text = st.lists(st.sampled_from(["${", "}", ":-", "-", "$", "{", "VWE_FUZZ_A", "VWE_FUZZ_B", "HOME",
                                     "/x", "a", " ", "1", ""]), max_size=10).map("".join)
scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                   st.text(max_size=20), env_text)
value = st.recursive(scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                     max_leaves=12)
section = st.dictionaries(st.one_of(st.sampled_from([f.name for tp in SECTIONS.values()
                                                     for f in dataclasses.fields(tp)]), st.text(max_size=8)),
                          value, max_size=5)
tree = st.dictionaries(st.one_of(st.sampled_from(list(SECTIONS)), st.text(max_size=8)),
                       st.one_of(section, value), max_size=4)

# raw documents: dumped trees, mangled dumps (cut, duplicated lines, tabs, deep brackets) and free text
def _mangle(text: str, how: int, at: int) -> str:
    lines = text.splitlines(keepends=True) or [""]
    at %= len(lines)
    return [text[: at * 7],
            "".join(lines[: at + 1] + lines[at:]),  # a line (often a key) given twice
            text.replace("  ", "\t", 1),
            text + "x: " + "[" * (at * 150) + "]" * (at * 150) + "\n",
            text.replace(":", "", 1),
            text + "&a [*a]\n"][how % 6]


document = st.one_of(
    tree.map(lambda t: yaml.safe_dump(t, sort_keys=False)),
    st.tuples(tree.map(lambda t: yaml.safe_dump(t, sort_keys=False)), st.integers(0, 5), st.integers(0, 40))
      .map(lambda a: _mangle(*a)),
    st.text(max_size=80),
    st.just(""),
)
override = st.one_of(
    st.tuples(st.sampled_from(KEYS), st.one_of(env_text, value.map(lambda v: yaml.safe_dump(v).strip()),
                                               st.text(max_size=12))).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.text(max_size=16),
)
environment = st.fixed_dictionaries({n: st.one_of(st.none(), st.just(""), env_text) for n in ENV_NAMES})


@contextlib.contextmanager
def env_set(values: dict[str, str | None]):
    saved = {n: os.environ.get(n) for n in values}
    try:
        for n, v in values.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v.replace("\0", "")
        yield
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(doc=document, overrides=st.lists(override, max_size=3), env=environment)
def test_config_loader_never_raises_anything_but_a_vwe_error(doc, overrides, env):
    with tempfile.TemporaryDirectory() as tmp, env_set(env):
        path = Path(tmp) / "fuzz.yaml"
        path.write_text(doc)
        try:
            cfg = load_config(path, overrides)
        except VweError as e:
            assert str(e).strip()
            loaded = False
        else:
            assert isinstance(cfg, Config)
            loaded = True
        # the same through the CLI: exit 0, or exit 2 with the command's error line, never a traceback
        cli_overrides = [o for o in overrides if "=" in o and not o.startswith("-")]
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["config", "show", "--config", str(path), *cli_overrides])
        assert code in (0, 2), (code, err.getvalue())
        if code == 2:
            assert "vwe config: error: " in err.getvalue()
        if cli_overrides == overrides:
            assert (code == 0) == loaded, err.getvalue()
