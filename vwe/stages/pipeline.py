"""train -> infer -> evaluate in one launch; each stage skips what is already done."""
from __future__ import annotations

from pathlib import Path

from vwe.formats.checkpoint import FINAL_WEIGHTS_NAME, load_weights
from vwe.formats.config import Config
from vwe.runtime.dist import distributed_state


def training_done(cfg: Config) -> bool:
    """Final weights exist and were trained with this config's data, model and train sections."""
    path = Path(cfg.output.run_dir) / FINAL_WEIGHTS_NAME
    if not path.is_file():
        return False
    _, saved = load_weights(path)
    now = cfg.to_dict()
    return all(saved.get(section) == now[section] for section in ("data", "model", "train"))


def run_pipeline(cfg: Config, sweep: bool = True) -> int:
    from vwe.stages.evaluate import evaluate
    from vwe.stages.infer import infer
    from vwe.training.trainer import train

    state = distributed_state()
    if training_done(cfg):
        state.print(f"train: final weights in {cfg.output.run_dir} match this config; skipping")
    else:
        code = train(cfg)
        if code:
            return code  # preempted: the requeued job resumes here
    code = infer(cfg)
    if code:
        return code  # preempted during inference: the rerun skips the CAMs already written
    return evaluate(cfg, sweep=sweep)
