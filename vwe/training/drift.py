"""Config drift on resume: which differences between a checkpoint's config and the current one change
what training computes (refused unless `train.resume_changed: allow`), and which do not (noted)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Keys of the data/model/train sections that do not change the numbers training computes. Everything
# else in those sections does (model, augmentation, optimiser, schedule, batch size, precision, seed).
# Other sections (infer, eval, output, ...) never affect training. data.root is only where the data is:
# the data itself is compared separately, by the digest of its shard SHA-256s (vwe/training/checkpointer.py).
NEUTRAL = frozenset({
    "data.root", "data.infer_split", "data.num_workers", "data.worker_kind", "data.verify_shards",
    "data.on_corrupt",
    "model.grad_checkpointing",  # non-reentrant recomputation gives the same values
    "train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "train.resume",
    "train.resume_changed", "train.compile", "train.deterministic", "train.cudnn_benchmark",
})
TRAINING_SECTIONS = ("data", "model", "train")
NOT_RECORDED = "<not recorded>"


@dataclass(frozen=True)
class Change:
    key: str
    saved: Any
    now: Any

    def __str__(self) -> str:
        return f"{self.key}: checkpoint {self.saved!r}, now {self.now!r}"


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict, now: dict, sections: tuple[str, ...] = TRAINING_SECTIONS,
                   neutral_keys: frozenset[str] = frozenset()) -> tuple[list[Change], list[Change]]:
    """(changes that alter the result, changes that do not) between two config dicts, by dotted key, over
    the training's `sections`; NEUTRAL and `neutral_keys` (a recipe's own) do not alter it."""
    a = flatten({s: saved.get(s, {}) for s in sections})
    b = flatten({s: now.get(s, {}) for s in sections})
    result, neutral = [], []
    for key in sorted(a.keys() | b.keys()):
        old, new = a.get(key, NOT_RECORDED), b.get(key, NOT_RECORDED)
        if _same(old, new):
            continue
        (neutral if key in NEUTRAL or key in neutral_keys else result).append(Change(key, old, new))
    return result, neutral


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b
