"""TensorBoard shows results: named lr groups, the config as text, each evaluation's CAM mIoU (and the
sweep's best) and CAM pictures, in the run's own tb/ folder (read back with TensorBoard's reader)."""
from __future__ import annotations

from conftest import REPO, TINY, run_vwe


def test_tensorboard_has_losses_config_miou_and_pictures(synthetic_shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tmp_path / "run"
    common = ["--config", str(REPO / "configs" / "demo.yaml"), *TINY, "output.tensorboard=true",
              f"data.root={synthetic_shards}", f"output.run_dir={run}", "data.infer_split=val"]
    run_vwe("train", *common, "train.max_steps=3", "train.checkpoint_every=0")
    run_vwe("infer", *common)
    run_vwe("evaluate", *common, "--sweep")
    import json
    assert json.loads((run / "eval" / "report.json").read_text())["infer_mixed_precision"] == ["no"]
    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert {"loss/loss", "lr/backbone", "lr/heads", "eval/miou", "eval/best_miou", "eval_iou/bkg"} <= set(tags["scalars"])
    miou = events.Scalars("eval/miou")
    assert len(miou) == 1 and miou[0].step == 3 and 0.0 <= miou[0].value <= 1.0
    pictures = [t for t in tags["images"] if t.startswith("cams/")]
    assert len(pictures) == 4
    assert any("config" in t for t in tags["tensors"])  # add_text is stored as a text tensor
