"""Config: schema, YAML loading, overrides, env expansion and every error path."""
import os
from pathlib import Path

import pytest
import yaml

from conftest import run_vwe
from vwe.formats.config import Config, load_config, parse_override, save_config, config_from_dict
from vwe.runtime.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("name", ["voc.yaml", "voc_vwl_m.yaml", "demo.yaml"])
def test_shipped_configs_load(repo, name):
    cfg = load_config(repo / "configs" / name)
    assert isinstance(cfg, Config)


def test_paper_recipe_values(repo):
    cfg = load_config(repo / "configs" / "voc.yaml")
    assert cfg.model.backbone == "resnet50" and cfg.model.codebook == "learned"
    assert cfg.model.num_words == 256 and cfg.model.pool_levels == [1, 2, 4] and cfg.model.pool_gamma == 2.0
    assert cfg.train.batch_size == 16 and cfg.train.epochs == 6
    assert cfg.train.lr == 0.01 and cfg.train.head_lr_mult == 10.0
    assert cfg.train.momentum == pytest.approx(1e-4)  # what the published code really ran with
    assert cfg.infer.scales == [1.0, 0.5, 1.5, 2.0] and cfg.eval.bkg == 0.14
    m = load_config(repo / "configs" / "voc_vwl_m.yaml")
    assert m.model.codebook == "memory" and m.model.detach_stage2 is False and m.eval.bkg == 0.13


def test_defaults_without_file():
    cfg = load_config(None)
    assert cfg.train.mixed_precision == "auto" and cfg.data.on_corrupt == "error"


def test_overrides_parse_yaml_scalars(tmp_path):
    p = write(tmp_path, "model:\n  num_words: 64\n")
    cfg = load_config(p, ["model.num_words=32", "train.lr=0.5", "model.channels_last=false",
                          "infer.scales=[1.0, 2]", "output.run_dir=/tmp/x"])
    assert cfg.model.num_words == 32 and cfg.train.lr == 0.5 and cfg.model.channels_last is False
    assert cfg.infer.scales == [1.0, 2.0] and isinstance(cfg.infer.scales[1], float)
    assert cfg.output.run_dir == "/tmp/x"
    assert parse_override("a.b=3") == ("a.b", 3)


def test_scientific_notation_without_dot(tmp_path):
    # YAML 1.1 reads 1e-4 as a string; a float field still takes it
    cfg = load_config(write(tmp_path, "train:\n  weight_decay: 1e-4\n"), ["train.lr=2E-3"])
    assert cfg.train.weight_decay == 1e-4 and cfg.train.lr == 2e-3
    with pytest.raises(ConfigError, match="'train.epochs' must be an integer"):
        load_config(write(tmp_path, "train:\n  epochs: 1e2\n"))


def test_bare_no_for_a_choice_that_is_no(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  mixed_precision: no\n"), ["infer.mixed_precision=no"])
    assert cfg.train.mixed_precision == "no" and cfg.infer.mixed_precision == "no"
    with pytest.raises(ConfigError, match="'model.backbone' must be a string"):
        load_config(write(tmp_path, "model:\n  backbone: no\n"))


def test_int_promotes_to_float_but_not_bool(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  lr: 1\n"))
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    with pytest.raises(ConfigError, match="'train.lr' must be a number"):
        load_config(write(tmp_path, "train:\n  lr: true\n"))


def test_unknown_key_suggests_closest(tmp_path):
    p = write(tmp_path, "model:\n  num_word: 64\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "'model.num_word'" in str(e.value)
    assert "did you mean 'model.num_words'" in str(e.value)


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'trian'.*did you mean 'train'"):
        load_config(write(tmp_path, "trian:\n  lr: 0.1\n"))


def test_unknown_override_names_command_line(tmp_path):
    p = write(tmp_path, "{}")
    with pytest.raises(ConfigError, match=r"command line: unknown key 'train.lrr'.*'train.lr'"):
        load_config(p, ["train.lrr=0.1"])
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        load_config(p, ["train.lr"])
    with pytest.raises(ConfigError, match="'train' is not a section|must be a mapping"):
        load_config(p, ["train=3"])


@pytest.mark.parametrize("text,match", [
    ("train:\n  epochs: six\n", "'train.epochs' must be an integer"),
    ("train:\n  epochs: 2.5\n", "'train.epochs' must be an integer"),
    ("model:\n  detach_stage2: 1\n", "'model.detach_stage2' must be true or false"),
    ("model:\n  pool_levels: 4\n", "'model.pool_levels' must be a list"),
    ("model:\n  pool_levels: [1, x]\n", r"'model.pool_levels\[1\]' must be an integer"),
    ("model: 3\n", "'model' must be a mapping"),
    ("- a\n- b\n", "top level must be a mapping"),
    ("train:\n  epochs: 0\n", "'train.epochs' must be >= 1"),
    ("model:\n  memory_rho: 2\n", "'model.memory_rho' must be <= 1.0"),
    ("model:\n  backbone: resnet5\n", "'model.backbone' must be one of resnet18"),
    ("train:\n  mixed_precision: fp8\n", "'train.mixed_precision' must be one of auto, no, fp16, bf16"),
    ("data:\n  on_corrupt: ignore\n", "'data.on_corrupt' must be one of error, skip"),
    ("data:\n  long_side: [640, 320]\n", "'data.long_side' must be"),
    ("eval:\n  sweep: [0.5, 0.1, 0.01]\n", "'eval.sweep' must be"),
    ("train:\n  batch_size: 10\n  grad_accum: 4\n", "must be divisible by 'train.grad_accum'"),
    ("train: [\n", "not valid YAML"),
])
def test_bad_values_name_key_and_file(tmp_path, text, match):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as e:
        load_config(p)
    assert str(p) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_env_expansion(tmp_path, monkeypatch):
    monkeypatch.setenv("VWE_TEST_DIR", "/scratch/me")
    p = write(tmp_path, "output:\n  run_dir: ${VWE_TEST_DIR}/run\ndata:\n  root: ${VWE_UNSET_X:-fallback}\n")
    cfg = load_config(p)
    assert cfg.output.run_dir == "/scratch/me/run" and cfg.data.root == "fallback"
    monkeypatch.delenv("VWE_TEST_DIR")
    with pytest.raises(ConfigError, match=r"'output.run_dir'.*\$\{VWE_TEST_DIR\} is not set"):
        load_config(p)


def test_save_roundtrip(tmp_path):
    cfg = load_config(None, ["model.num_words=48", "train.seed=7"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    tree = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config_from_dict(tree) == cfg
    assert load_config(tmp_path / "run" / "config.yaml") == cfg


def test_cli_reports_config_error_without_traceback(tmp_path):
    p = write(tmp_path, "model:\n  codebok: memory\n")
    proc = run_vwe("train", "--config", str(p), check=False)
    assert proc.returncode == 2
    assert "unknown key 'model.codebok'" in proc.stderr and "did you mean 'model.codebook'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_overrides_before_and_after_options(tmp_path):
    p = write(tmp_path, "data:\n  root: /nowhere\n")
    # the data bench fails on the missing shards, after the config (with both overrides) was applied
    proc = run_vwe("bench", "data", "--config", str(p), "data.root=/first", "--workers", "1", check=False)
    assert proc.returncode == 2 and "data folder not found: /first" in proc.stderr
    proc = run_vwe("bench", "data", "--config", str(p), "--workers", "1", "data.root=/second", check=False)
    assert proc.returncode == 2 and "data folder not found: /second" in proc.stderr
    proc = run_vwe("synth", "--out", str(tmp_path / "x"), "--bogus", check=False)
    assert proc.returncode == 2 and "unrecognized arguments: --bogus" in proc.stderr


@pytest.mark.parametrize("text,key", [
    ("train:\n  momentum: .nan\n", "train.momentum"),
    ("train:\n  lr: .inf\n", "train.lr"),
    ("eval:\n  bkg: .NaN\n", "eval.bkg"),
    ("model:\n  pool_gamma: -.inf\n", "model.pool_gamma"),
    ("train:\n  weight_decay: 1e999\n", "train.weight_decay"),
    ("infer:\n  scales: [1.0, .nan]\n", r"infer.scales\[1\]"),
    ("eval:\n  sweep: [0.05, .inf, 0.01]\n", r"eval.sweep\[1\]"),
])
def test_non_finite_floats_refused(tmp_path, text, key):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError, match=f"'{key}' must be a finite number") as e:
        load_config(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("override", ["train.momentum=.nan", "eval.bkg=.inf", "train.lr=-.inf",
                                      "infer.scales=[.nan]", "model.memory_rho=nan"])
def test_non_finite_overrides_refused_by_the_cli(tmp_path, override):
    p = write(tmp_path, "{}")
    proc = run_vwe("train", "--config", str(p), override, check=False)
    key = override.split("=")[0]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"command line: '{key}" in proc.stderr
    assert "must be a finite number" in proc.stderr or "must be a number" in proc.stderr  # bare nan: a string


@pytest.mark.parametrize("content,match", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not a UTF-8 text file"),
    ("train:\n  lr: 0.1  # caf\u00e9\n".encode("latin-1"), "not a UTF-8 text file"),
    (b"train: [\n", "not valid YAML"),
    (b"train:\n\tlr: 0.1\n", "not valid YAML"),
    (b"- a\n- b\n", "top level must be a mapping of sections, got list"),
    (b"just a string\n", "top level must be a mapping of sections, got str"),
    (b"!!python/object:os.system {}\n", "not valid YAML"),
])
def test_files_that_are_not_yaml_mappings_named_by_the_cli(tmp_path, content, match):
    p = tmp_path / "bad.yaml"
    p.write_bytes(content)
    proc = run_vwe("infer", "--config", str(p), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"vwe infer: error: {p}: " in proc.stderr and match in proc.stderr


def test_renamed_infer_checkpoint_names_the_new_key(tmp_path):
    p = write(tmp_path, "infer:\n  checkpoint: /some/weights.safetensors\n")
    with pytest.raises(ConfigError, match=r"'infer.checkpoint' was renamed: use infer.weights") as e:
        load_config(p)
    assert str(p) in str(e.value)
    with pytest.raises(ConfigError, match=r"command line: 'infer.checkpoint' was renamed: use infer.weights"):
        load_config(None, ["infer.checkpoint=x"])
    assert load_config(None, ["infer.weights=x"]).infer.weights == "x"


def test_every_float_field_is_checked_for_finiteness():
    """A new float field gets the check without opting in: only `nonfinite=True` lets NaN through."""
    import typing
    checked = 0
    for section, section_tp in typing.get_type_hints(Config).items():
        for name, tp in typing.get_type_hints(section_tp).items():
            if tp is float or tp == list[float]:
                with pytest.raises(ConfigError, match=f"'{section}.{name}(\\[0\\])?' must be a finite number"):
                    load_config(None, [f"{section}.{name}={'.nan' if tp is float else '[.nan]'}"])
                checked += 1
    assert checked >= 10


@pytest.mark.parametrize("value,text,expected", [
    ("", "${VWE_T:-fallback}", "fallback"),         # set but empty: `:-` takes the default, as the shell
    ("", "${VWE_T-fallback}/x", "/x"),              # `-` takes it only when unset
    (None, "${VWE_T-fallback}/x", "fallback/x"),
    ("set", "${VWE_T:-fallback}", "set"),
    (None, "${VWE_T:-${HOME}/x}", "{HOME}/x"),      # a default holding a reference is expanded
    ("set", "${VWE_T:-${VWE_UNSET_Y}}", "set"),     # a default not used is not looked up (shell semantics)
    (None, "${VWE_T:-a${VWE_T2:-b}c}d", "abcd"),
])
def test_env_defaults_follow_the_shell(tmp_path, monkeypatch, value, text, expected):
    monkeypatch.delenv("VWE_T", raising=False)
    monkeypatch.delenv("VWE_T2", raising=False)
    monkeypatch.delenv("VWE_UNSET_Y", raising=False)
    if value is not None:
        monkeypatch.setenv("VWE_T", value)
    cfg = load_config(write(tmp_path, f"data:\n  root: {text}\n"))
    assert cfg.data.root == expected.replace("{HOME}", os.environ["HOME"])


@pytest.mark.parametrize("text,match", [
    ("${VWE_T", r"unterminated '\$\{VWE_T'"),
    ("a/${}", r"'\$\{' at character 3 of 'a/\$\{\}' must be followed by a variable name"),
    ("${1X}", "must be followed by a variable name"),
    ("${VWE_T:-${HOME}", "unterminated"),
    ("${VWE_T:?oops}", r"unsupported '\$\{VWE_T:\?'"),
    ("${VWE_T" + ":-${VWE_T" * 12 + "}" * 13, "nested deeper than 8 levels"),
])
def test_malformed_env_references_name_file_and_key(tmp_path, monkeypatch, text, match):
    monkeypatch.delenv("VWE_T", raising=False)
    p = write(tmp_path, f"output:\n  run_dir: '{text}'\n")
    with pytest.raises(ConfigError, match=match) as e:
        load_config(p)
    assert f"{p}: 'output.run_dir'" in str(e.value)


def test_empty_env_value_for_a_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("VWE_SHARDS", "")
    p = write(tmp_path, "data:\n  root: ${VWE_SHARDS}\n")
    with pytest.raises(ConfigError, match=r"'data.root' is empty") as e:
        load_config(p)
    assert str(p) in str(e.value)
    proc = run_vwe("config", "show", "--config", str(write(tmp_path, "data:\n  root: ${VWE_SHARDS:-/my/shards}\n")),
                   env={"VWE_SHARDS": ""})
    assert "root: /my/shards" in proc.stdout


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_config_file_is_refused(tmp_path, text):
    p = write(tmp_path, text)
    proc = run_vwe("train", "--config", str(p), check=False) if text == "" else None
    with pytest.raises(ConfigError, match="the file is empty") as e:
        load_config(p)
    assert str(p) in str(e.value)
    assert load_config(write(tmp_path, "{}")) == Config()  # all defaults, said explicitly
    if proc is not None:
        assert proc.returncode == 2 and f"{p}: the file is empty" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("text,key,lines", [
    ("train:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n", "lr", "lines 2 and 4"),
    ("train:\n  lr: 0.1\nmodel: {}\ntrain:\n  epochs: 2\n", "train", "lines 1 and 4"),
    ("data: {root: a, root: b}\n", "root", "lines 1 and 1"),
])
def test_key_given_twice_is_refused(tmp_path, text, key, lines):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == f"{p}: key '{key}' is given twice in one mapping ({lines}); keep one"


def test_deeply_nested_config_is_refused_without_traceback(tmp_path):
    p = write(tmp_path, "model:\n  pool_levels: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match=r"nested deeper than 32 levels \(line 2\)") as e:
        load_config(p)
    assert str(p) in str(e.value)
    proc = run_vwe("train", "--config", str(p), check=False)
    assert proc.returncode == 2 and "nested deeper than 32 levels" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(ConfigError, match=r"command line: cannot parse value of 'model.pool_levels': nested deeper"):
        load_config(None, ["model.pool_levels=" + "[" * 5000 + "]" * 5000])


def test_config_path_component_too_long(tmp_path):
    p = tmp_path / ("x" * 300 + ".yaml")
    with pytest.raises(ConfigError, match=r"is 305 bytes long, more than the file system allows") as e:
        load_config(p)
    assert str(p) in str(e.value)
    proc = run_vwe("infer", "--config", str(p), check=False)
    assert proc.returncode == 2 and "305 bytes long" in proc.stderr and "Traceback" not in proc.stderr
