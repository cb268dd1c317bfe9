"""Convert the authors' released state dicts (VWE 2021, VWL-L, VWL-M) into a vwe weights file.

The published networks keep the same tensors under several names (docs/refine.md, "The authors'
weights"): the torchvision ResNet (`resnet.*`), its stages (`stage1..4.*`), the stages again
(`backbone.<i>.*`), the heads (`classifier`, `fc_a`, `fc_b`, `VWE.centroid`) and the heads again
(`newly_added.<i>.*`); files saved from nn.DataParallel prefix every key with `module.`. Every alias is
reduced to its canonical name (`resnet.*` or the head's name), aliases must hold equal tensors, and the
canonical names map onto vwe's keys by name; shapes must match the vwe network of the variant's recipe.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import torch

from vwe.formats.checkpoint import export_weights
from vwe.formats.config import Config, load_config, repo_configs_dir
from vwe.nets.backbone import weights_only_refusal
from vwe.runtime.errors import WeightsImportError

SOURCES = ("vwe-2021", "vwl-l", "vwl-m")
# The heads in the order of the published network's `newly_added` list.
NEWLY_ADDED = {"vwe-2021": ("classifier", "VWE", "fc_a", "fc_b"), "vwl-l": ("classifier", "VWE", "fc_a", "fc_b"),
               "vwl-m": ("classifier", "fc_a", "fc_b")}
# Canonical head names -> vwe's module names.
HEADS = {"classifier": "classifier", "fc_a": "hist_head", "fc_b": "word_head"}
CENTROID, CODEBOOK = "VWE.centroid", "codebook.weight"
# The published recipes on top of configs/voc.yaml (conference: as is). Both extension configs use
# ResNet-101 and background score 0.13; VWL-L adds the decorrelation loss, VWL-M does not detach stage 2.
RECIPES = {
    "vwe-2021": [],
    "vwl-l": ["model.backbone=resnet101", "model.codebook=learned", "model.detach_stage2=true",
              "model.decorrelation_weight=1.0", "eval.bkg=0.13"],
    "vwl-m": ["model.backbone=resnet101", "model.codebook=memory", "model.detach_stage2=false",
              "model.memory_rho=0.001", "model.decorrelation_weight=0.0", "eval.bkg=0.13"],
}
MAX_LISTED = 12


def recipe_config(source: str) -> Config:
    """The resolved config of a published network: configs/voc.yaml plus the variant's recipe."""
    if source not in SOURCES:
        raise WeightsImportError(f"--from must be one of {', '.join(SOURCES)}, got {source!r}")
    return load_config(repo_configs_dir() / "voc.yaml", [*RECIPES[source], "model.pretrained=none"])


def canonical_name(key: str, source: str) -> str | None:
    """The canonical name of one key of an authors' file (its `module.` prefix dropped), or None when
    the key is not part of the published network."""
    key = key.removeprefix("module.")
    if m := re.match(r"backbone\.(\d+)\.(.+)$", key):  # the stages again, numbered from 0
        key = f"stage{int(m.group(1)) + 1}.{m.group(2)}"
    if m := re.match(r"stage1\.([014])\.(.+)$", key):   # conv1, bn1, relu, maxpool, layer1
        return f"resnet.{ {'0': 'conv1', '1': 'bn1', '4': 'layer1'}[m.group(1)] }.{m.group(2)}"
    if m := re.match(r"stage([234])\.0\.(.+)$", key):
        return f"resnet.layer{m.group(1)}.{m.group(2)}"
    if m := re.match(r"newly_added\.(\d+)\.(.+)$", key):
        heads = NEWLY_ADDED[source]
        i = int(m.group(1))
        return f"{heads[i]}.{m.group(2)}" if i < len(heads) else None
    if re.match(r"resnet\.(conv1|bn1|layer[1-4])\.", key) or key.split(".")[0] in (*HEADS, "VWE"):
        return key
    return None


def aliases(canonical: str, source: str) -> list[str]:
    """Every name under which the published network (as saved through DataParallel) holds `canonical`."""
    names = [canonical]
    if m := re.match(r"resnet\.(conv1|bn1|layer[1-4])\.(.+)$", canonical):
        part, rest = m.groups()
        stage = {"conv1": ("stage1", "stage1.0"), "bn1": ("stage1", "stage1.1"),
                 "layer1": ("stage1", "stage1.4")}.get(part, (f"stage{part[-1]}", f"stage{part[-1]}.0"))
        local = f"{stage[1]}.{rest}"
        names += [local, f"backbone.{int(stage[0][-1]) - 1}{local[len(stage[0]):]}"]
    else:
        head, rest = canonical.split(".", 1)
        if head in NEWLY_ADDED[source]:
            names.append(f"newly_added.{NEWLY_ADDED[source].index(head)}.{rest}")
    return [f"module.{n}" for n in names]


def vwe_to_canonical(vwe_key: str) -> str | None:
    """The canonical authors' name of a vwe key (None for vwe-only state such as the memory bank's)."""
    if vwe_key.startswith("backbone."):
        return "resnet." + vwe_key[len("backbone."):]
    if vwe_key == CODEBOOK:
        return CENTROID
    head, _, rest = vwe_key.partition(".")
    inverse = {v: k for k, v in HEADS.items()}
    return f"{inverse[head]}.{rest}" if head in inverse else None


def to_authors(vwe_state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The inverse: a vwe state dict laid out as the published network saves it through DataParallel
    (every alias, `module.` prefix, BatchNorm batch counters). For tests and comparisons."""
    memory = "codebook.initialised" in vwe_state
    out: dict[str, torch.Tensor] = {}
    for vkey, t in vwe_state.items():
        name = vwe_to_canonical(vkey)
        if name is None or (memory and vkey.startswith("codebook.")):
            continue
        if name == CENTROID:
            t = t.reshape(*t.shape, 1, 1)
        names = [name]
        if name.endswith(".running_mean") and name.startswith("resnet."):
            names.append(name[:-len("running_mean")] + "num_batches_tracked")
        for n in names:
            value = t if n == name else vwe_state.get(vkey[:-len("running_mean")] + "num_batches_tracked",
                                                      torch.tensor(0, dtype=torch.int64))
            for alias in aliases(n, source):
                out.setdefault(alias, value)
    return out


def _listing(items: list[str]) -> str:
    return "\n  ".join(items[:MAX_LISTED]) + (f"\n  ... ({len(items) - MAX_LISTED} more)"
                                               if len(items) > MAX_LISTED else "")


def read_authors_file(path: Path) -> dict[str, torch.Tensor]:
    """The state dict, read without unpickling arbitrary objects (weights_only)."""
    if not path.is_file():
        raise WeightsImportError(f"weights file {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch's own errors for corrupt or non-tensor files
        raise WeightsImportError(f"weights file {path}: unreadable as a weights-only state dict "
                                 f"({weights_only_refusal(e)})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise WeightsImportError(f"weights file {path}: not a state dict (a mapping of names to tensors)")
    return state


def convert(state: dict[str, torch.Tensor], source: str, model_state: dict[str, torch.Tensor],
            where: str = "weights file") -> tuple[dict[str, torch.Tensor], list[str]]:
    """vwe state dict from an authors' one, for a vwe network whose state dict is `model_state`.

    Returns it and the vwe keys the file does not hold (only the memory bank's codebook may be absent).
    WeightsImportError naming the keys when a key is unknown, aliases disagree, a tensor is missing or
    has another shape.
    """
    groups: dict[str, list[str]] = {}
    unknown = []
    for key in state:
        name = canonical_name(key, source)
        if name is None:
            unknown.append(key)
        else:
            groups.setdefault(name, []).append(key)
    disagree = []
    for name, keys in groups.items():
        first = state[keys[0]]
        for other in keys[1:]:
            t = state[other]
            if t.shape != first.shape or not torch.equal(t, first):
                disagree.append(f"{other} differs from {keys[0]}")
    out, missing, wrong, absent = {}, [], [], []
    used = set()
    memory = "codebook.initialised" in model_state
    for vkey, ref in model_state.items():
        name = vwe_to_canonical(vkey)
        if memory and vkey.startswith("codebook."):
            absent.append(vkey)  # the memory bank is not in the authors' file
            continue
        if name is None or name not in groups:
            missing.append(f"{name or vkey} (vwe {vkey}, shape {tuple(ref.shape)})")
            continue
        used.add(name)
        t = state[groups[name][0]]
        if name == CENTROID and t.dim() == 4 and t.shape[2:] == (1, 1):
            t = t.flatten(1)  # (K, D, 1, 1) convolution weight -> vwe's (K, D)
        if t.shape != ref.shape:
            wrong.append(f"{groups[name][0]}: shape {tuple(state[groups[name][0]].shape)}, "
                         f"expected {tuple(ref.shape)} (vwe {vkey})")
            continue
        out[vkey] = t.detach().to(ref.dtype).clone()
    # BatchNorm's batch counter is state of a trainable BatchNorm only; nothing else may be left over
    unused = sorted(n for n in groups if n not in used and not n.endswith(".num_batches_tracked"))
    problems = []
    for title, items in (("keys not in the published network", unknown), ("aliases that disagree", disagree),
                         ("tensors missing", missing), ("shapes that do not fit", wrong),
                         ("tensors vwe has no place for", [f"{n} ({', '.join(groups[n])})" for n in unused])):
        if items:
            problems.append(f"{len(items)} {title}:\n  {_listing(items)}")
    if problems:
        raise WeightsImportError(f"{where} does not hold the {source} network:\n" + "\n".join(problems))
    return out, absent


def import_weights(source: str, path: Path, out: Path, codebook: Path | None = None) -> str:
    """Convert `path` (an authors' .pth of `source`) into `out` (.safetensors with the recipe's config);
    returns the new file's SHA-256."""
    from vwe.nets.cam import build_model
    cfg = recipe_config(source)
    state = read_authors_file(path)
    with warnings.catch_warnings():  # the frozen-BatchNorm-without-pretraining warning: weights come next
        warnings.simplefilter("ignore", UserWarning)
        model_state = build_model(cfg.model).state_dict()
    weights, absent = convert(state, source, model_state, where=f"weights file {path}")
    if absent:  # the memory-bank codebook: from its own .npy, or left uninitialised
        if codebook is not None:
            weights.update(_read_codebook(codebook, model_state[CODEBOOK].shape))
        else:
            weights.update({k: model_state[k].clone() for k in absent})
            print(f"import-weights: {path} holds no codebook (the memory bank is saved separately); it is "
                  f"stored uninitialised (CAM inference does not use it; training would set it from the first "
                  f"batch). Pass --codebook FILE.npy to include it.")
    elif codebook is not None:
        raise WeightsImportError(f"--codebook: the {source} network keeps its codebook in the weights file")
    digest = export_weights(weights, cfg.to_dict(), out)
    print(f"import-weights: {path} ({source}, {len(state)} tensors) -> {out} ({len(weights)} tensors, "
          f"backbone {cfg.model.backbone}, codebook {cfg.model.codebook}, bkg {cfg.eval.bkg}; sha256 {digest[:12]})")
    return digest


def _read_codebook(path: Path, shape: torch.Size) -> dict[str, torch.Tensor]:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise WeightsImportError(f"codebook file {path}: unreadable ({e})") from None
    if arr.ndim == 4 and arr.shape[2:] == (1, 1):
        arr = arr.reshape(arr.shape[:2])
    if tuple(arr.shape) != tuple(shape) or not np.isfinite(arr).all():
        raise WeightsImportError(f"codebook file {path}: shape {arr.shape}, expected {tuple(shape)} of finite "
                                 f"values")
    return {CODEBOOK: torch.from_numpy(arr.astype(np.float32)),
            "codebook.initialised": torch.ones((), dtype=torch.bool)}

