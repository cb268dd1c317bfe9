"""launch/*.yaml are read by Accelerate's own config loader (unknown keys fail there)."""
from __future__ import annotations

import json

import pytest
from accelerate.commands.config.config_args import load_config_from_file

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
    assert isinstance(settings["train_micro_batch_size_per_gpu"], int)
