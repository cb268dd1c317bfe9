"""Inference under bad or awkward input: memory bounded by infer.batch_size however many distinct image
sizes, preemption after the current batch (SIGUSR1 or SIGTERM; also in the final flush), infer.weights given a checkpoint
folder or a wrong folder, weights holding NaN, and corrupt samples skipped with their ids recorded."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, TINY, run_vwe
from data_helpers import samples_of, write_split
from helpers import export_random_weights, popen_until
from vwe.formats.cams import read_cam
from vwe.formats.checkpoint import FINAL_WEIGHTS_NAME
from vwe.formats.config import load_config
from vwe.data.loader import infer_samples
from vwe.stages.perimage import GroupBatcher
from vwe.nets.cam import build_model

DEMO = REPO / "configs" / "demo.yaml"


def test_group_batcher_never_holds_more_than_a_batch():
    rng = np.random.default_rng(0)
    sizes = [tuple(int(v) for v in rng.integers(40, 44, 2)) for _ in range(200)]  # 16 sizes, mixed order
    batcher = GroupBatcher(3)
    out = []
    for i, size in enumerate(sizes):
        for group in batcher.add(size, {"i": i, "size": size}):
            assert len({s["size"] for s in group}) == 1 and 1 <= len(group) <= 3
            out.append(group)
        assert batcher.pending <= 3
    out.extend(batcher.drain())
    assert batcher.pending == 0 and batcher.max_pending == 3
    assert sorted(s["i"] for g in out for s in g) == list(range(200))  # every image exactly once
    one = GroupBatcher(1)
    assert [len(one.add((i, i), {"i": i})) for i in range(5)] == [1] * 5 and one.max_pending == 1


@pytest.mark.parametrize("sig, batch", [(signal.SIGUSR1, 1), (signal.SIGTERM, 4)])
def test_a_signal_stops_after_the_current_batch_and_the_rerun_completes(synthetic_shards, tmp_path, sig, batch):
    """The preemption contract (a requeued infer.sbatch job): SIGUSR1 or SIGTERM -> the batch running is
    finished, exit 75, the CAMs written kept (complete files, no manifest); the rerun writes only the rest.
    With many distinct sizes, memory stays bounded by infer.batch_size."""
    run = tmp_path / "run"
    overrides = [f"data.root={synthetic_shards}", f"output.run_dir={run}", "model.num_words=16",
                 "data.infer_split=train", "infer.scales=[1.0, 1.5, 2.0]", f"infer.batch_size={batch}",
                 "infer.num_workers=1"]
    cfg = load_config(DEMO, overrides)
    sizes = [tuple(s["size"]) for s in infer_samples(cfg.data, cfg.infer, 0, 1, with_scales=False, with_image=False)]
    assert len(sizes) == 48 and len(set(sizes)) >= 25  # most images have a size of their own
    export_random_weights(cfg, run)
    cmd = [sys.executable, "-m", "vwe", "infer", "--config", str(DEMO), *overrides]
    cams = run / "cams"
    proc = popen_until(cmd, cams, "*.npz", timeout=180)
    seen = len(list(cams.glob("*.npz")))
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, out + err
    written = sorted(cams.glob("*.npz"))
    # the batch running when the signal came is finished (and perhaps one that started while it was sent);
    # grouped by size without a bound, the first CAM came only in the final flush, which ran to the end
    assert seen <= len(written) <= seen + 2 * batch and len(written) < 48, (seen, len(written))
    assert f"preempted (signal {int(sig)}) after writing {len(written)} CAM(s); exiting with code 75" in out
    assert not list(cams.glob("manifest-rank*.json"))  # written only by a complete run
    for path in written:
        read_cam(path)  # complete files

    rerun = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{48 - len(written)} written, {len(written)} already done" in rerun.stdout
    manifest = json.loads((cams / "manifest-rank000.json").read_text())
    assert manifest["written"] == 48 - len(written) and manifest["already_done"] == len(written)
    assert manifest["max_pending_images"] <= batch  # images waiting in memory, whatever the sizes
    assert manifest["skipped"]["count"] == 0


@pytest.fixture(scope="module")
def trained(synthetic_shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("trained")
    run_vwe("train", "--config", str(DEMO), *TINY, f"data.root={synthetic_shards}", f"output.run_dir={run}",
            "train.max_steps=2")
    return run


def _infer_args(shards, run, *extra):
    return ["--config", str(DEMO), *TINY, f"data.root={shards}", f"output.run_dir={run}", "infer.dtype=float32",
            *extra]


def test_weights_from_a_checkpoint_folder(synthetic_shards, trained, tmp_path):
    (step,) = sorted((trained / "checkpoints").glob("step-*"))
    run_vwe("infer", *_infer_args(synthetic_shards, trained, f"infer.out_dir={tmp_path / 'final'}"))
    run_vwe("infer", *_infer_args(synthetic_shards, trained, f"infer.out_dir={tmp_path / 'ckpt'}",
                                  f"infer.weights={step}"))
    finals = {p.name: read_cam(p) for p in (tmp_path / "final").glob("*.npz")}
    assert len(finals) == 12
    for name, a in finals.items():
        b = read_cam(tmp_path / "ckpt" / name)
        assert (a.keys == b.keys).all()
        np.testing.assert_allclose(a.high_res, b.high_res, rtol=1e-5, atol=1e-6)
    manifest = json.loads((tmp_path / "ckpt" / "manifest-rank000.json").read_text())
    assert manifest["weights"] == str(step / "model.safetensors")
    assert b.weights_sha256 == manifest["weights_sha256"]

    # evaluation matches CAMs to the weights infer would use: these, with the same infer.weights...
    run_vwe("evaluate", *_infer_args(synthetic_shards, trained, f"infer.out_dir={tmp_path / 'ckpt'}",
                                     f"infer.weights={step}"))
    report = json.loads((trained / "eval" / "report.json").read_text())
    assert report["weights_matched"] and report["weights_sha256"] == manifest["weights_sha256"]
    # ...but not the run's final weights (another file, another hash)
    proc = run_vwe("evaluate", *_infer_args(synthetic_shards, trained, f"infer.out_dir={tmp_path / 'ckpt'}"),
                   check=False)
    assert proc.returncode == 2 and manifest["weights_sha256"] in proc.stderr
    assert str(trained / FINAL_WEIGHTS_NAME) in proc.stderr and "Rerun `vwe infer`" in proc.stderr

    empty = tmp_path / "not-a-checkpoint"
    empty.mkdir()
    proc = run_vwe("infer", *_infer_args(synthetic_shards, trained, f"infer.weights={empty}"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"infer.weights: folder {empty} has no model.safetensors" in proc.stderr
    assert "checkpoints/step-NNNNNN/model.safetensors" in proc.stderr
    proc = run_vwe("infer", *_infer_args(synthetic_shards, trained, f"infer.weights={tmp_path / 'nope.safetensors'}"),
                   check=False)
    assert proc.returncode == 2 and f"infer.weights: {tmp_path / 'nope.safetensors'} not found" in proc.stderr


def test_weights_holding_nan_are_refused(synthetic_shards, tmp_path):
    cfg = load_config(DEMO, [*TINY, f"data.root={synthetic_shards}"])
    state = build_model(cfg.model).state_dict()
    name = next(k for k, v in state.items() if v.is_floating_point() and v.dim() == 4)
    state[name][0, 0, 0, 0] = float("nan")
    # planted by hand: vwe's own export refuses non-finite weights
    import json
    from safetensors.torch import save_file
    (tmp_path / FINAL_WEIGHTS_NAME).parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / FINAL_WEIGHTS_NAME),
              metadata={"vwe_config": json.dumps(cfg.to_dict())})
    proc = run_vwe("infer", *_infer_args(synthetic_shards, tmp_path), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"weights file {tmp_path / FINAL_WEIGHTS_NAME}: 1 tensor(s) hold NaN or Inf (e.g. {name})" in proc.stderr
    assert not list((tmp_path / "cams").glob("*.npz"))


def test_finite_weights_giving_non_finite_cams_write_nothing_for_them(synthetic_shards, tmp_path):
    """Weights that pass the NaN check but overflow float32 in the classifier: the pass fails naming the
    images, and no CAM file is written for them (the check runs where each write waits for its maps)."""
    cfg = load_config(DEMO, [*TINY, f"data.root={synthetic_shards}"])
    torch.manual_seed(0)
    state = build_model(cfg.model).state_dict()
    state["classifier.weight"] = torch.full_like(state["classifier.weight"], 3e38)
    import json
    from safetensors.torch import save_file
    (tmp_path / FINAL_WEIGHTS_NAME).parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / FINAL_WEIGHTS_NAME),
              metadata={"vwe_config": json.dumps(cfg.to_dict())})
    proc = run_vwe("infer", *_infer_args(synthetic_shards, tmp_path), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "give non-finite CAMs for image(s) " in proc.stderr and "nothing written for them" in proc.stderr
    assert not list((tmp_path / "cams").glob("*.npz")) and not list((tmp_path / "cams").glob(".*.tmp*"))


def test_corrupt_samples_skipped_are_listed_in_the_manifest(synthetic_shards, tmp_path):
    samples = samples_of(synthetic_shards, "val")
    bad = samples[4]["key"]
    samples[4]["parts"]["jpg"] = b"garbage" * 20
    root = tmp_path / "shards"
    write_split(root, "val", samples, 2)
    run = tmp_path / "run"
    cfg = load_config(DEMO, [*TINY, f"data.root={root}"])
    export_random_weights(cfg, run)
    proc = run_vwe("infer", *_infer_args(root, run), check=False)
    assert proc.returncode == 2 and f"sample '{bad}'" in proc.stderr and "val-000000.tar" in proc.stderr
    proc = run_vwe("infer", *_infer_args(root, run, "data.on_corrupt=skip"))
    manifest = json.loads((run / "cams" / "manifest-rank000.json").read_text())
    assert manifest["written"] + manifest["already_done"] == 11 and bad not in manifest["ids"]
    assert not (run / "cams" / f"{bad}.npz").exists()
    assert manifest["skipped"]["count"] == 1 and manifest["skipped"]["by_reason"] == {"corrupt": [bad]}
    assert "1 corrupt image(s) skipped over 1 process(es) (data.on_corrupt=skip): 1 corrupt" in proc.stdout
