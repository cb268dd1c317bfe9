"""The real training, inference and evaluation through the project's SLURM scripts on a private two-node
SLURM cluster (tests/slurm_cluster.py): the submit.sh chain with a world size of 4 over two simulated
nodes, and a training job preempted with SIGUSR1, requeued and finished from its checkpoint."""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (session fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.multiprocess, pytest.mark.timeout(420)]

SMALL = [*TINY, "train.batch_size=8", "train.checkpoint_every=0"]


def job_env(repo: Path, tmp_path: Path, shards: Path, procs: int) -> dict:
    """What a CPU user exports before submitting; sbatch passes the environment to the jobs."""
    return {"VWE_CPU": "1", "VWE_PROCS_PER_NODE": str(procs), "VWE_PYTHON": sys.executable,
            "OMP_NUM_THREADS": "1", "VWE_LOG_DIR": str(tmp_path / "logs"),
            "VWE_CONFIG": str(repo / "configs" / "demo.yaml"), "VWE_SHARDS": str(shards),
            "VWE_RUN_DIR": str(tmp_path / "run")}


def job_log(tmp_path: Path, name: str, job: int) -> str:
    path = tmp_path / f"{name}-{job}.out"
    return path.read_text(errors="replace") if path.exists() else f"(no {path})"


def run_chain(slurm_cluster, repo: Path, tmp_path: Path, env: dict, stages: list[str], *overrides: str) -> None:
    """submit.sh with `overrides`: exactly `stages` submitted, each afterok on the one before, all complete."""
    out = slurm_cluster.run(str(repo / "slurm" / "submit.sh"), *overrides, env=env, cwd=tmp_path).stdout
    ids = {stage: int(i) for stage, i in (line.split() for line in out.strip().splitlines())}
    try:
        assert list(ids) == stages, out
        for before, after in zip(stages, stages[1:]):
            assert slurm_cluster.job(ids[after])["Dependency"].startswith(f"afterok:{ids[before]}")
        infos = {stage: slurm_cluster.wait_done(i, timeout=330) for stage, i in ids.items()}
    finally:
        for i in ids.values():
            slurm_cluster.cancel(i)
    for stage, info in infos.items():
        log = job_log(tmp_path, f"vwe-{stage}", ids[stage])
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{stage}: {info}\n{log}"


def test_submit_chain_prepare_train_infer_evaluate(slurm_cluster, repo, tmp_path):
    """submit.sh on synthetic VOC data: prepare (1 process) -> train on 2 nodes x 2 processes (world 4,
    c10d rendezvous between the nodes) -> infer + evaluate on the same 4 ranks, each afterok."""
    from vwe.data.synthetic import write_dataset
    write_dataset(tmp_path / "voc", n_train=32, n_val=8, seed=1, size=80, sbd=False)
    shards, run = tmp_path / "shards", tmp_path / "run"
    env = {**job_env(repo, tmp_path, shards, 2), "VWE_NODES": "2", "VWE_VOC": str(tmp_path / "voc"),
           "VWE_SBATCH_ARGS": f"--output={tmp_path}/%x-%j.out"}
    out = slurm_cluster.run(str(repo / "slurm" / "submit.sh"), *SMALL, "train.max_steps=3",
                            env=env, cwd=tmp_path).stdout
    ids = {stage: int(i) for stage, i in (line.split() for line in out.strip().splitlines())}
    try:
        assert list(ids) == ["prepare", "train", "infer"], out
        # dependencies as submitted (read before they are fulfilled and cleared)
        assert slurm_cluster.job(ids["train"])["Dependency"].startswith(f"afterok:{ids['prepare']}")
        assert slurm_cluster.job(ids["infer"])["Dependency"].startswith(f"afterok:{ids['train']}")
        infos = {stage: slurm_cluster.wait_done(i, timeout=330) for stage, i in ids.items()}
    finally:
        for i in ids.values():
            slurm_cluster.cancel(i)
    logs = {stage: job_log(tmp_path, f"vwe-{stage}", i) for stage, i in ids.items()}
    for stage, info in infos.items():
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{stage}: {info}\n{logs[stage]}"
        assert info["Restarts"] == "0"
    assert infos["train"]["NodeList"] == infos["infer"]["NodeList"] == "node[1-2]"
    # each job started only after the previous one had ended
    start = {s: infos[s]["StartTime"] for s in ids}
    end = {s: infos[s]["EndTime"] for s in ids}
    assert end["prepare"] <= start["train"] and end["train"] <= start["infer"], (start, end)

    assert (shards / "val.json").is_file() and (shards / "train.json").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 4 and summary["distributed_type"] == "MULTI_CPU", summary
    assert summary["steps"] == 3 and summary["steps_this_run"] == 3
    assert summary["batches_per_rank"] == [3, 3, 3, 3]
    assert summary["replicas_identical"] is True
    # 2 ranks per node, both nodes in one process group
    for node in ("0", "1"):
        ranks = sorted((tmp_path / "logs" / str(ids["train"]) / "run0" / f"node{node}").glob("*/attempt_0/*"))
        assert [r.name for r in ranks] == ["0", "1"], ranks

    from vwe.data.index import load_index
    val_ids = sorted(load_index(shards, "val").keys)
    assert len(val_ids) == 8
    assert sorted(p.stem for p in (run / "cams").glob("*.npz")) == val_ids
    manifests = [json.loads(p.read_text()) for p in sorted((run / "cams").glob("manifest-rank*.json"))]
    assert [m["world"] for m in manifests] == [4, 4, 4, 4]
    assert sorted(k for m in manifests for k in m["ids"]) == val_ids  # each id exactly once over the ranks

    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["num_images"] == 8 and report["missing"] == [] and report["processes"] == 4, report
    assert 0.0 <= report["miou"] <= 1.0 and len(report["iou"]) == 21
    table = (run / "eval" / "table.md").read_text()
    assert "CAM mIoU on 'val' (8 images" in table
    assert "batch: step 'vwe infer' exited with 0" in logs["infer"]
    assert "batch: step 'vwe evaluate' exited with 0" in logs["infer"]


def wait_for_metrics(path: Path, lines: int, timeout: float, cluster, job: int) -> None:
    """Wait until training has logged `lines` steps to metrics.jsonl (log_every=1)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count("\n") >= lines:
            return
        info = cluster.job(job)
        assert info.get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), info
        time.sleep(0.2)
    raise AssertionError(f"no {lines} steps in {path} within {timeout:g} s: {cluster.job(job)}")


def test_usr1_midway_checkpoints_requeues_and_resumes(slurm_cluster, synthetic_shards, repo, tmp_path):
    """train.sbatch on 2 nodes x 1 process with a DataLoader worker per rank: USR1 to the batch shell
    (what --signal=B:USR1@N does before the time limit) -> every rank finishes its step, checkpoints and
    exits 75 -> the job is requeued -> the second run resumes from that step and ends at max_steps."""
    max_steps = 30
    run = tmp_path / "run"
    env = job_env(repo, tmp_path, synthetic_shards, 1)
    job = slurm_cluster.sbatch(repo / "slurm" / "train.sbatch", *SMALL, "data.num_workers=1",
                               f"train.max_steps={max_steps}",
                               options=["-N", "2", f"--output={tmp_path}/%x-%j.out"], env=env, cwd=tmp_path)
    try:
        wait_for_metrics(run / "metrics.jsonl", 2, 240, slurm_cluster, job)
        slurm_cluster.run("scancel", "--signal=USR1", "--batch", str(job))
        slurm_cluster.wait_for(job, lambda i: i.get("Restarts") == "1", 120, "the requeue")
        info = slurm_cluster.wait_done(job, timeout=240)
    finally:
        slurm_cluster.cancel(job)
    log = job_log(tmp_path, "vwe-train", job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log}"
    assert info["Restarts"] == "1"
    first, second = log.split("(restart 1)")

    m = re.search(r"preempted \(signal 10\): checkpoint (\S+) saved at step (\d+); exiting with code 75", first)
    assert m, first
    stopped_at = int(m[2])
    assert 2 <= stopped_at < max_steps and m[1] == str(run / "checkpoints" / f"step-{stopped_at:06d}")
    assert first.count("stopped after SIGUSR1 (launcher exit 1): exit 75") == 2, first  # one per node
    assert "batch: step 'vwe train' exited with 75" in first
    assert f"batch: preempted (exit 75): requeueing job {job} (restarts so far: 0)" in first
    # the data loader workers took the forwarded signal without dying
    assert "DataLoader worker" not in log and "Traceback" not in first.split("exiting with code 75")[0]

    assert f"resumed from {run / 'checkpoints' / f'step-{stopped_at:06d}'} at step {stopped_at}" in second
    assert "batch: step 'vwe train' exited with 0" in second
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == max_steps, summary
    assert summary["steps_this_run"] == max_steps - stopped_at
    assert summary["processes"] == 2 and summary["replicas_identical"] is True
    # one metrics line per step over both runs, steps 1..max_steps, none twice
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, max_steps + 1)), steps
    # per-rank logs of both runs
    for restart in ("run0", "run1"):
        assert sorted((tmp_path / "logs" / str(job) / restart).glob("node*/*/attempt_0/0/stdout.log"))


def test_submit_chain_until_segment(slurm_cluster, repo, tmp_path, synthetic_shards):
    """VWE_UNTIL=segment: train -> infer + evaluate -> refine -> segment (label split + DeepLab) ->
    segment-eval, one job each through slurm/stage.sbatch, each afterok on the one before."""
    run = tmp_path / "run"
    env = {**job_env(repo, tmp_path, synthetic_shards, 1), "VWE_UNTIL": "segment",
           "VWE_SBATCH_ARGS": f"--output={tmp_path}/%x-%j.out"}
    seg = ["data.infer_split=train", "refine.method=threshold", "seg.backbone=resnet18", "seg.crop_size=64",
           "seg.batch_size=4", "seg.max_steps=2", "seg.msc_scales=[]", "seg.test_scales=[1.0]", "seg.crf=false"]
    run_chain(slurm_cluster, repo, tmp_path, env, ["train", "infer", "refine", "segment", "segment-eval"],
              *SMALL, "train.max_steps=2", *seg)
    assert (run / "pseudo_labels" / "report.json").is_file()
    assert json.loads((run / "seg" / "summary.json").read_text())["steps"] == 2
    report = json.loads((run / "seg" / "eval" / "val" / "report.json").read_text())
    assert report["scored"] == 12 and report["miou"] is not None


def test_submit_chain_until_irn_infers_the_label_split_first(slurm_cluster, repo, tmp_path, synthetic_shards):
    """VWE_UNTIL=irn with irn.label_split other than data.infer_split: train -> infer + evaluate (val) ->
    CAMs of the label split -> relation labels -> relation network -> random walk, one job each, afterok."""
    run = tmp_path / "run"
    env = {**job_env(repo, tmp_path, synthetic_shards, 1), "VWE_UNTIL": "irn",
           "VWE_SBATCH_ARGS": f"--output={tmp_path}/%x-%j.out"}
    irn = ["data.infer_split=val", "irn.label_split=train", "irn.backbone=resnet18", "irn.pretrained=none",
           "irn.crop_size=64", "irn.radius=5", "irn.batch_size=4", "irn.max_steps=2", "irn.mixed_precision=no",
           "irn.checkpoint_every=0"]
    run_chain(slurm_cluster, repo, tmp_path, env,
              ["train", "infer", "infer-train", "irn-labels", "irn-train", "random-walk"],
              *SMALL, "train.max_steps=2", *irn)
    train_ids = json.loads((synthetic_shards / "train.json").read_text())["num_samples"]
    assert len(list((run / "irn" / "ir_labels").glob("*.png"))) == train_ids
    report = json.loads((run / "irn" / "pseudo_labels" / "report.json").read_text())
    assert report["split"] == "train" and report["num_images"] == train_ids and report["miou"] is not None
