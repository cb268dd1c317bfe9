"""The training loop with real processes: multi-process CPU runs, exact resume after SIGKILL,
preemption by SIGTERM, the divergence guard, bf16 on CPU."""
from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import time

import pytest
import torch

from conftest import REPO, kill_tree, launch_cmd, run_vwe
from helpers import ENV, assert_bit_identical, final_weights, ok, run_train, summary, train_args, wait_for


@pytest.mark.multiprocess
def test_two_process_run_learns_and_ranks_agree(synthetic_shards, tmp_path):
    run = tmp_path / "run"
    proc = ok(run_train(2, synthetic_shards, run, "train.max_steps=16", "train.checkpoint_every=8"))
    s = summary(run)
    assert s["processes"] == 2 and s["distributed_type"] == "MULTI_CPU", s
    assert s["batches_per_rank"] == [16, 16]
    assert s["replicas_identical"] is True
    assert s["steps"] == 16
    assert s["data_cpu_ms_per_image"] > 0 and s["mixed_precision_setting"] == "auto"
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [l["loss/loss"] for l in lines]
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses
    assert {"loss/cls", "loss/hist", "loss/word", "lr/backbone", "lr/heads", "images_per_s", "data_wait_fraction",
            "peak_memory_mb"} <= set(lines[0])
    assert lines[-1]["lr/backbone"] < lines[0]["lr/backbone"]  # poly decay
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000008", "step-000016"]
    assert (run / "config.yaml").is_file() and "run summary" in proc.stdout


@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=pytest.mark.multiprocess)])
def test_exact_resume_after_sigkill(synthetic_shards, tmp_path, processes):
    extra = ("train.max_steps=6", "train.checkpoint_every=2", "train.deterministic=true")
    reference = tmp_path / "reference"
    ok(run_train(processes, synthetic_shards, reference, *extra))

    run = tmp_path / "killed"
    cmd = launch_cmd(processes, *train_args(synthetic_shards, run, *extra))
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    wait_for((run / "checkpoints", "step-000002"), proc)
    kill_tree(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(int(p.name[5:]) for p in (run / "checkpoints").glob("step-*"))
    assert killed_at < 6 and not (run / "final").exists()

    restarted = ok(run_train(processes, synthetic_shards, run, *extra))
    assert f"resumed from {run / 'checkpoints'}" in restarted.stdout + restarted.stderr
    assert summary(run)["steps"] == 6
    assert_bit_identical(final_weights(reference), final_weights(run))


def test_sigterm_checkpoints_exits_75_and_restart_completes(synthetic_shards, tmp_path):
    run = tmp_path / "run"
    extra = ("train.max_steps=40", "train.checkpoint_every=0")
    cmd = launch_cmd(1, *train_args(synthetic_shards, run, *extra))
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = run / "metrics.jsonl"
    end = time.time() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < end, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, out + err
    saved = sorted((run / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and 2 <= int(saved[0].name[5:]) < 40
    assert "preempted" in out + err
    ok(run_train(1, synthetic_shards, run, *extra))
    assert summary(run)["steps"] == 40 and summary(run)["steps_this_run"] == 40 - int(saved[0].name[5:])


def test_divergence_stops_and_keeps_last_good_checkpoint(synthetic_shards, tmp_path):
    run = tmp_path / "run"
    ok(run_train(1, synthetic_shards, run, "train.max_steps=4", "train.checkpoint_every=2"))
    (run / "final").rename(tmp_path / "first_final")
    # resume from step 4 with an absurd learning rate: the update at step 5 overflows, step 6 is NaN
    proc = run_train(1, synthetic_shards, run, "train.max_steps=12", "train.checkpoint_every=2", "train.lr=1e30",
                     "train.resume_changed=allow")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "non-finite loss at step" in proc.stderr and "Traceback" not in proc.stderr
    step = int(proc.stderr.split("non-finite loss at step ")[1].split()[0])
    assert step in (5, 6)
    assert f"last good checkpoint is {run / 'checkpoints' / 'step-000004'}" in proc.stderr
    names = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert names[-1] == "step-000004"
    assert not (run / "final").exists()


def test_bf16_on_cpu(synthetic_shards, tmp_path):
    run = tmp_path / "run"
    ok(run_train(1, synthetic_shards, run, "train.max_steps=3", "train.mixed_precision=bf16"))
    s = summary(run)
    assert s["mixed_precision"] == "bf16" and s["steps"] == 3
    weights = final_weights(run)
    assert all(t.dtype in (torch.float32, torch.int64, torch.bool) for t in weights.values())
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


def test_fp16_on_cpu_is_refused_clearly(synthetic_shards, tmp_path):
    proc = run_vwe(*train_args(synthetic_shards, tmp_path / "run", "train.mixed_precision=fp16"), check=False)
    assert proc.returncode == 2 and "fp16 needs a GPU" in proc.stderr and "Traceback" not in proc.stderr


def test_checkpoint_of_another_model_shape_is_refused(synthetic_shards, tmp_path):
    run = tmp_path / "run"
    ok(run_train(1, synthetic_shards, run, "train.max_steps=2", "train.checkpoint_every=2"))
    proc = run_train(1, synthetic_shards, run, "train.max_steps=4", "model.num_words=8")
    assert proc.returncode == 2
    assert "another model shape" in proc.stderr and "model.num_words: checkpoint 16, config 8" in proc.stderr


@pytest.mark.multiprocess
def test_corrupt_samples_skipped_counted_over_ranks(synthetic_shards, tmp_path):
    from data_helpers import samples_of, write_split
    shards = tmp_path / "shards"
    samples = samples_of(synthetic_shards, "train")
    for s in samples[::10]:  # one broken JPEG in every shard of 10
        s["parts"]["jpg"] = b"\xff\xd8broken"
    write_split(shards, "train", samples, n_shards=5)
    run = tmp_path / "run"
    proc = run_train(2, shards, run, "train.max_steps=13", "train.checkpoint_every=0", "data.on_corrupt=skip")
    ok(proc)
    s = summary(run)
    assert s["skipped_samples"] >= 1 and s["processes"] == 2
    assert "corrupt sample(s) skipped (data.on_corrupt=skip" in proc.stdout + proc.stderr
    proc = run_train(1, shards, tmp_path / "strict", "train.max_steps=13")
    assert proc.returncode != 0 and "cannot decode JPEG" in proc.stderr


def test_precision_auto_follows_the_device(synthetic_shards, tmp_path):
    from vwe.runtime.device import native_bf16
    run = tmp_path / "run"
    proc = ok(run_train(1, synthetic_shards, run, "train.max_steps=2", "train.mixed_precision=auto"))
    expected = "bf16" if native_bf16(torch.device("cpu")) else "no"
    s = summary(run)
    assert s["mixed_precision"] == expected and s["mixed_precision_setting"] == "auto"
    assert f"precision auto -> {'bf16' if expected == 'bf16' else 'fp32'} (this CPU" in proc.stderr


@pytest.mark.parametrize("deterministic", [False, True])
def test_algorithm_choice_holds_while_training_only(synthetic_shards, tmp_path, deterministic):
    """train.cudnn_benchmark (never under train.deterministic) and deterministic algorithms hold for the
    training steps, and the process-wide flags are given back afterwards: `vwe pipeline`'s per-image passes
    run in the same process."""
    from conftest import TINY
    from vwe.formats.config import load_config
    from vwe.training.recipe import CamRecipe
    from vwe.training.trainer import train

    seen = []

    class Watching(CamRecipe):
        def losses(self, net, out, batch, device):
            seen.append((torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled()))
            return super().losses(net, out, batch, device)

    cfg = load_config(REPO / "configs" / "demo.yaml",
                      [*TINY, f"data.root={synthetic_shards}", f"output.run_dir={tmp_path / 'run'}",
                       "data.num_workers=0", "train.max_steps=2", "train.checkpoint_every=0",
                       f"train.deterministic={str(deterministic).lower()}"])
    before = (torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled())
    assert cfg.train.cudnn_benchmark and before == (False, False)
    assert train(cfg, Watching()) == 0
    assert seen == [(not deterministic, deterministic)] * 2
    assert (torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled()) == before
    # given back too when the run cannot start (its lock file's place is taken by a folder)
    from vwe.runtime.errors import WriteError
    locked = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, run_dir=str(tmp_path / "locked")))
    (tmp_path / "locked" / ".lock").mkdir(parents=True)
    with pytest.raises(WriteError, match="it is a directory"):
        train(locked, Watching())
    assert (torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled()) == before
