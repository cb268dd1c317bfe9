"""`vwe bench train` as a real process: both checkpointing variants measured, figures consistent."""
import json

from conftest import run_vwe


def test_bench_train_compare_checkpointing(tmp_path, repo):
    out = tmp_path / "bench.json"
    proc = run_vwe("bench", "train", "model.backbone=resnet18", "model.pretrained=none", "model.norm=batch",
                   "model.num_words=8", "data.crop_size=64", "train.batch_size=2",
                   "--config", str(repo / "configs" / "demo.yaml"), "--steps", "1",
                   "--compare", "checkpointing", "--json", str(out), cwd=tmp_path)
    figures = json.loads(out.read_text())
    off, on = figures["variants"]
    assert (off["grad_checkpointing"], on["grad_checkpointing"]) == (False, True)
    for row in (off, on):
        assert row["backbone"] == "resnet18" and row["batch_size"] == 2 and row["crop_size"] == 64
        assert row["steps"] == 1 and row["step_s"] > 0
        phases = row["data_wait_s"] + row["forward_s"] + row["backward_s"] + row["optimizer_s"]
        assert abs(phases - row["step_s"]) < 1e-9
        assert row["input"] == "synthetic" and row["data_wait_s"] < 0.01
        # ResNet-18 at 64 px: about 0.15 GFLOP per image forward, about 3x that with the backward
        assert 0.3e9 < row["flops_per_step"] / 2 < 3e9 and row["peak_tflops"] > 0 and 0 < row["mfu"] < 2
        assert abs(row["img_per_s"] - 2 / row["step_s"]) < 1e-6
        assert row["peak_mem_mib"] >= row["model_mem_mib"] > 0
    expected = 100 * (on["peak_mem_mib"] / off["peak_mem_mib"] - 1)
    assert abs(figures["comparison"]["peak_mem_change_pct"] - expected) < 1e-9
    assert "checkpointing on vs checkpointing off" in proc.stdout
