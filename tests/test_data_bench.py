"""`vwe bench data` runs end to end on real shards and writes its figures (no timing assertions)."""
from __future__ import annotations

import json

from conftest import run_vwe
from vwe.data.prepare import prepare
from vwe.data.synthetic import write_dataset


def test_bench_data_writes_figures(tmp_path, repo):
    write_dataset(tmp_path / "src", n_train=48, n_val=2, seed=0, size=64)
    prepare(tmp_path / "src", None, tmp_path / "shards")
    out = tmp_path / "bench.json"
    proc = run_vwe("bench", "data", "--config", str(repo / "configs" / "demo.yaml"), "--workers", "1",
                   "--steps", "2", "--json", str(out), env={"VWE_SHARDS": str(tmp_path / "shards")})
    assert "images/s" in proc.stdout
    figures = json.loads(out.read_text())
    assert figures["workers"] == 1 and figures["images"] == 48
    for k in ("decode_only_1proc_images_per_s", "loader_processes_images_per_s", "reader_2021_images_per_s",
              "loader_processes_cpu_ms_per_image", "decode_only_workers_images_per_s",
              "loader_threads_images_per_s"):
        assert figures[k] > 0
    # the default resize reproduces PIL's bicubic (the published code's); bilinear does not
    assert figures["resize_bicubic_vs_pil_bicubic_mean_abs"] < 0.05
    assert figures["resize_bilinear_vs_pil_bicubic_mean_abs"] > 0.2
    assert "resize vs PIL BICUBIC" in proc.stdout
    best = max(figures["loader_processes_images_per_s"], figures["loader_threads_images_per_s"])
    assert abs(figures["loader_over_2021"] - best / figures["reader_2021_images_per_s"]) < 0.01
