"""The chain in one launch (docs/architecture.md): train -> infer -> evaluate, and with `until`, -> refine ->
label split -> DeepLab -> its mIoU. Each stage skips what is already done: training by its final weights
(or its checkpoints), CAMs and labels by their sources, the label split by identical shards."""
from __future__ import annotations

from pathlib import Path

from vwe.formats.checkpoint import FINAL_WEIGHTS_NAME, load_weights
from vwe.formats.config import Config
from vwe.runtime.dist import distributed_state

STAGES = ("evaluate", "refine", "segment", "irn")  # where a pipeline may stop (irn: the walk's labels)


def training_done(cfg: Config) -> bool:
    """Final weights exist and were trained with this config's data, model and train sections."""
    path = Path(cfg.output.run_dir) / FINAL_WEIGHTS_NAME
    if not path.is_file():
        return False
    _, saved = load_weights(path)
    now = cfg.to_dict()
    return all(saved.get(section) == now[section] for section in ("data", "model", "train"))


def run_pipeline(cfg: Config, sweep: bool = True, until: str = "evaluate") -> int:
    """Run the chain up to `until`; returns 0, or the first stage's non-zero code (75: preempted, rerun)."""
    from vwe.stages.evaluate import evaluate
    from vwe.stages.infer import infer
    from vwe.training.trainer import train

    if until not in STAGES:
        raise ValueError(f"until must be one of {STAGES}, got {until!r}")
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
    code = evaluate(cfg, sweep=sweep)
    if code or until == "evaluate":
        return code
    return _after_cams(cfg, until, state)


def _after_cams(cfg: Config, until: str, state) -> int:
    from vwe.stages.refine import refine
    if until == "irn" or (until == "segment" and cfg.seg.labels == "irn"):
        code = _irn_chain(cfg)
    else:
        code = refine(cfg)
    if code or until in ("refine", "irn"):
        return code
    from vwe.stages.segment import segment
    from vwe.stages.segment_eval import segment_eval
    code = segment(cfg)  # writes the label split from the pseudo labels first (seg.labels)
    if code:
        return code
    return segment_eval(cfg)


def _irn_chain(cfg: Config) -> int:
    """The IRNet stage (docs/irnet.md, "Running it"): CAMs of irn.label_split (when it is not the CAMs just
    made and irn.cam_dir is empty) -> relation labels -> relation network -> random-walk labels."""
    import dataclasses
    from vwe.stages.infer import infer
    from vwe.stages.irn import irn_labels, irn_train
    from vwe.stages.randomwalk import random_walk
    if cfg.irn.label_split != cfg.data.infer_split and not cfg.irn.cam_dir:
        code = infer(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, infer_split=cfg.irn.label_split)))
        if code:
            return code
    for stage in (irn_labels, irn_train, random_walk):
        code = stage(cfg)
        if code:
            return code
    return 0
