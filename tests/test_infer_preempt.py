"""Inference under the preemption contract: SIGUSR1 (or SIGTERM) stops it after the current batch with
exit code 75, keeping the CAMs written; the rerun writes only the rest (what a requeued infer.sbatch
job does)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from vwe.formats.cams import read_cam
from vwe.formats.checkpoint import FINAL_WEIGHTS_NAME, export_weights
from vwe.formats.config import load_config
from vwe.nets.cam import build_model

DEMO = REPO / "configs" / "demo.yaml"


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_infer_signal_exits_75_and_rerun_completes(synthetic_shards, tmp_path, sig):
    run = tmp_path / "run"
    # slow enough to be caught midway: the 48 train images, 3 scales, one image per batch, a worker
    overrides = [f"data.root={synthetic_shards}", f"output.run_dir={run}", "model.num_words=16",
                 "data.infer_split=train", "infer.scales=[1.0, 1.5, 2.0]", "infer.batch_size=1",
                 "infer.num_workers=1"]
    cfg = load_config(DEMO, overrides)
    export_weights(build_model(cfg.model).state_dict(), cfg.to_dict(), run / FINAL_WEIGHTS_NAME)
    cmd = [sys.executable, "-m", "vwe", "infer", "--config", str(DEMO), *overrides]
    proc = subprocess.Popen(cmd, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    cams = run / "cams"
    end = time.monotonic() + 120
    while not (cams.is_dir() and any(cams.glob("*.npz"))):
        assert proc.poll() is None and time.monotonic() < end, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, out + err
    written = sorted(cams.glob("*.npz"))
    assert 1 <= len(written) < 48, len(written)
    assert f"preempted (signal {int(sig)}) after writing {len(written)} CAM(s); exiting with code 75" in out
    assert not list(cams.glob("manifest-rank*.json"))  # written only by a complete run
    for p in written:
        read_cam(p)  # complete files

    rerun = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{48 - len(written)} written, {len(written)} already done" in rerun.stdout
    manifest = json.loads((cams / "manifest-rank000.json").read_text())
    assert manifest["written"] + manifest["already_done"] == 48
