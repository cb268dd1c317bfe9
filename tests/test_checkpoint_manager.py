"""The checkpoint manager on small real objects, in process: save, verify, fallback, retention, drift and
data refusal, the divergence quarantine, free space, restore through load_state_dict. The whole runs
(SIGKILL, SIGTERM, corrupt files, full disks) are in test_train*.py and test_checkpoint_runs.py."""
from __future__ import annotations

import dataclasses
import errno
import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from vwe.formats.checkpoint import (complete_checkpoints, data_digest, load_weights, step_folder,
                                    verify_checkpoint)
from vwe.formats.config import load_config
from vwe.runtime.errors import CheckpointError, ConfigDrift, NonFinite, WriteError

from vwe.training.checkpointer import CheckpointManager, DataRecord
from vwe.training.recipe import CamRecipe
from vwe.training.setup import Parts, PolySchedule, TrainState, poly_factor

MAX_STEPS = 10


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(4, 3)
        self.head = torch.nn.Linear(3, 2)
        self.register_buffer("seen", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


def make_parts(*overrides: str) -> Parts:
    cfg = load_config(None, ["train.batch_size=4", "train.keep_checkpoints=2", "train.checkpoint_every=2",
                             *overrides])
    torch.manual_seed(0)
    net = TinyNet()
    optimizer = torch.optim.SGD([{"name": "body", "params": net.body.parameters(), "lr": cfg.train.lr},
                                 {"name": "head", "params": net.head.parameters(), "lr": cfg.train.lr * 10}],
                                lr=cfg.train.lr, momentum=0.9)
    acc = Accelerator(cpu=True)
    model, optimizer = acc.prepare(net, optimizer)
    return Parts(cfg=cfg, model_cfg=cfg.model, accelerator=acc, engine=model, net=acc.unwrap_model(model),
                 optimizer=optimizer, scheduler=PolySchedule(optimizer, MAX_STEPS, cfg.train.poly_power),
                 input_dtype=torch.float32, micro_batch=4, steps_per_epoch=5, max_steps=MAX_STEPS,
                 recipe=CamRecipe())


DATA = DataRecord("train_aug", "/data/shards", 2, data_digest(["a" * 64, "b" * 64]))


def train(parts: Parts, state: TrainState, steps: int) -> None:
    """`steps` optimizer steps on fixed random batches, the counters advanced as the Trainer does."""
    for _ in range(steps):
        x = torch.randn(4, 4)
        loss = parts.engine(x).square().mean()
        loss.backward()
        parts.optimizer.step()
        parts.scheduler.step()
        parts.optimizer.zero_grad()
        state.step += 1
        state.micro += 1
        state.samples += 4


def snapshot(parts: Parts) -> dict:
    return {"model": {k: v.clone() for k, v in parts.net.state_dict().items()},
            "momentum": [parts.optimizer.state[p]["momentum_buffer"].clone() for p in parts.net.parameters()],
            "lr": [g["lr"] for g in parts.optimizer.param_groups]}


def same(a: dict, b: dict) -> bool:
    return (a["lr"] == b["lr"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
            and all(torch.equal(x, y) for x, y in zip(a["momentum"], b["momentum"])))


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return tmp_path / "run"


def saved_run(run_dir: Path, steps: tuple[int, ...] = (2, 4)) -> tuple[dict, TrainState]:
    """A run saved at each of `steps`; returns the snapshot and counters at the last one."""
    parts = make_parts()
    manager, state = CheckpointManager(parts, run_dir, DATA), TrainState()
    for step in steps:
        train(parts, state, step - state.step)
        manager.save(state)
    return snapshot(parts), state


def test_save_records_every_file_the_state_and_the_data(run_dir):
    saved_run(run_dir, (2,))
    folder = step_folder(run_dir, 2)
    meta = json.loads((folder / "meta.json").read_text())
    assert {"model.safetensors", "optimizer.bin"} <= set(meta["files"]) and verify_checkpoint(folder) is None
    assert meta["progress"]["step"] == 2 and meta["schedule"] == {"step": 2}
    assert meta["data"] == dataclasses.asdict(DATA)
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def test_resume_restores_every_piece_through_its_state_dict(run_dir):
    expected, state_then = saved_run(run_dir)
    parts = make_parts()  # fresh weights, no momentum, the schedule at step 0
    assert parts.optimizer.param_groups[0]["lr"] == parts.cfg.train.lr
    state, resumed = CheckpointManager(parts, run_dir, DATA).resume()
    assert resumed.path == step_folder(run_dir, 4) and state == state_then
    assert same(snapshot(parts), expected)
    assert parts.scheduler.state_dict() == {"step": 4}
    assert parts.optimizer.param_groups[0]["lr"] == parts.cfg.train.lr * poly_factor(4, MAX_STEPS, 0.9)


def test_continuing_after_resume_is_bit_identical(run_dir, tmp_path):
    saved_run(run_dir)
    torch.manual_seed(1)
    straight = make_parts()
    train(straight, TrainState(), 4)
    torch.manual_seed(1)  # the batches of steps 5-6 come from this seed in both runs
    train(straight, TrainState(step=4), 2)
    parts = make_parts()
    state, _ = CheckpointManager(parts, run_dir, DATA).resume()
    torch.manual_seed(1)
    train(parts, state, 2)
    # the straight run drew other batches for steps 1-4: compare against a run resumed the same way
    again = make_parts()
    state2, _ = CheckpointManager(again, run_dir, DATA).resume()
    torch.manual_seed(1)
    train(again, state2, 2)
    assert same(snapshot(parts), snapshot(again))


def test_corrupt_newest_falls_back_and_is_moved_aside(run_dir):
    saved_run(run_dir)
    newest = step_folder(run_dir, 4)
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"tampered")
    state, resumed = CheckpointManager(make_parts(), run_dir, DATA).resume()
    assert resumed.path == step_folder(run_dir, 2) and state.step == 2
    assert any(f"checkpoint {newest} failed verification" in n and str(weights) in n for n in resumed.notes)
    assert (run_dir / "checkpoints" / "corrupt-step-000004" / "model.safetensors").is_file()
    assert complete_checkpoints(run_dir) == [step_folder(run_dir, 2)]


def test_no_intact_checkpoint_is_an_error(run_dir):
    saved_run(run_dir)
    for folder in complete_checkpoints(run_dir):
        (folder / "optimizer.bin").write_bytes(b"planted")
    with pytest.raises(CheckpointError, match="no intact checkpoint left to resume from"):
        CheckpointManager(make_parts(), run_dir, DATA).resume()


def test_retention_keeps_the_newest(run_dir):
    saved_run(run_dir, (2, 4, 6))  # keep_checkpoints=2
    assert [p.name for p in complete_checkpoints(run_dir)] == ["step-000004", "step-000006"]


def test_when_to_save():
    manager = CheckpointManager(make_parts(), Path("unused"), DATA)
    assert [s for s in range(1, 7) if manager.due(TrainState(step=s))] == [2, 4, 6]
    never = CheckpointManager(make_parts("train.checkpoint_every=0"), Path("unused"), DATA)
    assert not any(never.due(TrainState(step=s)) for s in range(1, 7))


def test_result_changing_config_is_refused_then_allowed_and_recorded(run_dir):
    saved_run(run_dir)
    with pytest.raises(ConfigDrift, match=r"train.lr: checkpoint 0.01, now 0.5"):
        CheckpointManager(make_parts("train.lr=0.5"), run_dir, DATA).preview_resume()
    parts = make_parts("train.lr=0.5", "train.resume_changed=allow")
    manager = CheckpointManager(parts, run_dir, DATA)
    state, resumed = manager.resume()
    assert manager.changes == [{"step": 4, "key": "train.lr", "checkpoint": 0.01, "now": 0.5}]
    # the new lr applies from the checkpoint's step on (the schedule's base comes from the config)
    assert parts.optimizer.param_groups[0]["lr"] == 0.5 * poly_factor(4, MAX_STEPS, 0.9)
    neutral = CheckpointManager(make_parts("train.log_every=3"), run_dir, DATA).preview_resume()
    assert neutral.notes == ["note: train.log_every: checkpoint 10, now 3 (does not change the result)"]


def test_other_data_is_refused_whatever_the_root_says(run_dir):
    saved_run(run_dir)
    other = dataclasses.replace(DATA, digest=data_digest(["c" * 64, "b" * 64]))
    with pytest.raises(ConfigDrift, match=r"data \(training shards\): checkpoint '2 shard\(s\) of split train_aug, digest "
                                        r"5e9ae866add9a85d, in /data/shards', now '2 shard\(s\) of split train_aug, "
                                        r"digest 1f1c336ab1ca0393, in /data/shards'"):
        CheckpointManager(make_parts(), run_dir, other).preview_resume()
    # the same shards under another spelling of the root (relative, moved, absolute) resume
    moved = CheckpointManager(make_parts("data.root=elsewhere/shards"), run_dir,
                              dataclasses.replace(DATA, root="/elsewhere/shards")).preview_resume()
    assert moved.notes == ["note: data.root: checkpoint 'data/shards', now 'elsewhere/shards' "
                           "(does not change the result)"]


def test_checkpoint_of_another_model_shape_is_refused(run_dir):
    saved_run(run_dir)
    with pytest.raises(CheckpointError, match="another model shape"):
        CheckpointManager(make_parts("model.num_words=8"), run_dir, DATA).preview_resume()


@pytest.mark.parametrize("how", ["file", "missing"])
def test_explicit_resume_path_says_what_it_is(run_dir, tmp_path, how):
    target = tmp_path / "weights.safetensors"
    if how == "file":
        target.write_bytes(b"x")
    manager = CheckpointManager(make_parts(f"train.resume={target}"), run_dir, DATA)
    expected = "is a file, not a checkpoint folder" if how == "file" else "does not exist"
    with pytest.raises(CheckpointError, match=f"train.resume: .*{expected}"):
        manager.preview_resume()
    assert not run_dir.exists()


def test_divergence_moves_aside_the_checkpoint_that_made_it(run_dir):
    saved_run(run_dir, (2, 4))
    manager = CheckpointManager(make_parts(), run_dir, DATA)
    error = manager.quarantine_diverged(TrainState(step=5), "loss=nan")
    assert isinstance(error, NonFinite)
    assert "non-finite loss at step 5" in str(error) and f"last good checkpoint is {step_folder(run_dir, 2)}" in str(error)
    assert (run_dir / "checkpoints" / "diverged-step-000004").is_dir()


def test_nothing_non_finite_is_saved(run_dir):
    parts = make_parts()
    with torch.no_grad():
        parts.net.head.weight[0, 0] = float("nan")
    with pytest.raises(NonFinite, match="tensor head.weight holds NaN or Inf"):
        CheckpointManager(parts, run_dir, DATA).save(TrainState(step=2))
    assert not complete_checkpoints(run_dir)


def test_too_little_space_is_refused_before_writing(run_dir, monkeypatch):
    saved_run(run_dir, (2,))
    parts = make_parts()
    manager = CheckpointManager(parts, run_dir, DATA)
    state, _ = manager.resume()
    train(parts, state, 2)
    monkeypatch.setattr("vwe.formats.checkpoint.free_bytes", lambda path: 1000)
    with pytest.raises(WriteError) as e:
        manager.save(state)
    needed = -(-manager.expected_bytes() // (1 << 20))
    assert f"cannot write checkpoint {run_dir / 'checkpoints' / '.tmp-step-000004'}: no space left on the device " \
           in str(e.value)
    assert f"(needs about {needed} MB, 0 MB free)" in str(e.value)
    assert complete_checkpoints(run_dir) == [step_folder(run_dir, 2)] and verify_checkpoint(step_folder(run_dir, 2)) is None
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter "
                                                "failed writing file data/0: file write failed")])
def test_device_filling_up_during_the_write_is_named(run_dir, monkeypatch, error):
    saved_run(run_dir, (2,))
    parts = make_parts()
    manager = CheckpointManager(parts, run_dir, DATA)
    state, _ = manager.resume()
    train(parts, state, 2)

    def fails(path, **kwargs):
        Path(path, "model.safetensors").write_bytes(b"partial")
        raise error
    monkeypatch.setattr(parts.accelerator, "save_state", fails)
    if isinstance(error, RuntimeError):  # torch's message names no cause: the free space decides
        monkeypatch.setattr("vwe.formats.checkpoint.free_bytes", lambda path: 1000)
    with pytest.raises(WriteError, match=r"cannot write checkpoint .*\.tmp-step-000004: no space left on the device "
                                         r"/.* \(needs about \d+ MB, \d+ MB free\)"):
        manager.save(state)
    assert complete_checkpoints(run_dir) == [step_folder(run_dir, 2)]
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    state, resumed = CheckpointManager(make_parts(), run_dir, DATA).resume()
    assert state.step == 2 and resumed.path == step_folder(run_dir, 2)


def test_weights_of_a_checkpoint_folder_are_verified_before_use(run_dir):
    saved_run(run_dir, (2,))
    weights = step_folder(run_dir, 2) / "model.safetensors"
    state, _ = load_weights(weights)
    assert set(state) == {"body.weight", "body.bias", "head.weight", "head.bias", "seen"}
    from safetensors.torch import save_file
    save_file({k: torch.zeros_like(v) for k, v in state.items()}, str(weights))  # readable, but not what was saved
    with pytest.raises(CheckpointError, match=f"checkpoint {step_folder(run_dir, 2)} failed verification: "
                                              f"{weights} does not match the SHA-256"):
        load_weights(weights)


def test_poly_schedule_matches_the_rule_and_restores_from_its_state_dict():
    parts = make_parts()
    base = [g["lr"] for g in parts.optimizer.param_groups]
    lrs = []
    for _ in range(4):
        parts.scheduler.step()
        lrs.append(parts.scheduler.get_last_lr())
    assert lrs[-1] == [b * (1 - 4 / MAX_STEPS) ** 0.9 for b in base]
    other = make_parts()
    other.scheduler.load_state_dict(parts.scheduler.state_dict())
    assert other.scheduler.get_last_lr() == lrs[-1]
    ref = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base[0]),
                                            lambda s: poly_factor(s, MAX_STEPS, 0.9))
    ref_lrs = []
    for _ in range(4):
        ref.optimizer.step()
        ref.step()
        ref_lrs.append(ref.get_last_lr()[0])
    assert ref_lrs == [lr[0] for lr in lrs]  # the numbers torch's LambdaLR gives, bit for bit
