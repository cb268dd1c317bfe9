"""DeepSpeed ZeRO through Accelerate's plugin: a real 2-process bf16 run on CPU with ZeRO really active."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import REPO, TINY, launch_cmd

pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")


@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", [1, 2])
def test_zero_two_processes_bf16(synthetic_shards, tmp_path, stage):
    # the paper's frozen BatchNorm (statistics frozen, gamma/beta trained) under DeepSpeed's bf16 weights
    run = tmp_path / "run"
    cmd = launch_cmd(2, "train", "--config", str(REPO / "configs" / "demo.yaml"), *TINY,
                     f"data.root={synthetic_shards}", f"output.run_dir={run}", "train.max_steps=4",
                     "train.checkpoint_every=2", "train.mixed_precision=bf16", "model.norm=frozen",
                     "model.channels_last=true",
                     launch_config=f"launch/deepspeed_zero{stage}.yaml")
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, text=True, capture_output=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    s = json.loads((run / "summary.json").read_text())
    assert s["distributed_type"] == "DEEPSPEED", s
    assert s["deepspeed"] == {"zero_stage": stage, "world_size": 2, "param_dtype": "torch.bfloat16"}
    assert s["processes"] == 2 and s["replicas_identical"] and s["batches_per_rank"] == [4, 4]
    assert (run / "checkpoints" / "step-000004").is_dir() and (run / "final" / "model.safetensors").is_file()
    # the model is built contiguous under DeepSpeed, but the run's config is recorded as given
    from vwe.formats.checkpoint import load_weights
    assert load_weights(run / "final" / "model.safetensors")[1]["model"]["channels_last"] is True
    assert "channels_last: true" in (run / "config.yaml").read_text()
