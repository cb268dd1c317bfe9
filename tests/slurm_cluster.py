"""A private SLURM cluster on loopback for tests: munged, slurmctld and two slurmd ("node1" on
127.0.0.2, "node2" on 127.0.0.3), all on this machine, configured in a temporary folder.

Use from any test file:

    from tests.slurm_cluster import slurm_cluster  # noqa: F401  (the session fixture)

    @pytest.mark.slurm
    def test_x(slurm_cluster, tmp_path):
        job = slurm_cluster.sbatch("slurm/doctor.sbatch", "--timeout", "60",
                                   options=["-N", "2", f"--output={tmp_path}/%x-%j.out"],
                                   env={"VWE_CPU": "1", "VWE_PROCS_PER_NODE": "2"})
        info = slurm_cluster.wait_done(job, timeout=120)
        assert info["JobState"] == "COMPLETED"

Daemons run in the foreground as children of the test process and are stopped by pid in the fixture's
finalizer, also when a test fails. Nothing touches a system munged or slurm: own key, own socket, own
ports, SLURM_CONF pointing at the temporary slurm.conf.
"""
from __future__ import annotations

import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

NODES = {"node1": "127.0.0.2", "node2": "127.0.0.3"}
CPUS_PER_NODE = 4
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scontrol", "scancel", "srun")
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE")


def _which(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/sbin") / name) if p.exists()), None)


def missing_tools() -> list[str]:
    """Programs the cluster needs that are not installed (Debian: slurm-wlm, munge)."""
    return [n for n in (*DAEMONS, *CLIENTS) if _which(n) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parse_kv(text: str) -> dict[str, str]:
    """`scontrol show -o` output: space-separated key=value pairs (values without spaces)."""
    return dict(m.groups() for m in re.finditer(r"(\S+?)=(\S*)", text))


class SlurmCluster:
    """Handle on the running cluster: environment, submission and waiting helpers."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.nodes = list(NODES)
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._procs: list[tuple[str, subprocess.Popen]] = []

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        root = self.root
        for d in ("state", "munge", "log", *(f"spool/{n}" for n in NODES)):
            (root / d).mkdir(parents=True, exist_ok=True)
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.munge_socket = root / "munge" / "munge.socket"
        self._spawn("munged", [_which("munged"), "--foreground", "--force",
                               f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--pid-file={root}/munge/munged.pid", f"--log-file={root}/log/munged.log",
                               f"--seed-file={root}/munge/munged.seed"])
        self._wait(lambda: self.munge_socket.exists(), 20, "munged socket")
        self._write_conf()
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-f", str(self.conf)])
        self._wait(lambda: self.run("scontrol", "ping", check=False).returncode == 0, 30, "slurmctld ping")
        for node in NODES:
            self._spawn(f"slurmd-{node}", [_which("slurmd"), "-D", "-N", node, "-f", str(self.conf)])
        self._wait(self._nodes_idle, 60, "nodes idle in sinfo")

    def stop(self) -> None:
        """Stop every daemon this cluster started, by pid, newest first; SIGKILL stragglers."""
        for name, proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for name, proc in reversed(self._procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self._procs.clear()

    def _spawn(self, name: str, argv: list) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "wb")
        proc = subprocess.Popen([str(a) for a in argv], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        log.close()
        self._procs.append((name, proc))

    def _wait(self, ok, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self._procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"SLURM test cluster: {', '.join(dead)} exited early\n{self.daemon_logs()}")
            if ok():
                return
            time.sleep(0.3)
        raise RuntimeError(f"SLURM test cluster: timed out waiting for {what}\n{self.daemon_logs()}")

    def _nodes_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split("\n")
        states = dict(line.split() for line in out if line.strip())
        return all(states.get(n, "").startswith("idle") for n in NODES)

    def _write_conf(self) -> None:
        r = self.root
        user = getpass.getuser()
        host = socket.gethostname()
        ctl_port, node_ports = _free_port(), {n: _free_port() for n in NODES}
        lines = [
            "ClusterName=vwetest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctl_port}",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also sets how long a requeued job waits before it may start again.
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin",
            "SchedulerParameters=sched_interval=1",
            "SlurmdParameters=config_overrides",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "JobRequeue=1",
            "ReturnToService=2",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "InactiveLimit=0",
            "MinJobAge=600",
            "KillWait=10",
            "Waittime=0",
            "MessageTimeout=10",
            "MailProg=/bin/true",
            *(f"NodeName={n} NodeHostname={host} NodeAddr={addr} Port={node_ports[n]} "
              f"CPUs={CPUS_PER_NODE} RealMemory=2000 State=UNKNOWN" for n, addr in NODES.items()),
            f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    # ---- use ---------------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, timeout: float = 60, env: dict | None = None,
            cwd: Path | str | None = None) -> subprocess.CompletedProcess:
        """Run a SLURM client command (sbatch, squeue, scontrol, ...) against this cluster."""
        proc = subprocess.run(list(cmd), env={**self.env, **(env or {})}, cwd=cwd, text=True,
                              capture_output=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def sbatch(self, script: str | Path, *args: str, options: list[str] = (), env: dict | None = None,
               cwd: Path | str | None = None) -> int:
        """Submit a batch script; `options` go to sbatch, `args` to the script, `env` is exported."""
        out = self.run("sbatch", "--parsable", *options, str(script), *args, env=env, cwd=cwd).stdout
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, NodeList, ...)."""
        return _parse_kv(self.run("scontrol", "-o", "show", "job", str(job_id)).stdout)

    def wait_for(self, job_id: int, pred, timeout: float, what: str) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if pred(info):
                return info
            time.sleep(0.5)
        raise AssertionError(f"job {job_id}: timed out after {timeout:g} s waiting for {what}; "
                             f"last state {info}\n{self.daemon_logs(tail=40)}")

    def wait_done(self, job_id: int, timeout: float = 180) -> dict[str, str]:
        """Wait until the job has finished (any final state) and return its record."""
        return self.wait_for(job_id, lambda i: i.get("JobState") in FINISHED, timeout, "the job to finish")

    def cancel(self, job_id: int) -> None:
        self.run("scancel", str(job_id), check=False)

    def daemon_logs(self, tail: int = 30) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(parts)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running two-node SLURM cluster (session scope); skips when slurm-wlm/munge are missing."""
    missing = missing_tools()
    if missing:
        pytest.skip(f"SLURM test cluster needs Debian's slurm-wlm and munge packages; missing: "
                    f"{', '.join(missing)}")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
