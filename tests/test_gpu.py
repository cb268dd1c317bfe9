"""GPU smoke tests (marked `gpu`, skipped without CUDA; CI has none): training in bf16 and in fp16 with
loss scaling, channels_last, gradient checkpointing's memory effect, inference and evaluation, and two
processes over NCCL where two GPUs exist. Run them wherever a GPU is lent: `pytest -m gpu`."""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, TINY, launch_cmd, run_vwe

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DEMO = str(REPO / "configs" / "demo.yaml")
GPU_ENV = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}


def train(shards, run, *extra, processes: int = 1, launch: str = "launch/single_gpu.yaml"):
    cmd = launch_cmd(processes, "train", "--config", DEMO, *TINY, f"data.root={shards}", f"output.run_dir={run}",
                     "train.checkpoint_every=0", *extra, launch_config=launch)
    proc = subprocess.run(cmd, cwd=REPO, env=GPU_ENV, text=True, capture_output=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((run / "summary.json").read_text())


@pytest.mark.parametrize("precision", ["bf16", "fp16", "auto"])
def test_training_steps_on_one_gpu(synthetic_shards, tmp_path, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    run = tmp_path / "run"
    s = train(synthetic_shards, run, "train.max_steps=4", f"train.mixed_precision={precision}",
              "model.channels_last=true")
    expected = ("bf16" if torch.cuda.is_bf16_supported() else "no") if precision == "auto" else precision
    assert s["mixed_precision"] == expected and s["steps"] == 4
    weights = load_file(str(run / "final" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


def test_gradient_checkpointing_saves_gpu_memory(tmp_path):
    out = tmp_path / "bench.json"
    run_vwe("bench", "train", "--config", DEMO, "model.backbone=resnet50", "model.pretrained=none",
            "data.crop_size=256", "train.batch_size=8", "--steps", "2", "--compare", "checkpointing",
            "--json", str(out), env=GPU_ENV)
    off, on = json.loads(out.read_text())["variants"]
    assert off["mem_kind"] == "cuda max_memory_allocated"
    assert on["peak_mem_mib"] < off["peak_mem_mib"], (on["peak_mem_mib"], off["peak_mem_mib"])


def test_inference_and_evaluation_on_gpu(synthetic_shards, tmp_path):
    run = tmp_path / "run"
    train(synthetic_shards, run, "train.max_steps=2")
    common = ["--config", DEMO, *TINY, f"data.root={synthetic_shards}", f"output.run_dir={run}",
              "infer.mixed_precision=bf16" if torch.cuda.is_bf16_supported() else "infer.mixed_precision=no"]
    run_vwe("infer", *common, env=GPU_ENV)
    run_vwe("evaluate", *common, env=GPU_ENV)
    report = json.loads((run / "eval" / "report.json").read_text())
    assert 0.0 <= report["miou"] <= 1.0


def test_inference_without_cudnn_gives_the_same_cams(synthetic_shards, tmp_path):
    """infer.cudnn=false (PyTorch's own convolutions) computes the CAMs of the cuDNN path to float
    tolerance (cuDNN's fp32 convolutions use TF32 by default), and the manifest says which ran."""
    from vwe.formats.cams import read_cam
    run = tmp_path / "run"
    train(synthetic_shards, run, "train.max_steps=2")
    maps = {}
    for cudnn in ("true", "false"):
        out = tmp_path / f"cams-{cudnn}"
        run_vwe("infer", "--config", DEMO, *TINY, f"data.root={synthetic_shards}", f"output.run_dir={run}",
                "infer.mixed_precision=no", "infer.dtype=float32", f"infer.out_dir={out}", f"infer.cudnn={cudnn}",
                env=GPU_ENV)
        assert json.loads((out / "manifest-rank000.json").read_text())["cudnn"] == (cudnn == "true")
        maps[cudnn] = {p.stem: read_cam(p).high_res for p in out.glob("*.npz")}
    assert maps["true"].keys() == maps["false"].keys() and maps["true"]
    for key, high in maps["true"].items():
        scale = max(float(abs(high).max()), 1e-6)
        assert float(abs(high - maps["false"][key]).max()) / scale < 1e-2, key


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_processes_over_nccl(synthetic_shards, tmp_path):
    s = train(synthetic_shards, tmp_path / "run", "train.max_steps=4", processes=2, launch="launch/multi_gpu.yaml")
    assert s["processes"] == 2 and s["distributed_type"] == "MULTI_GPU" and s["replicas_identical"]


def test_step_launches_counts_ops_and_times_kernels_on_gpu():
    """The pace figures of `vwe bench train/seg`: the ops a step dispatches, and the seconds its kernels ran,
    which cannot exceed the step's wall time (one stream)."""
    import time
    from vwe.bench.launches import step_launches
    device = torch.device("cuda")
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3)).to(device)
    x = torch.randn(4, 3, 64, 64, device=device)

    def step():
        net(x).square().mean().backward()

    step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    f = step_launches(step, device)
    assert f["ops_per_step"] >= 8 and f["kernels_per_step"] >= 4 and 0 < f["kernel_s_per_step"] < 5 * wall


def test_sizes_comparison_runs_without_cudnn_too(tmp_path):
    """`vwe bench infer --compare sizes` on a GPU: the three passes with cuDNN, and again without it."""
    out = tmp_path / "sizes.json"
    run_vwe("bench", "infer", "--config", DEMO, "model.backbone=resnet18", "model.pretrained=none",
            "infer.scales=[0.25, 0.125]", "--compare", "sizes", "--steps", "2", "--json", str(out), env=GPU_ENV)
    f = json.loads(out.read_text())
    for figures in (f, f["without_cudnn"]):
        assert figures["repeated_size_s_per_image"] > 0 and figures["new_sizes_again_s_per_image"] > 0


def test_deterministic_deeplab_runs_on_gpu(synthetic_shards, tmp_path):
    """train.deterministic on a GPU: DeepLab's multi-scale inputs need bilinear upsampling's backward, which
    has no deterministic CUDA kernel; the run goes on with PyTorch's warning instead of stopping."""
    from data_helpers import label_folder
    from vwe.data.targets import prepare_targets
    labels = tmp_path / "labels"
    label_folder(synthetic_shards, "train", tmp_path / "png")
    prepare_targets(labels, "train", "train_gt", tmp_path / "png", shard_size=10, source_root=synthetic_shards)
    run = tmp_path / "run"
    proc = run_vwe("segment", "--config", DEMO, *TINY, f"data.root={synthetic_shards}", f"seg.data_root={labels}",
                   "seg.train_split=train_gt", "seg.backbone=resnet18", "seg.pretrained=none", "seg.crop_size=64",
                   "seg.batch_size=4", "seg.grad_accum=1", "seg.max_steps=2", "seg.crf=false",
                   "train.deterministic=true", f"output.run_dir={run}", env=GPU_ENV)
    assert json.loads((run / "seg" / "summary.json").read_text())["steps"] == 2
    assert "does not have a deterministic implementation" in proc.stderr
