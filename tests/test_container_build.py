"""The image built and run for real with podman: a Debian base made by debootstrap, docker/Dockerfile built
on it (scripts/container-build.sh), then run as a user would on a cluster: an arbitrary uid with no home in
the image, a read-only root file system, no network, the work in a bind-mounted folder.

Measured on a 2-core machine with PyPI wheels from a local mirror: cold 4-7 min for the whole module
(debootstrap ~45 s; pip install of torch's CUDA build and the rest, and committing the 6.6 GB image, ~3
min; the runs ~30 s). Warm, with the base tarball in /var/cache/vwe-container and the image's layers in
podman's storage: ~30 s when only the code changed, ~4 min when setup.cfg changed. The image
(localhost/vwe:test) stays for the next run: `podman rmi localhost/vwe:test` frees it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, REQUIRE_ALL, TINY

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

IMAGE = "localhost/vwe:test"
UID = GID = 12345  # a uid the image does not know (its own user is 1000)


def _unavailable(msg: str) -> None:
    if REQUIRE_ALL:
        pytest.fail(f"{msg} (VWE_REQUIRE_ALL=1: the container test must run; .ci/run installs what it needs)")
    pytest.skip(msg)


@pytest.fixture(scope="module")
def podman_env() -> dict:
    for tool in ("podman", "runc", "debootstrap"):
        if shutil.which(tool) is None:
            _unavailable(f"{tool} is not installed (apt-get install podman runc debootstrap)")
    if os.geteuid() != 0:
        _unavailable("building images with podman and debootstrap needs root here")
    cache = os.environ.get("VWE_CONTAINER_CACHE", "/var/cache/vwe-container")
    # the containers.conf that scripts/container-build.sh writes (runc, cgroupfs, no default ulimits)
    return {**os.environ, "VWE_CONTAINER_CACHE": cache,
            "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF") or f"{cache}/containers.conf"}


@pytest.fixture(scope="module")
def image(podman_env) -> str:
    proc = subprocess.run([str(REPO / "scripts" / "container-build.sh"), IMAGE], env=podman_env, text=True,
                          capture_output=True, timeout=3000)
    assert proc.returncode == 0, f"image build failed:\n{proc.stderr[-8000:]}"
    assert proc.stdout.strip().splitlines()[-1] == IMAGE
    return IMAGE


@pytest.fixture
def work(tmp_path) -> Path:
    """The bind-mounted working folder, owned by the uid the container runs as."""
    work = tmp_path / "work"
    work.mkdir()
    os.chown(work, UID, GID)
    return work


def run(podman_env: dict, image: str, work: Path, *args: str, env: dict | None = None, check: bool = True,
        timeout: float = 900) -> subprocess.CompletedProcess:
    # --passwd=false: as under `docker run --user`, the uid gets no passwd entry and no home (podman would
    # make the working directory its home)
    cmd = ["podman", "run", "--rm", "--read-only", "--network=none", f"--user={UID}:{GID}", "--passwd=false",
           "--volume", f"{work}:/work", "--workdir", "/work", "--env", "VWE_CPU=1", "--env", "OMP_NUM_THREADS=1"]
    for key, value in (env or {}).items():
        cmd += ["--env", f"{key}={value}"]
    proc = subprocess.run([*cmd, image, *args], env=podman_env, text=True, capture_output=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, (f"{' '.join(args)}: exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}"
                                      f"\n--- stderr\n{proc.stderr[-5000:]}")
    return proc


def owned_by_caller(root: Path) -> None:
    paths = [root, *root.rglob("*")]
    wrong = [f"{p} ({p.lstat().st_uid}:{p.lstat().st_gid})" for p in paths
             if (p.lstat().st_uid, p.lstat().st_gid) != (UID, GID)]
    assert not wrong, f"not owned by {UID}:{GID}: {wrong[:5]}"


def test_image_runs_readonly_as_any_uid(podman_env, image, work):
    from vwe import __version__
    assert run(podman_env, image, work, "vwe", "--version").stdout.strip() == f"vwe {__version__}"
    assert run(podman_env, image, work, "--version").stdout.strip() == f"vwe {__version__}"
    assert "usage: vwe" in run(podman_env, image, work).stdout  # CMD: --help
    probe = run(podman_env, image, work, "bash", "-c",
                'echo "$HOME"; id -u; touch /opt/vwe/probe 2>/dev/null && echo writable || echo read-only; '
                'command -v g++ || echo no-compiler; python3 -c "import torch, pydensecrf.densecrf; '
                'print(torch.__version__, torch.cuda.is_available())"').stdout.split("\n")
    assert probe[:4] == [f"/tmp/vwe-home-{UID}", str(UID), "read-only", "no-compiler"], probe
    assert probe[4].endswith(" False"), probe  # torch imports (its CUDA build) on a machine with no GPU
    offline = run(podman_env, image, work, "python3", "-c",
                  "import urllib.request; urllib.request.urlopen('http://deb.debian.org', timeout=5)", check=False)
    assert offline.returncode != 0 and "URLError" in offline.stderr, offline.stderr[-2000:]  # --network=none


def test_synth_prepare_train_into_a_bind_mount(podman_env, image, work):
    run(podman_env, image, work, "synth", "--out", "voc", "--train", "12", "--val", "4", "--size", "64")
    run(podman_env, image, work, "prepare", "--voc", "voc", "--out", "shards", "--shard-size", "6")
    run(podman_env, image, work, "train", "--config", "/opt/vwe/configs/demo.yaml", *TINY, "data.root=shards",
        "output.run_dir=runs/demo", "train.max_steps=2", "train.checkpoint_every=0")
    assert (work / "shards").is_dir() and any((work / "shards").rglob("*.tar"))
    assert (work / "runs" / "demo" / "final" / "model.safetensors").is_file()
    owned_by_caller(work)


def test_slurm_launch_entrypoint(podman_env, image, work):
    """`srun ... <image> /usr/local/bin/vwe-entrypoint slurm-launch SUBCOMMAND` on one node of a job: the
    SLURM variables reach slurm/launch.sh inside the image, which starts accelerate for the node's processes
    (two gloo ranks here) and writes the per-rank logs under the bind-mounted run folder."""
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0", "SLURM_PROCID": "0",
             "SLURM_RESTART_COUNT": "0", "VWE_MASTER_ADDR": "127.0.0.1", "VWE_PROCS_PER_NODE": "2",
             "VWE_RUN_DIR": "/work/runs/slurm"}
    proc = run(podman_env, image, work, "/usr/local/bin/vwe-entrypoint", "slurm-launch", "doctor", "--timeout",
               "120", env=slurm)
    assert "launch.sh: node 0/1" in proc.stdout and "head 127.0.0.1:24242" in proc.stdout, proc.stdout
    assert "vwe doctor: world 2 ok" in proc.stdout, proc.stdout
    logs = work / "runs" / "slurm" / "logs" / "4242" / "run0" / "node0"
    assert logs.is_dir() and len(list(logs.rglob("stdout.log"))) == 2, sorted(map(str, work.rglob("*")))
    owned_by_caller(work)
