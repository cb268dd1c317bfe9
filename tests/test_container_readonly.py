"""The container's entrypoint from a read-only installation (as Apptainer and enroot mount an image), with
no writable home: every write goes to the working directory's run folders or to $TMPDIR."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, TINY


@pytest.fixture
def readonly_install(tmp_path):
    install = tmp_path / "install"
    for part in ("vwe", "configs", "launch", "slurm", "docker"):
        shutil.copytree(REPO / part, install / part, ignore=shutil.ignore_patterns("__pycache__"))
    mounted = subprocess.run(["mount", "--bind", str(install), str(install)], capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("cannot bind-mount here (needs root)")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(install)], capture_output=True).returncode:
            pytest.skip("cannot remount read-only here")
        yield install
    finally:
        subprocess.run(["umount", "-l", str(install)])


def test_entrypoint_runs_from_a_readonly_install(readonly_install, tmp_path):
    install, work = readonly_install, tmp_path / "work"
    work.mkdir()
    with pytest.raises(OSError):
        (install / "probe").write_text("x")
    env = {**os.environ, "VWE_PYTHON": sys.executable, "VWE_HOME": str(install), "PYTHONPATH": str(install),
           "HOME": str(install), "TMPDIR": str(tmp_path / "tmp"), "VWE_CPU": "1", "OMP_NUM_THREADS": "1"}
    env.pop("VWE_LOG_DIR", None)
    env.pop("VWE_RUN_DIR", None)
    (tmp_path / "tmp").mkdir()

    def entry(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(install / "docker" / "entrypoint.sh"), *args], cwd=work, env=env, text=True,
                              capture_output=True, timeout=600)
        assert proc.returncode == 0, f"{args}: {proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        return proc

    where = entry(sys.executable, "-c", "import vwe; print(vwe.__file__)").stdout.strip()
    home = entry("bash", "-c", "echo $HOME").stdout.strip()
    assert home == str(tmp_path / "tmp" / f"vwe-home-{os.getuid()}")
    entry("synth", "--out", "voc", "--train", "12", "--val", "4", "--size", "64")
    entry("prepare", "--voc", "voc", "--out", "shards", "--shard-size", "6")
    entry("train", "--config", str(install / "configs" / "demo.yaml"), *TINY, "data.root=shards",
          "output.run_dir=runs/demo", "train.max_steps=2", "train.checkpoint_every=0")
    assert (work / "runs" / "demo" / "final" / "model.safetensors").is_file()
    entry("slurm-launch", "doctor", "--timeout", "120")
    logs = work / "runs" / "logs" / "local"
    assert logs.is_dir() and any(logs.rglob("*.log")), "per-rank logs default to <run dirs>/logs"
    assert where.startswith(str(install))
