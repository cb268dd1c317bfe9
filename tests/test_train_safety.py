"""Training that cannot silently go wrong: config drift, divergence on the last step, corrupt checkpoints,
two trainings on one run directory, batch-size changes, unwritable run directories, metrics on resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, kill_tree, launch_cmd
from helpers import ENV, assert_bit_identical, final_weights, ok, run_train, summary, train_args

SHORT = ("train.max_steps=4", "train.checkpoint_every=2", "train.deterministic=true")


def steps_in_metrics(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def finite_checkpoints(run: Path) -> list[str]:
    """Names of complete checkpoints, after asserting every tensor in each is finite."""
    names = []
    for ckpt in sorted((run / "checkpoints").glob("step-*")):
        for name, t in load_file(str(ckpt / "model.safetensors")).items():
            assert not t.is_floating_point() or torch.isfinite(t).all(), f"{ckpt}: {name} is not finite"
        names.append(ckpt.name)
    return names


@pytest.fixture(scope="module")
def finished(synthetic_shards, tmp_path_factory) -> Path:
    """A finished 4-step run (checkpoints at 2 and 4), copied by the tests that change it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    ok(run_train(1, synthetic_shards, run, *SHORT))
    return run


def copy_run(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    (dst / ".lock").unlink(missing_ok=True)
    return dst


def test_changed_setting_refused_then_allowed_and_recorded(synthetic_shards, finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    weights_before = (run / "final" / "model.safetensors").read_bytes()
    config_before = (run / "config.yaml").read_text()
    proc = run_train(1, synthetic_shards, run, *SHORT, "train.lr=0.5", "data.flip=false")
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    assert "train.lr: checkpoint 0.02, now 0.5" in err and "data.flip: checkpoint True, now False" in err
    assert "new output.run_dir" in err and "train.resume_changed=allow" in err and "Traceback" not in err
    assert (run / "config.yaml").read_text() == config_before  # nothing written before the refusal
    assert (run / "final" / "model.safetensors").read_bytes() == weights_before

    # settings that do not change the result are noted, and the finished run re-exports the same weights
    proc = ok(run_train(1, synthetic_shards, run, *SHORT, "train.log_every=3", "data.num_workers=0"))
    assert "note: train.log_every: checkpoint 1, now 3 (does not change the result)" in proc.stderr
    assert (run / "final" / "model.safetensors").read_bytes() == weights_before

    proc = ok(run_train(1, synthetic_shards, run, *SHORT, "train.lr=0.5", "train.resume_changed=allow"))
    assert "allowed by train.resume_changed=allow" in proc.stderr
    assert summary(run)["config_changes"] == [{"step": 4, "key": "train.lr", "checkpoint": 0.02, "now": 0.5}]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["lr"] == 0.5


def test_same_data_under_another_path_is_allowed(synthetic_shards, finished, tmp_path):
    import shutil
    run = copy_run(finished, tmp_path / "run")
    moved = shutil.copytree(synthetic_shards, tmp_path / "moved_shards")
    proc = run_train(1, moved, run, *SHORT)
    ok(proc)
    assert "note: data.root" in proc.stderr


def test_divergence_on_the_last_step_is_never_saved(synthetic_shards, tmp_path):
    run = tmp_path / "run"
    proc = run_train(1, synthetic_shards, run, "train.lr=1e6", "train.max_steps=3", "train.checkpoint_every=1")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr
    assert "Traceback" not in err
    assert ("holds NaN or Inf at step" in err and "tensor " in err) or "non-finite loss at step" in err, err
    assert not (run / "final").exists()
    names = finite_checkpoints(run)
    if names:
        assert f"last good checkpoint is {run / 'checkpoints' / names[-1]}" in err
    else:
        assert "No checkpoint had been saved yet" in err or "no checkpoint had been saved yet" in err


@pytest.mark.multiprocess
def test_two_processes_agree_on_divergence(synthetic_shards, tmp_path):
    run = tmp_path / "run"
    proc = run_train(2, synthetic_shards, run, "train.lr=1e30", "train.max_steps=6", "train.checkpoint_every=1",
                     timeout=600)
    assert proc.returncode != 0
    assert "holds NaN or Inf at step" in proc.stderr or "non-finite loss at step" in proc.stderr
    assert not (run / "final").exists()
    finite_checkpoints(run)


@pytest.mark.parametrize("damaged", ["model.safetensors", "random_states_0.pkl", "meta.json"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(synthetic_shards, finished, tmp_path, damaged):
    run = copy_run(finished, tmp_path / "run")
    reference = final_weights(run)
    shutil_final = run / "final"
    import shutil
    shutil.rmtree(shutil_final)
    newest = run / "checkpoints" / "step-000004"
    target = newest / damaged
    os.truncate(target, target.stat().st_size // 2)
    proc = ok(run_train(1, synthetic_shards, run, *SHORT))
    assert f"checkpoint {newest} failed verification" in proc.stderr and str(target) in proc.stderr
    assert (run / "checkpoints" / "corrupt-step-000004" / damaged).is_file()
    assert f"resumed from {run / 'checkpoints' / 'step-000002'}" in proc.stderr
    assert_bit_identical(reference, final_weights(run))  # steps 3-4 retrained exactly
    assert steps_in_metrics(run) == [1, 2, 3, 4]


def test_no_intact_checkpoint_left_is_an_error(synthetic_shards, finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    for ckpt in (run / "checkpoints").glob("step-*"):
        (ckpt / "model.safetensors").write_bytes(b"planted")
    proc = run_train(1, synthetic_shards, run, *SHORT)
    assert proc.returncode == 2 and "no intact checkpoint left" in proc.stderr
    assert "train.resume=none" in proc.stderr and "Traceback" not in proc.stderr


def test_a_file_not_written_by_vwe_fails_verification(synthetic_shards, finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    (run / "checkpoints" / "step-000004" / "custom_checkpoint_0.pkl").write_bytes(b"planted")
    proc = run_train(1, synthetic_shards, run, *SHORT, "train.resume=" + str(run / "checkpoints" / "step-000004"))
    assert proc.returncode == 2 and "custom_checkpoint_0.pkl was not part of the checkpoint" in proc.stderr


def test_second_training_on_one_run_directory_is_refused_and_a_dead_lock_taken_over(synthetic_shards, tmp_path):
    run = tmp_path / "run"
    cmd = launch_cmd(1, *train_args(synthetic_shards, run, "train.max_steps=400", "train.checkpoint_every=0"))
    first = subprocess.Popen(cmd, cwd=REPO, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)
    try:
        end = time.time() + 300
        while not (run / "metrics.jsonl").is_file():
            assert first.poll() is None and time.time() < end, first.communicate()
            time.sleep(0.2)
        second = run_train(1, synthetic_shards, run, "train.max_steps=400", "train.checkpoint_every=0")
        assert second.returncode == 2, second.stderr
        assert f"run directory {run.resolve()} is in use by vwe train pid {first.pid} on host" in second.stderr
        two = run_train(2, synthetic_shards, run, "train.max_steps=400", "train.checkpoint_every=0", timeout=300)
        assert two.returncode != 0 and f"in use by vwe train pid {first.pid}" in two.stderr
    finally:
        kill_tree(first.pid, signal.SIGKILL)
        first.communicate()
    proc = ok(run_train(1, synthetic_shards, run, "train.max_steps=2", "train.checkpoint_every=0",
                        "train.resume=none"))
    assert f"took over the lock of {run.resolve()} left by vwe train pid {first.pid}" in proc.stderr


def test_batch_size_change_continues_by_samples_when_allowed(synthetic_shards, tmp_path):
    run = tmp_path / "run"
    ok(run_train(1, synthetic_shards, run, "train.max_steps=3", "train.checkpoint_every=3"))
    refused = run_train(1, synthetic_shards, run, "train.max_steps=6", "train.batch_size=8")
    assert refused.returncode == 2 and "train.batch_size: checkpoint 4, now 8" in refused.stderr
    proc = ok(run_train(1, synthetic_shards, run, "train.max_steps=6", "train.batch_size=8",
                        "train.resume_changed=allow"))
    assert "outside" not in proc.stderr
    s = summary(run)
    assert s["steps"] == 6 and s["steps_this_run"] == 3
    # 3 steps of 4 = 12 samples into the epoch = micro-batch 1 at batch 8 (floor), then 3 more steps
    assert s["samples_seen"] == 12 + 3 * 8


@pytest.mark.parametrize("how", ["read-only", "full"])
def test_unwritable_run_directory_is_named(synthetic_shards, tmp_path, how):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    opts = "size=1m" + (",ro" if how == "read-only" else "")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        run = mnt / "run"
        proc = run_train(1, synthetic_shards, run, "train.max_steps=2", "train.checkpoint_every=1")
        assert proc.returncode == 2, proc.stderr[-3000:]
        cause = "read-only file system" if how == "read-only" else "no space left on the device"
        assert "cannot write" in proc.stderr and cause in proc.stderr and str(run) in proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        subprocess.run(["umount", "-l", str(mnt)])
