"""CAM inference: identical CAMs for 1, 2 and 3 processes, restart after a kill writes only what is
missing, the legacy export, and the whole pipeline learning on synthetic data."""
from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, TINY, kill_tree, launch_cmd, run_vwe
from helpers import popen_until
from vwe.formats.cams import read_cam

DEMO = str(REPO / "configs" / "demo.yaml")


def args(shards: Path, run: Path, *extra: str) -> list[str]:
    return ["--config", DEMO, *TINY, f"data.root={shards}", f"output.run_dir={run}", *extra]


@pytest.fixture(scope="module")
def trained(synthetic_shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trained")
    run_vwe("train", *args(synthetic_shards, run, "train.max_steps=3"))
    return run


def cams(folder: Path) -> dict[str, object]:
    return {p.stem: read_cam(p) for p in sorted(folder.glob("*.npz"))}


def infer(processes: int, shards: Path, run: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = launch_cmd(processes, "infer", *args(shards, run, f"infer.out_dir={out}", "infer.dtype=float32", *extra))
    proc = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.multiprocess
def test_same_cams_for_1_2_3_processes(synthetic_shards, trained, tmp_path):
    results = {}
    for n in (1, 2, 3):
        infer(n, synthetic_shards, trained, tmp_path / f"cams{n}")
        results[n] = cams(tmp_path / f"cams{n}")
        manifests = sorted((tmp_path / f"cams{n}").glob("manifest-rank*.json"))
        assert len(manifests) == n
        ids = [i for m in manifests for i in json.loads(m.read_text())["ids"]]
        assert len(ids) == len(set(ids)) == 12  # every val image exactly once
    assert results[1].keys() == results[2].keys() == results[3].keys() and len(results[1]) == 12
    for key, one in results[1].items():
        for n in (2, 3):
            other = results[n][key]
            assert (one.keys == other.keys).all() and one.weights_sha256 == other.weights_sha256
            np.testing.assert_allclose(one.high_res, other.high_res, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(one.cam, other.cam, rtol=1e-4, atol=1e-5)
    sample = next(iter(results[1].values()))
    h, w = sample.high_res.shape[1:]
    assert sample.cam.shape[1:] == (-(-h // 4), -(-w // 4))
    assert np.all(sample.high_res.max(axis=(1, 2)) <= 1.0)


def test_restart_after_kill_writes_only_missing(synthetic_shards, trained, tmp_path):
    out = tmp_path / "cams"
    extra = ("data.infer_split=train", "infer.scales=[1.0, 0.5, 1.5, 2.0]", "infer.batch_size=1")
    cmd = launch_cmd(1, "infer", *args(synthetic_shards, trained, f"infer.out_dir={out}", *extra))
    proc = popen_until(cmd, out, "*.npz", count=3, start_new_session=True)
    kill_tree(proc.pid, signal.SIGKILL)
    proc.communicate()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz")}
    assert 3 <= len(before) < 48
    assert all(read_cam(out / n) for n in before)  # the kill never leaves a half-written .npz
    infer(1, synthetic_shards, trained, out, *extra)
    manifest = json.loads((out / "manifest-rank000.json").read_text())
    assert manifest["already_done"] == len(before) and manifest["written"] == 48 - len(before)
    assert all(out.joinpath(n).stat().st_mtime_ns == t for n, t in before.items())
    assert len(list(out.glob("*.npz"))) == 48


def test_legacy_export_and_float16_storage(synthetic_shards, trained, tmp_path):
    legacy = tmp_path / "legacy"
    run_vwe("infer", *args(synthetic_shards, trained, f"infer.out_dir={tmp_path / 'cams'}",
                           f"infer.legacy_dir={legacy}", "infer.dtype=float16"))
    rec = read_cam(next((tmp_path / "cams").glob("*.npz")))
    assert rec.high_res.dtype == np.float16
    files = sorted(legacy.glob("*.npy"))
    assert len(files) == 12
    item = np.load(files[0], allow_pickle=True).item()
    assert set(item) == {"keys", "cam", "high_res"} and item["high_res"].dtype == np.float32


def test_missing_weights_is_a_clear_error(synthetic_shards, tmp_path):
    proc = run_vwe("infer", *args(synthetic_shards, tmp_path / "nothing"), check=False)
    assert proc.returncode == 2 and "model.safetensors not found" in proc.stderr


def test_multiscale_cams_flip_and_scales():
    import torch
    from vwe.formats.config import load_config
    from vwe.stages.infer import keep_positive, multiscale_cams
    from vwe.nets.cam import build_model
    cfg = load_config(DEMO, ["model.num_words=8"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    img = torch.randint(0, 256, (1, 3, 40, 56), dtype=torch.uint8)
    pair = torch.cat([img, img.flip(-1)])
    device = torch.device("cpu")
    high, strided = multiscale_cams(model, [pair], (40, 56), device, False)
    assert high.shape == (1, 20, 40, 56) and strided.shape == (1, 20, 10, 14)
    import torch.nn.functional as F
    from vwe.data.transforms import normalize
    with torch.no_grad():
        c = model.cam(normalize(pair))  # max of the image's CAM and the un-flipped CAM of the flip
    expected = F.interpolate(torch.maximum(c[:1], c[1:].flip(-1)), (40, 56), mode="bilinear", align_corners=False)
    torch.testing.assert_close(high, expected)
    plain, _ = multiscale_cams(model, [img], (40, 56), device, False, flip=False)
    torch.testing.assert_close(plain, F.interpolate(c[:1], (40, 56), mode="bilinear", align_corners=False))
    two, _ = multiscale_cams(model, [pair, pair], (40, 56), device, False)
    torch.testing.assert_close(two, 2 * high)  # scales add up
    keys, (kept,) = keep_positive(torch.eye(20)[[3]].sum(0) + torch.eye(20)[[11]].sum(0), high[0])
    assert keys.tolist() == [3, 11] and kept.shape == (2, 40, 56)
    assert torch.all(kept.flatten(1).amax(1) <= 1.0) and torch.all(kept >= 0)


def test_a_wider_group_window_fills_batches_with_the_same_cams(synthetic_shards, trained, tmp_path):
    infer(1, synthetic_shards, trained, tmp_path / "narrow")
    infer(1, synthetic_shards, trained, tmp_path / "wide", "infer.group_window=12", "infer.batch_size=4")
    narrow, wide = (json.loads((tmp_path / f / "manifest-rank000.json").read_text()) for f in ("narrow", "wide"))
    assert wide["max_pending_images"] <= 12 and narrow["max_pending_images"] <= 2  # TINY: infer.batch_size=2
    assert wide["images_per_compute"] > narrow["images_per_compute"], (narrow, wide)
    a, b = cams(tmp_path / "narrow"), cams(tmp_path / "wide")
    assert a.keys() == b.keys() and len(a) == 12
    for key in a:
        np.testing.assert_allclose(a[key].high_res, b[key].high_res, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(a[key].cam, b[key].cam, rtol=1e-4, atol=1e-5)


def test_scales_made_on_the_device_give_the_loaders_cams(synthetic_shards, trained, tmp_path):
    infer(1, synthetic_shards, trained, tmp_path / "loader", "infer.resize_on=loader")
    infer(1, synthetic_shards, trained, tmp_path / "device", "infer.resize_on=device")
    manifests = {f: json.loads((tmp_path / f / "manifest-rank000.json").read_text()) for f in ("loader", "device")}
    assert {f: m["resize_on"] for f, m in manifests.items()} == {"loader": "loader", "device": "device"}
    a, b = cams(tmp_path / "loader"), cams(tmp_path / "device")
    assert a.keys() == b.keys() and len(a) == 12
    for key in a:  # the same pixels in the same batches: the same numbers
        np.testing.assert_array_equal(a[key].high_res, b[key].high_res)
        np.testing.assert_array_equal(a[key].cam, b[key].cam)
