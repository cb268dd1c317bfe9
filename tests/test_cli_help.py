"""Finding the settings from the command line: --version, user-facing help, `vwe config keys/show`."""
from __future__ import annotations

import dataclasses
import typing

from conftest import REPO, run_vwe

from vwe import __version__
from vwe.formats.config import Config, load_config


def test_version_and_top_level_help():
    assert run_vwe("--version").stdout.strip() == f"vwe {__version__}"
    out = run_vwe("--help").stdout
    assert "vwe demo" in out and "vwe config keys" in out
    assert "Thin:" not in out  # no developer docstring
    train_help = run_vwe("train", "--help").stdout
    assert "vwe config keys" in train_help and "key.sub=value" in train_help


def test_config_keys_lists_every_setting():
    out = run_vwe("config", "keys").stdout
    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(hints[section.name]):
            assert f"  {section.name}.{f.name}  (" in out, f"{section.name}.{f.name} missing"
            assert f.metadata.get("doc"), f"{section.name}.{f.name} has no one-line doc"
    train_only = run_vwe("config", "keys", "train").stdout
    assert "train.lr  (float, default 0.01; >= 0.0)" in train_only and "model." not in train_only
    bad = run_vwe("config", "keys", "trian", check=False)
    assert bad.returncode == 2 and "no config section 'trian'" in bad.stderr


def test_config_show_is_the_resolved_config_and_loads_back(tmp_path):
    out = run_vwe("config", "show", "--config", str(REPO / "configs" / "demo.yaml"), "train.lr=0.125",
                  "data.long_side=[64, 96]").stdout
    assert "  lr: 0.125" in out and "# backbone learning rate" in out
    assert "mixed_precision: auto" in out and "[auto | no | fp16 | bf16]" in out and "dtype: float32" in out
    shown = tmp_path / "shown.yaml"
    shown.write_text(out)
    expected = load_config(REPO / "configs" / "demo.yaml", ["train.lr=0.125", "data.long_side=[64, 96]"])
    assert load_config(shown) == expected
    bad = run_vwe("config", "show", "--config", str(REPO / "configs" / "demo.yaml"), "train.lrr=1", check=False)
    assert bad.returncode == 2 and "did you mean 'train.lr'" in bad.stderr
