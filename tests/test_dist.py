"""The process group really ends at destroy_process_group: with two real CPU processes (gloo), no gloo
thread outlives it, even when torchvision (and with it torch._dynamo) and DeepSpeed are imported after
the group was formed, as `vwe evaluate`'s weight check and Accelerate's unwrap_model do. A group kept
alive past that point is torn down during interpreter shutdown, which aborted 2- and 3-process
`vwe evaluate` and `vwe pipeline` runs ("terminate called without an active exception")."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

SCRIPT = """
import os
from vwe.runtime.dist import sum_over_ranks, distributed_state
import numpy as np
state = distributed_state()
assert state.num_processes == 2
sum_over_ranks(np.ones(3))
import torchvision  # noqa: F401  (late, as the evaluation's weight check imports the model)
import importlib.util
if importlib.util.find_spec("deepspeed"):
    import deepspeed  # noqa: F401  (late, as Accelerate's unwrap_model imports it)
import torch.distributed as dist
dist.destroy_process_group()
names = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
print(f"rank {state.process_index} threads after destroy: {names}", flush=True)
"""


@pytest.mark.multiprocess
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_no_gloo_thread_outlives_destroy_process_group(tmp_path):
    script = tmp_path / "group.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / "cpu.yaml"),
           "--num_processes", "2", "--main_process_port", "0", str(script)]
    proc = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = dict(re.findall(r"rank (\d) threads after destroy: (\[[^\]]*\])", proc.stdout))  # lines may interleave
    assert set(found) == {"0", "1"}, proc.stdout
    for rank, names in found.items():
        assert "gloo" not in names, f"rank {rank}: {names}"
