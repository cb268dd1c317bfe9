"""The project's own sbatch scripts on a real (private, two-node, loopback) SLURM cluster."""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import slurm_cluster  # noqa: F401  (session fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]

HOLDING = r"vwe doctor: rank=\d+ holding for up to"
RANK_LINE = re.compile(r"vwe doctor: rank=(\d+) local_rank=(\d+) world=(\d+) .*?node_id=(\S+)")


def cpu_env(tmp_path: Path, procs: int) -> dict:
    """What a CPU user exports before sbatch; sbatch passes the environment to the job."""
    return {"VWE_CPU": "1", "VWE_PROCS_PER_NODE": str(procs), "VWE_PYTHON": sys.executable,
            "VWE_LOG_DIR": str(tmp_path / "logs"), "OMP_NUM_THREADS": "1"}


def wait_for_text(path: Path, pattern: str, count: int, timeout: float, cluster, job: int) -> str:
    """Wait until the job log has `count` matches of the regex `pattern`; return the log."""
    deadline = time.monotonic() + timeout
    content = ""
    while time.monotonic() < deadline:
        content = path.read_text(errors="replace") if path.exists() else ""
        if len(re.findall(pattern, content)) >= count:
            return content
        if cluster.job(job).get("JobState") in ("FAILED", "CANCELLED", "COMPLETED", "TIMEOUT"):
            break
        time.sleep(0.3)
    raise AssertionError(f"{path}: expected {count} x {pattern!r} within {timeout:g} s; job "
                         f"{cluster.job(job)}\n--- log\n{content}")


def test_doctor_two_nodes_four_ranks(slurm_cluster, repo, tmp_path):
    job = slurm_cluster.sbatch(repo / "slurm" / "doctor.sbatch", "--timeout", "120",
                               options=["-N", "2", f"--output={tmp_path}/%x-%j.out"],
                               env=cpu_env(tmp_path, 2), cwd=tmp_path)
    info = slurm_cluster.wait_done(job, timeout=200)
    log = (tmp_path / f"vwe-doctor-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log}"
    assert info["NodeList"] == "node[1-2]"
    ranks = {int(m[1]): (int(m[3]), m[4]) for m in RANK_LINE.finditer(log)}
    assert sorted(ranks) == [0, 1, 2, 3], log
    assert {world for world, _ in ranks.values()} == {4}
    assert sorted(node for _, node in ranks.values()) == ["0", "0", "1", "1"]
    assert "vwe doctor: world 4 ok: backend gloo, 2 node(s): node1(" in log
    # Per-rank logs: <VWE_LOG_DIR>/<job>/run0/node<id>/<torchrun run>/attempt_0/<local rank>/stdout.log
    for node in ("0", "1"):
        files = sorted((tmp_path / "logs" / str(job) / "run0" / f"node{node}").glob("*/attempt_0/*/stdout.log"))
        assert [f.parent.name for f in files] == ["0", "1"], files
        for f in files:
            (line,) = RANK_LINE.findall(f.read_text())
            assert line[1] == f.parent.name and line[2] == "4" and line[3] == node


def test_failure_is_not_requeued(slurm_cluster, repo, tmp_path):
    job = slurm_cluster.sbatch(repo / "slurm" / "doctor.sbatch", "--timeout", "-1",
                               options=["-N", "1", f"--output={tmp_path}/%x-%j.out"],
                               env=cpu_env(tmp_path, 1), cwd=tmp_path)
    info = slurm_cluster.wait_done(job, timeout=120)
    log = (tmp_path / f"vwe-doctor-{job}.out").read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "1:0", f"{info}\n{log}"
    assert info["Restarts"] == "0"
    assert "--timeout must be positive" in log
    assert "requeueing" not in log


def test_usr1_checkpoint_exit_75_requeues(slurm_cluster, repo, tmp_path):
    """The preemption path end to end: USR1 to the batch shell (as `--signal=B:USR1@N` does) is
    forwarded to every rank on both nodes, they exit 75, the script requeues, the job runs again."""
    job = slurm_cluster.sbatch(repo / "slurm" / "doctor.sbatch", "--timeout", "120", "--hold", "300",
                               options=["-N", "2", f"--output={tmp_path}/%x-%j.out"],
                               env=cpu_env(tmp_path, 1), cwd=tmp_path)
    out = tmp_path / f"vwe-doctor-{job}.out"
    wait_for_text(out, HOLDING, 2, 150, slurm_cluster, job)
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", str(job))
    slurm_cluster.wait_for(job, lambda i: i.get("Restarts") == "1", 120, "the requeue")
    log = wait_for_text(out, HOLDING, 4, 150, slurm_cluster, job)
    first, second = log.split("(restart 1)")
    for rank in (0, 1):
        assert f"vwe doctor: rank={rank} got SIGUSR1: exiting with the preemption code 75" in first
    assert first.count("stopped after SIGUSR1 (launcher exit 1): exit 75") == 2  # one per node
    assert "batch: step 'vwe doctor' exited with 75" in first
    assert f"batch: preempted (exit 75): requeueing job {job} (restarts so far: 0)" in first
    assert "vwe doctor: world 2 ok" in second
    # A plain scancel (SIGTERM) ends the job for good: not requeued by the script.
    slurm_cluster.cancel(job)
    info = slurm_cluster.wait_done(job, timeout=90)
    log = out.read_text()
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "1", info
    assert "not requeueing" in log.split("(restart 1)")[1]


def test_submit_chains_prepare_train_infer(slurm_cluster, repo, tmp_path):
    """submit.sh: three jobs, each depending on the previous with afterok (submitted held, then
    cancelled: what runs inside is covered by the tests of each script)."""
    env = {**cpu_env(tmp_path, 1), "VWE_CONFIG": str(repo / "configs" / "demo.yaml"), "VWE_NODES": "2",
           "VWE_VOC": str(tmp_path / "voc"), "VWE_SHARDS": str(tmp_path / "shards"),
           "VWE_SBATCH_ARGS": f"--hold --output={tmp_path}/%x-%j.out"}
    out = slurm_cluster.run(str(repo / "slurm" / "submit.sh"), "train.epochs=1", env=env, cwd=tmp_path).stdout
    ids = dict(line.split() for line in out.strip().splitlines())
    try:
        assert list(ids) == ["prepare", "train", "infer"], out
        jobs = {stage: slurm_cluster.job(int(i)) for stage, i in ids.items()}
        assert jobs["prepare"]["JobName"] == "vwe-prepare" and jobs["prepare"]["Dependency"] == "(null)"
        assert jobs["train"]["Dependency"].startswith(f"afterok:{ids['prepare']}")
        assert jobs["infer"]["Dependency"].startswith(f"afterok:{ids['train']}")
        assert jobs["train"]["NumNodes"].split("-")[0] == "2" and jobs["infer"]["NumNodes"].split("-")[0] == "2"
        assert jobs["train"]["Command"] == str(repo / "slurm" / "train.sbatch")
        assert jobs["train"]["Requeue"] == "1"
        assert all(j["JobState"] == "PENDING" for j in jobs.values())
    finally:
        for i in ids.values():
            slurm_cluster.cancel(int(i))
