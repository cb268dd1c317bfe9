"""launch/*.yaml are read by Accelerate's own config loader (unknown keys fail there)."""
from __future__ import annotations

import json

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from vwe.runtime.errors import ConfigError

CONFIGS = ["cpu", "single_gpu", "multi_gpu", "multi_node", "deepspeed_zero1", "deepspeed_zero2"]


@pytest.mark.parametrize("name", CONFIGS)
def test_accelerate_reads_config(repo, name):
    cfg = load_config_from_file(str(repo / "launch" / f"{name}.yaml"))
    expected = {"cpu": "MULTI_GPU", "single_gpu": "NO", "multi_gpu": "MULTI_GPU", "multi_node": "MULTI_GPU",
                "deepspeed_zero1": "DEEPSPEED", "deepspeed_zero2": "DEEPSPEED"}[name]
    assert str(cfg.distributed_type).split(".")[-1] == expected
    assert cfg.use_cpu == (name == "cpu")
    if name == "multi_node":
        assert cfg.rdzv_backend == "c10d"


@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_config(repo, stage):
    cfg = load_config_from_file(str(repo / "launch" / f"deepspeed_zero{stage}.yaml"))
    ds = cfg.deepspeed_config
    assert ds["deepspeed_multinode_launcher"] == "standard"
    settings = json.loads((repo / ds["deepspeed_config_file"]).read_text())
    assert settings["zero_optimization"]["stage"] == stage
    assert settings["train_micro_batch_size_per_gpu"] == "auto"


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("world,accum", [(1, 1), (2, 1), (8, 1), (16, 1), (8, 2)])
def test_deepspeed_batch_fields_fit_any_process_count(repo, stage, world, accum):
    """The shipped JSON works at any process count: vwe fills the "auto" fields from train.batch_size."""
    from vwe.formats.config import load_config
    from vwe.data.loader import micro_batch_size
    from vwe.training.setup import deepspeed_batch_fields
    cfg = load_config(repo / "configs" / "voc.yaml", [f"train.grad_accum={accum}"])
    if 16 % (world * accum):
        pytest.skip("batch 16 does not divide")
    settings = json.loads((repo / "launch" / f"deepspeed_zero{stage}.json").read_text())
    fields = deepspeed_batch_fields(settings, micro_batch_size(cfg.train, world), accum, world)
    assert fields["train_batch_size"] == cfg.train.batch_size == 16
    assert fields["train_micro_batch_size_per_gpu"] == 16 // (world * accum)
    assert fields["gradient_accumulation_steps"] == accum


def test_deepspeed_batch_field_that_disagrees_is_named():

    from vwe.training.setup import deepspeed_batch_fields
    with pytest.raises(ConfigError, match=r"train_micro_batch_size_per_gpu=2 but the vwe config implies 1"):
        deepspeed_batch_fields({"train_micro_batch_size_per_gpu": 2}, 1, 1, 16)
