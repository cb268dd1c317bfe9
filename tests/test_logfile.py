"""Logs that read well when redirected: <run_dir>/train.log with timestamps, plain progress lines instead
of a redrawn bar, no third-party start-up noise; the tee itself on progress-bar redraws."""
from __future__ import annotations

import re
import sys

from helpers import ok, run_train

from vwe.runtime.logfile import run_log

STAMP = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "


def test_train_log_in_run_dir_and_plain_progress(synthetic_shards, tmp_path):
    run = tmp_path / "run"
    proc = ok(run_train(1, synthetic_shards, run, "train.max_steps=3", "train.checkpoint_every=0"))
    assert "Setting accelerator to CPU" not in proc.stderr
    assert "\r" not in proc.stderr
    assert re.search(r"\d\d:\d\d:\d\d train step 3/3 epoch 0 loss \d", proc.stderr), proc.stderr
    log = (run / "train.log").read_text().splitlines()
    assert log and all(re.match(STAMP, line) for line in log)
    assert any("run summary:" in line for line in log) and any("train step 2/3" in line for line in log)


def test_failed_command_leaves_no_run_dir(tmp_path):
    from conftest import REPO, run_vwe
    proc = run_vwe("train", "--config", str(REPO / "configs" / "demo.yaml"), f"data.root={tmp_path / 'none'}",
                   f"output.run_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2 and "data folder not found" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_tee_keeps_the_final_state_of_redrawn_lines(tmp_path, capsys):
    run = tmp_path / "run"
    with run_log(run, "infer"):
        print("before the folder exists")
        run.mkdir()
        sys.stderr.write("\r 10%|#   |\r 50%|##  |\r100%|####|\n")
        print("done")
    lines = (run / "infer.log").read_text().splitlines()
    assert [line[20:] for line in lines] == ["before the folder exists", "100%|####|", "done"]
    assert "\r 10%" in capsys.readouterr().err  # the terminal still sees the redraws
