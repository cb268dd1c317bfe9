"""Checkpoints and resume with real processes (issue 21): altered checkpoint weights refused by infer, other
data at the same root refused and the same data under another spelling of the root resumed, a preemption
signal during start-up, a full disk during a checkpoint and the resume after it, over-long paths, and
nothing written before the checks that can fail."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, launch_cmd, run_vwe
from helpers import DEMO, ENV, ok, run_train, summary, train_args
from vwe.runtime.errors import WriteError

SHORT = ("train.max_steps=4", "train.checkpoint_every=2")


@pytest.fixture(scope="module")
def finished(synthetic_shards, tmp_path_factory) -> Path:
    """A finished 4-step run (checkpoints at 2 and 4), copied by the tests that change it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    ok(run_train(1, synthetic_shards, run, *SHORT))
    return run


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / ".lock").unlink(missing_ok=True)
    return dst


def no_traceback(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    return proc.stderr


def test_infer_refuses_a_checkpoint_folder_whose_weights_were_altered(synthetic_shards, finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    ckpt = run / "checkpoints" / "step-000002"
    from safetensors.torch import load_file, save_file
    weights = load_file(str(ckpt / "model.safetensors"))
    save_file({k: v * 2 if v.is_floating_point() else v for k, v in weights.items()}, str(ckpt / "model.safetensors"))
    proc = run_vwe("infer", "--config", DEMO, *TINY, f"data.root={synthetic_shards}", f"output.run_dir={run}",
                   f"infer.weights={ckpt}", f"infer.out_dir={tmp_path / 'cams'}", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (f"checkpoint {ckpt} failed verification: {ckpt / 'model.safetensors'} does not match the SHA-256"
            in no_traceback(proc))
    assert not list((tmp_path / "cams").glob("*.npz")) if (tmp_path / "cams").exists() else True


def test_other_data_at_the_same_root_is_refused_on_resume(synthetic_shards, tmp_path):
    from vwe.data.synthetic import write_dataset
    try:
        from vwe.data.prepare import prepare
    except ImportError:  # before the data package's split
        from vwe.data.shards import prepare
    root = shutil.copytree(synthetic_shards, tmp_path / "shards")
    run = tmp_path / "run"
    ok(run_train(1, root, run, "train.max_steps=2", "train.checkpoint_every=2"))
    shutil.rmtree(root)
    write_dataset(tmp_path / "voc_b", n_train=48, n_val=12, seed=7, size=80, sbd=False)
    prepare(tmp_path / "voc_b", None, root, shard_size=10)
    proc = run_train(1, root, run, "train.max_steps=2", "train.checkpoint_every=2")
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = no_traceback(proc)
    assert "in settings that change the result" in err and "data (training shards): checkpoint '5 shard(s) of split " \
                                                             "train, digest" in err
    assert f", in {root}', now '5 shard(s) of split train, digest" in err


def test_relative_root_resumes_from_another_directory_given_absolutely(synthetic_shards, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    shutil.copytree(synthetic_shards, first / "shards")
    second.mkdir()
    run = tmp_path / "run"
    extra = ["train.max_steps=4", "train.checkpoint_every=2"]
    ok(subprocess.run(launch_cmd(1, *train_args(Path("shards"), run, *extra)), cwd=first, env=ENV, text=True,
                      capture_output=True, timeout=600))
    shutil.rmtree(run / "checkpoints" / "step-000004")  # as if killed after step 2
    shutil.rmtree(run / "final")
    proc = ok(subprocess.run(launch_cmd(1, *train_args(first / "shards", run, *extra)), cwd=second,
                             env=ENV, text=True, capture_output=True, timeout=600))
    assert f"resumed from {run / 'checkpoints' / 'step-000002'}" in proc.stderr
    assert f"note: data.root: checkpoint 'shards', now '{first / 'shards'}' (does not change the result)" in proc.stderr
    assert summary(run)["steps"] == 4 and summary(run)["steps_this_run"] == 2


def _catches(pid: int, sig: int) -> bool:
    """Whether the process has a handler for `sig` (SigCgt in /proc)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    except OSError:
        pass
    return False


def test_sigusr1_during_start_up_exits_75(synthetic_shards, tmp_path):
    run = tmp_path / "run"
    cmd = launch_cmd(1, *train_args(synthetic_shards, run, "train.max_steps=4", "train.checkpoint_every=2"))
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    end = time.time() + 60
    while not _catches(proc.pid, signal.SIGUSR1):  # the CLI's start-up handler, long before the Trainer's
        assert proc.poll() is None and time.time() < end, proc.communicate()
        time.sleep(0.005)
    assert not (run / "metrics.jsonl").exists()  # the Trainer has not started
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 75, err[-3000:]
    assert f"preempted (signal {int(signal.SIGUSR1)}) before the first step: nothing new to save, the next launch starts from " \
           "the start (step 0); exiting with code 75" in err
    assert not list((run / "checkpoints").glob("step-*")) if (run / "checkpoints").exists() else True
    ok(run_train(1, synthetic_shards, run, "train.max_steps=4", "train.checkpoint_every=2"))
    assert summary(run)["steps"] == 4


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=150m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_disk_full_at_a_checkpoint_is_named_and_the_resume_continues(synthetic_shards, small_tmpfs):
    run = small_tmpfs / "run"
    extra = ("train.max_steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=3")
    proc = run_train(1, synthetic_shards, run, *extra)  # one checkpoint (~86 MB) fits in 150 MB, two do not
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = no_traceback(proc)
    assert (f"cannot write checkpoint {run / 'checkpoints' / '.tmp-step-000004'}: no space left on the device "
            f"{small_tmpfs} (needs about") in err and "MB free)" in err
    needed = int(err.split("needs about ")[1].split()[0])
    free = int(err.split("MB, ")[1].split()[0])
    assert 80 <= needed <= 100 and free < needed
    good = run / "checkpoints" / "step-000002"
    from vwe.formats.checkpoint import verify_checkpoint
    assert verify_checkpoint(good) is None and not list((run / "checkpoints").glob(".tmp-*"))
    subprocess.run(["mount", "-o", "remount,size=400m", str(small_tmpfs)], check=True)
    proc = ok(run_train(1, synthetic_shards, run, *extra))
    assert f"resumed from {good} at step 2" in proc.stderr
    assert summary(run)["steps"] == 6 and summary(run)["steps_this_run"] == 4


@pytest.mark.parametrize("where", ["run_dir", "config"])
def test_path_component_over_255_characters_is_named(synthetic_shards, tmp_path, where):
    long = "r" * 300
    if where == "run_dir":
        run = tmp_path / long / "run"
        proc = run_train(1, synthetic_shards, run, "train.max_steps=2")
        target = run
    else:
        proc = run_vwe("train", "--config", str(tmp_path / f"{long}.yaml"), check=False)
        target = tmp_path / f"{long}.yaml"
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = no_traceback(proc)
    assert str(target) in err and "is 300 bytes long, more than the file system allows" in err or \
        "is 305 bytes long" in err, err


def _no_run_dir_written(run: Path) -> None:
    written = sorted(p.name for p in run.iterdir()) if run.exists() else []
    assert not written, f"written before the check failed: {written}"


def test_nothing_written_before_the_checks_that_can_fail(synthetic_shards, tmp_path):
    proc = run_train(1, synthetic_shards, tmp_path / "hspp", "data.crop_size=32", "model.pool_levels=[1, 2, 4]")
    assert proc.returncode == 2 and "does not fit the 2x2 feature map of a data.crop_size=32 crop" in no_traceback(proc)
    _no_run_dir_written(tmp_path / "hspp")

    shards = shutil.copytree(synthetic_shards, tmp_path / "shards")
    tar = sorted(shards.glob("train-*.tar"))[0]
    data = bytearray(tar.read_bytes())
    data[600] ^= 0xFF  # same size, other content
    tar.write_bytes(bytes(data))
    proc = run_train(1, shards, tmp_path / "sha", "train.max_steps=2")
    assert proc.returncode == 2 and "does not match its index" in no_traceback(proc)
    _no_run_dir_written(tmp_path / "sha")

    proc = run_train(1, synthetic_shards, tmp_path / "resume", f"train.resume={tmp_path / 'nowhere'}")
    assert proc.returncode == 2 and f"checkpoint folder {tmp_path / 'nowhere'} does not exist" in no_traceback(proc)
    _no_run_dir_written(tmp_path / "resume")

    (tmp_path / "file").write_text("x")
    proc = run_train(1, synthetic_shards, tmp_path / "resume", f"train.resume={tmp_path / 'file'}")
    assert proc.returncode == 2 and f"train.resume: {tmp_path / 'file'} is a file, not a checkpoint folder" \
        in no_traceback(proc)
    _no_run_dir_written(tmp_path / "resume")


def test_a_lock_that_is_a_directory_is_named(tmp_path):

    from vwe.runtime.lock import RunLock
    (tmp_path / "run" / ".lock").mkdir(parents=True)
    with pytest.raises(WriteError, match=f"cannot write lock file {tmp_path / 'run' / '.lock'}: it is a directory"):
        RunLock(tmp_path / "run", "vwe train").acquire()


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo never",))


@pytest.mark.parametrize("reader", ["backbone", "import"])
def test_a_malicious_pth_is_refused_without_advice_to_unpickle_it(tmp_path, reader):
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Payload()}, path)
    from vwe.runtime.errors import VweError
    if reader == "backbone":
        from vwe.nets.backbone import read_state_dict as read
    else:
        from vwe.tools.import_weights import read_authors_file as read
    with pytest.raises(VweError) as e:
        read(path)
    text = str(e.value)
    assert str(path) in text and "refused" in text and "posix.system" in text
    assert "weights_only" not in text and "False" not in text and "trusted source" not in text, text
