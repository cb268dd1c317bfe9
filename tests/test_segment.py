"""The segmentation stage with real processes on tiny synthetic data: `vwe segment` keeps every promise of
the Trainer (exact resume after SIGKILL, SIGTERM -> checkpoint -> exit 75, drift refused, two processes
agreeing), refuses segmentation weights, and `vwe segment-eval` writes the PASCAL layout, scores with
the CAM report format, skips what is current and handles a split without masks."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, kill_tree, launch_cmd, run_vwe
from data_helpers import label_folder
from helpers import ENV, assert_bit_identical, final_weights, ok, wait_for
from vwe.data.index import load_index, write_index
from vwe.data.prepare import write_shard
from vwe.data.reading import RawSample, read_shard
from vwe.data.targets import prepare_targets

DEMO = str(REPO / "configs" / "demo.yaml")
# DeepLab on ResNet-18 from scratch at 64 px: MSC at one extra scale, the lr stepping every 3 steps
SEG = ["seg.train_split=train_gt", "seg.backbone=resnet18", "seg.pretrained=none", "seg.norm=batch",
       "seg.crop_size=64", "seg.batch_size=4", "seg.grad_accum=1", "seg.msc_scales=[0.5]", "seg.lr=0.001",
       "seg.lr_every=3", "seg.test_scales=[1.0]", "seg.crf=false", "data.num_workers=1", "infer.num_workers=1",
       "output.tensorboard=false", "train.deterministic=true", "train.log_every=1"]


@pytest.fixture(scope="module")
def seg_data(synthetic_shards, tmp_path_factory) -> Path:
    """A segmentation split 'train_gt' (ground-truth labels: the upper-bound run) in its own data root."""
    root = tmp_path_factory.mktemp("seg") / "labels"
    labels = root.parent / "png"
    label_folder(synthetic_shards, "train", labels)
    prepare_targets(root, "train", "train_gt", labels, shard_size=10, source_root=synthetic_shards)
    return root


def seg_args(command: str, shards: Path, seg_root: Path, run: Path, *extra: str) -> list[str]:
    return [command, "--config", DEMO, *SEG, f"data.root={shards}", f"seg.data_root={seg_root}",
            f"output.run_dir={run}", *extra]


def run_seg(processes: int, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(launch_cmd(processes, *args), cwd=REPO, env={**ENV, **(env or {})}, text=True,
                          capture_output=True, timeout=600)


def test_segment_resumes_exactly_after_sigkill_and_refuses_drift(synthetic_shards, seg_data, tmp_path):
    extra = ("seg.max_steps=6", "seg.checkpoint_every=2")
    reference = tmp_path / "reference"
    ok(run_seg(1, *seg_args("segment", synthetic_shards, seg_data, reference, *extra)))
    summary = json.loads((reference / "seg" / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["weights"] == str(reference / "seg" / "final" / "model.safetensors")
    metrics = [json.loads(line) for line in (reference / "seg" / "metrics.jsonl").read_text().splitlines()]
    lrs = [m["lr/backbone"] for m in metrics if "lr/backbone" in m]
    # logged after step s: the lr of update s+1, which the recipe computes at 3 * floor(s / 3)
    assert lrs[0] == lrs[1] == 0.001 and lrs[1] > lrs[2] == lrs[3] == lrs[4] > lrs[5]

    run = tmp_path / "killed"
    proc = subprocess.Popen(launch_cmd(1, *seg_args("segment", synthetic_shards, seg_data, run, *extra)), cwd=REPO,
                            env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    wait_for((run / "seg" / "checkpoints", "step-000002"), proc)
    kill_tree(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert not (run / "seg" / "final").exists()
    restarted = ok(run_seg(1, *seg_args("segment", synthetic_shards, seg_data, run, *extra)))
    assert f"resumed from {run / 'seg' / 'checkpoints'}" in restarted.stdout + restarted.stderr
    assert_bit_identical(final_weights(reference / "seg"), final_weights(run / "seg"))

    drift = run_vwe(*seg_args("segment", synthetic_shards, seg_data, run, *extra, "seg.lr=0.002"), check=False)
    assert drift.returncode == 2 and "train.lr: checkpoint 0.001, now 0.002" in drift.stderr, drift.stderr
    neutral = run_vwe(*seg_args("segment", synthetic_shards, seg_data, run, *extra, "seg.crf=true"))
    assert "at step 6" in neutral.stdout + neutral.stderr  # prediction settings do not touch training


def test_segment_sigterm_checkpoints_and_exits_75(synthetic_shards, seg_data, tmp_path):
    run = tmp_path / "run"
    extra = ("seg.max_steps=60", "seg.checkpoint_every=0")
    proc = subprocess.Popen(launch_cmd(1, *seg_args("segment", synthetic_shards, seg_data, run, *extra)), cwd=REPO,
                            env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for((run / "seg", "metrics.jsonl"), proc)
    while (run / "seg" / "metrics.jsonl").read_text().count("\n") < 2:
        assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, out + err
    saved = sorted((run / "seg" / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and 2 <= int(saved[0].name[5:]) < 60


@pytest.mark.multiprocess
@pytest.mark.parametrize("norm", ["batch", "frozen_all"])
def test_two_process_segment_replicas_agree(synthetic_shards, seg_data, tmp_path, norm):
    """Two ranks end with the same weights; DDP broadcasts the buffers before each forward only where they
    change (a trainable BatchNorm's statistics, not frozen ones)."""
    run = tmp_path / "run"
    ok(run_seg(2, *seg_args("segment", synthetic_shards, seg_data, run, "seg.max_steps=3", f"seg.norm={norm}")))
    summary = json.loads((run / "seg" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["replicas_identical"] and summary["batches_per_rank"] == [3, 3]
    assert summary["ddp_broadcast_buffers"] == (norm == "batch")


def test_fused_micro_batches_train_what_accumulation_trains(synthetic_shards, seg_data, tmp_path):
    """seg.fuse_micro_batches runs a step's micro-batches as one batch, each scored on its own: the same
    samples and, with a per-sample norm, the same weights to float tolerance as accumulating them; a norm
    over the batch is refused, as is a batch the micro-batches do not divide."""
    # one step in fp32: from scratch on 64 px crops the loss is chaotic after it, and rounding grows
    per_sample = ["seg.norm=group", "seg.grad_accum=2", "seg.max_steps=1", "seg.mixed_precision=no"]
    runs = {}
    for fused in (False, True):
        runs[fused] = tmp_path / f"fused-{fused}"
        ok(run_seg(1, *seg_args("segment", synthetic_shards, seg_data, runs[fused], *per_sample,
                                f"seg.fuse_micro_batches={str(fused).lower()}")))
    losses = {f: [json.loads(line)["loss/loss"] for line in (r / "seg" / "metrics.jsonl").read_text().splitlines()]
              for f, r in runs.items()}
    assert len(losses[True]) == len(losses[False]) == 1
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
    accumulated, fused = final_weights(runs[False] / "seg"), final_weights(runs[True] / "seg")
    assert accumulated.keys() == fused.keys()
    for k in fused:
        torch.testing.assert_close(fused[k], accumulated[k], rtol=1e-4, atol=1e-6, msg=k)
    proc = run_seg(1, *seg_args("segment", synthetic_shards, seg_data, tmp_path / "bn", "seg.norm=batch",
                                "seg.grad_accum=2", "seg.fuse_micro_batches=true"))
    assert proc.returncode == 2 and "seg.fuse_micro_batches: seg.norm=batch" in proc.stderr
    proc = run_seg(1, *seg_args("segment", synthetic_shards, seg_data, tmp_path / "odd", *per_sample,
                                "seg.batch_size=6", "seg.grad_accum=4", "seg.fuse_micro_batches=true"))
    assert proc.returncode == 2 and "seg.batch_size (6) must be divisible" in proc.stderr


def test_compiled_training_trains_what_eager_trains(synthetic_shards, seg_data, tmp_path):
    """seg.compile: DeepLab's training steps through torch.compile (inductor: its cache fills) give eager's
    loss and weights to float tolerance in fp32; checkpoints and exported weights carry the eager module's
    names, so the run resumes with compiling switched off."""
    one_step = ["seg.max_steps=1", "seg.mixed_precision=no"]
    runs = {c: tmp_path / f"compile-{c}" for c in ("false", "true")}
    inductor = tmp_path / "inductor"
    for c, run in runs.items():
        ok(run_seg(1, *seg_args("segment", synthetic_shards, seg_data, run, *one_step, f"seg.compile={c}"),
                   env={"TORCHINDUCTOR_CACHE_DIR": str(inductor)}))
        assert any(p.is_file() for p in inductor.rglob("*")) == (c == "true")
    losses = {c: json.loads((r / "seg" / "metrics.jsonl").read_text().splitlines()[0])["loss/loss"]
              for c, r in runs.items()}
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-5)
    eager, compiled = final_weights(runs["false"] / "seg"), final_weights(runs["true"] / "seg")
    assert compiled.keys() == eager.keys()
    # The step's update, against a run at lr 0 from the same initial weights (whose BatchNorm statistics move
    # as in the other two): the compiled backward sums in another order, so each tensor's update agrees to
    # about 1% of its largest entry (1.1% at most with oneDNN and inductor limited to AVX2), where a missing
    # or wrong update is off by all of it. The statistics, which no update moves, agree to 1e-4 of their scale.
    ok(run_seg(1, *seg_args("segment", synthetic_shards, seg_data, tmp_path / "lr0", *one_step, "seg.lr=0")))
    start = final_weights(tmp_path / "lr0" / "seg")
    updated = 0
    for k in eager:
        if not eager[k].is_floating_point():
            assert torch.equal(compiled[k], eager[k]), k
            continue
        moved = eager[k].double() - start[k].double()
        if float(moved.abs().max()) > 0:
            updated += 1
            torch.testing.assert_close(compiled[k].double() - start[k].double(), moved, rtol=0,
                                       atol=0.05 * float(moved.abs().max()), msg=k)
        else:
            torch.testing.assert_close(compiled[k], eager[k], rtol=1e-4,
                                       atol=max(1e-6, 1e-4 * float(eager[k].abs().max())), msg=k)
    assert updated == 68  # every ResNet-18 DeepLab parameter: 20 convolutions, 20 BatchNorms x 2, 4 ASPP x 2
    ok(run_seg(1, *seg_args("segment", synthetic_shards, seg_data, runs["true"], "seg.max_steps=2",
                            "seg.mixed_precision=no", "seg.compile=false", "train.resume_changed=allow")))
    resumed = json.loads((runs["true"] / "seg" / "summary.json").read_text())
    assert resumed["steps"] == 2 and resumed["steps_this_run"] == 1


def test_segment_eval_layout_report_and_rerun(synthetic_shards, seg_data, tmp_path):
    run = tmp_path / "run"
    ok(run_seg(1, *seg_args("segment", synthetic_shards, seg_data, run, "seg.max_steps=2")))
    first = run_vwe(*seg_args("segment-eval", synthetic_shards, seg_data, run))
    predictions = run / "seg" / "results" / "VOC2012" / "Segmentation" / "comp6_val_cls"
    val = load_index(synthetic_shards, "val").keys
    assert sorted(p.stem for p in predictions.iterdir()) == sorted(val)  # nothing else in the server's folder
    with Image.open(predictions / f"{val[0]}.png") as im:
        assert im.mode == "P" and np.asarray(im).max() <= 20
    report = json.loads((run / "seg" / "eval" / "val" / "report.json").read_text())
    conf = np.array(report["confusion"])
    assert report["scored"] == len(val) == 12 and conf.shape == (21, 21) and conf.sum() > 0
    assert report["miou"] == pytest.approx(np.nanmean(
        [conf[i, i] / (conf[i].sum() + conf[:, i].sum() - conf[i, i]) for i in range(21) if conf[i].sum()]))
    assert "| bkg | aero |" in first.stdout and "12 written" in first.stdout
    assert "0 written, 12 already done" in run_vwe(*seg_args("segment-eval", synthetic_shards, seg_data, run)).stdout
    crf = run_vwe(*seg_args("segment-eval", synthetic_shards, seg_data, run, "seg.crf=true"))
    assert "12 written, 0 already done, 12 replaced" in crf.stdout  # another setting, another source


def test_segment_eval_on_a_split_without_masks_writes_predictions_only(synthetic_shards, seg_data, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(synthetic_shards, shards)
    val = load_index(shards, "val")
    samples = [RawSample("", r.key, bytes(r.jpg), r.labels) for s in val.shards for r in read_shard(val, s)]
    info, _ = write_shard(shards / "test-000000.tar", samples)
    write_index(shards, "test", [info], has_masks=False)
    run = tmp_path / "run"
    ok(run_seg(1, *seg_args("segment", shards, seg_data, run, "seg.max_steps=1")))
    proc = run_vwe(*seg_args("segment-eval", shards, seg_data, run, "seg.eval_split=test"))
    assert "predictions only" in proc.stdout
    assert len(list((run / "seg" / "results" / "VOC2012" / "Segmentation" / "comp6_test_cls").glob("*.png"))) == 12
    assert json.loads((run / "seg" / "eval" / "test" / "report.json").read_text())["miou"] is None


def test_segmentation_weights_are_refused(synthetic_shards, seg_data, tmp_path):
    import torch
    import torchvision
    leak = tmp_path / "weights.pth"
    model = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None,
                                                               num_classes=21, aux_loss=True)
    torch.save(model.state_dict(), leak)
    proc = run_vwe(*seg_args("segment", synthetic_shards, seg_data, tmp_path / "run", "seg.backbone=resnet50",
                             f"seg.pretrained={leak}"), check=False)
    assert proc.returncode == 2 and "leak" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "run" / "seg").exists()


def test_segment_eval_without_weights_names_the_key_and_the_command(synthetic_shards, seg_data, tmp_path):
    proc = run_vwe(*seg_args("segment-eval", synthetic_shards, seg_data, tmp_path / "run"), check=False)
    weights = tmp_path / "run" / "seg" / "final" / "model.safetensors"
    assert proc.returncode == 2 and f"seg.weights: weights {weights} not found: train first (`vwe segment`)" \
        in proc.stderr, proc.stderr
    folder = tmp_path / "empty"
    folder.mkdir()
    proc = run_vwe(*seg_args("segment-eval", synthetic_shards, seg_data, tmp_path / "run", f"seg.weights={folder}"),
                   check=False)
    assert proc.returncode == 2 and f"weights {folder / 'model.safetensors'} not found" in proc.stderr, proc.stderr
