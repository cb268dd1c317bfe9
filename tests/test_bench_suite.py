"""`vwe bench suite` as a real process: every benchmark runs, the JSON and the table are written, and the
generated section of a markdown document is replaced in place."""
from __future__ import annotations

import json

import pytest

from conftest import REPO, run_vwe

TINY_BENCH = ["model.backbone=resnet18", "model.num_words=8", "data.crop_size=64", "data.long_side=[64, 80]",
              "train.batch_size=2", "infer.scales=[1.0]", "infer.batch_size=2", "data.num_workers=1",
              "seg.crop_size=64", "seg.batch_size=2", "seg.test_scales=[0.5]", "seg.test_flip=false"]


def test_bench_suite_writes_every_figure(synthetic_shards, tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nhand-written text\n\n<!-- bench suite: cpu -->\nold\n<!-- end bench suite: cpu -->\n"
                   "\nmore text\n")
    out = tmp_path / "suite"
    run_vwe("bench", "suite", "--config", str(REPO / "configs" / "demo.yaml"), *TINY_BENCH,
            f"data.root={synthetic_shards}", "--out", str(out), "--steps", "1", "--quick",
            "--update-doc", str(doc), timeout=1800)
    r = json.loads((out / "benchmarks.json").read_text())
    assert {"machine", "data", "train_fp32", "train_auto", "infer_fp32", "infer_auto", "eval", "seg",
            "distribution"} <= set(r)
    assert r["seg"]["training"]["img_per_s"] > 0 and r["seg"]["prediction"]["gflop_per_image"] > 0
    assert r["machine"]["cores"] >= 1 and r["machine"]["torch"]
    assert r["train_fp32"]["variants"][0]["mixed_precision"] == "no"
    assert r["train_auto"]["variants"][0]["mixed_precision"] == ("bf16" if r["machine"]["cpu_native_bf16"] else "no")
    assert r["infer_fp32"]["vwe_mfu"] > 0 and r["infer_fp32"]["gflops_per_image"] > 0
    assert set(r["distribution"]["img_s"]) == {"1", "2"} and r["distribution"]["scaling"] > 0
    assert r["eval"]["threads"] >= 1 and r["eval"]["one_thread_single_seconds"] > 0
    commands = r["commands"]
    assert list(commands) == ["train", "infer", "evaluate", "refine", "segment", "segment-eval"]
    for name, c in commands.items():
        assert c["images"] > 0 and 0 < c["work_s"] <= c["wall_s"], (name, c)
        assert c["startup_s"] == pytest.approx(c["wall_s"] - c["work_s"], abs=0.02)
        assert c["wall_img_s"] == pytest.approx(c["images"] / c["wall_s"], rel=0.01)
        if name != "refine":  # every other command has its component, and a reason wherever they disagree
            assert c["component_img_s"] > 0 and c["ratio"] > 0, (name, c)
            assert (0.9 <= c["ratio"] <= 1.1) or c["note"], (name, c)
    for name in ("train", "infer", "segment", "segment-eval"):  # the real commands' MFU, from their rates
        assert commands[name]["mfu"] > 0, (name, commands[name])
    assert commands["infer"]["mfu"] == pytest.approx(r["infer_fp32"]["vwe_mfu"] * commands["infer"]["ratio"], rel=1e-3)
    assert commands["train"]["images"] == 3 * 2  # steps + 2 at batch 2
    val_images = json.loads((synthetic_shards / "val.json").read_text())["num_samples"]
    assert commands["infer"]["images"] == commands["evaluate"]["images"] == commands["segment-eval"]["images"] == val_images
    table = (out / "benchmarks.md").read_text()
    assert table.startswith("Measured ") and "| training, 1 vs 2 processes" in table
    assert all(f"| `vwe {name}` | {c['images']} | {c['wall_s']} |" in table for name, c in commands.items())
    assert "| segmentation training | resnet18" in table
    text = doc.read_text()
    assert "hand-written text" in text and "more text" in text and "old" not in text.split("hand-written")[1]
    assert table in text


def test_bench_infer_compares_the_compiled_cam_network(tmp_path):
    """`--compare compile` really compiles (inductor, freezing, dynamic shapes) and the compiled network
    computes what the eager one does; another comparison is refused for inference."""
    out = tmp_path / "compile.json"
    run_vwe("bench", "infer", "--config", str(REPO / "configs" / "demo.yaml"), "model.backbone=resnet18",
            "model.pretrained=none", "infer.scales=[0.25, 0.125]", 'infer.mixed_precision="no"',
            "--compare", "compile", "--steps", "1", "--json", str(out), timeout=900)
    f = json.loads(out.read_text())
    assert f["mixed_precision"] == "no" and len(f["eager_s_per_image"]) == len(f["compiled_s_per_image"]) == 1
    assert f["max_rel_diff"] < 1e-4 and f["gflops_per_image"] > 0 and f["eager_mfu"] > 0
    assert f["compiled_graphs"] == 1 and isinstance(f["gain_pct"], float)  # one graph for every size
    proc = run_vwe("bench", "infer", "--config", str(REPO / "configs" / "demo.yaml"), "--compare", "checkpointing",
                   check=False)
    assert proc.returncode == 2 and "--compare takes 'compile' or 'sizes'" in proc.stderr


def test_bench_infer_times_new_image_sizes_against_a_repeated_one(tmp_path):
    """`--compare sizes`: the device's seconds per image at one repeated size, at sizes met for the first
    time and at the same sizes again (the cost of a new shape is the difference)."""
    from vwe.bench.infer import distinct_sizes
    sizes = distinct_sizes(40)
    assert len(set(sizes)) == 40 and (375, 500) not in sizes and all(max(s) == 500 for s in sizes)
    out = tmp_path / "sizes.json"
    run_vwe("bench", "infer", "--config", str(REPO / "configs" / "demo.yaml"), "model.backbone=resnet18",
            "model.pretrained=none", "infer.scales=[0.25, 0.125]", "--compare", "sizes", "--steps", "2",
            "--json", str(out), timeout=600)
    f = json.loads(out.read_text())
    assert f["images"] == 2 and f["scales"] == [0.25, 0.125] and f["flip"] is True
    for key in ("repeated_size_s_per_image", "new_sizes_first_s_per_image", "new_sizes_again_s_per_image"):
        assert f[key] > 0, f
    # each figure is rounded to 0.1 ms on its own
    assert abs(f["new_shape_cost_s_per_image"] - (f["new_sizes_first_s_per_image"]
                                                  - f["new_sizes_again_s_per_image"])) <= 1.5e-4


def test_epoch_starts_compares_the_steps_that_open_an_epoch_with_the_others(tmp_path):
    from vwe.bench.suite import epoch_starts
    metrics = tmp_path / "metrics.jsonl"
    rates = [(0, 50.0), (0, 100.0), (0, 98.0), (1, 60.0), (1, 101.0), (1, 99.0), (2, 70.0), (2, 102.0)]
    metrics.write_text("".join(json.dumps({"step": i + 1, "epoch": e, "images_per_s": r}) + "\n"
                               for i, (e, r) in enumerate(rates)))
    # the run's first record (start-up) counts as neither
    assert epoch_starts(metrics) == {"epoch_starts": 2, "epoch_start_img_s": 70.0, "other_steps_img_s": 100.0}
    metrics.write_text("".join(json.dumps({"step": i, "epoch": 0, "images_per_s": 9.0}) + "\n" for i in range(4)))
    assert epoch_starts(metrics) is None  # no epoch end crossed


def test_a_slow_training_command_is_explained_by_measured_facts():
    from vwe.bench.suite import _why
    row = {"ratio": 0.8, "images": 20, "steps": 5, "work_img_s": 32.8, "component_img_s": 41.3, "data_wait": 0.07,
           "data_cpu_ms_per_image": 5.59}
    note = _why("segment", row, {"machine": {"cores": 2}, "steps": 3})
    assert "takes 25 ms more than the component's 97 ms" in note and "data wait (7% of a step" in note
    assert "the loader's workers used 22 ms of CPU per step, on the 2 cores" in note
    assert _why("segment", {**row, "ratio": 1.0}, {"machine": {"cores": 2}, "steps": 3}) == ""
