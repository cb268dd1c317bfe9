"""`vwe import-weights`: the authors' state dicts (every alias, `module.` prefix) into vwe weights files.

Authors' files are generated from a vwe network through the inverse mapping (`to_authors`), so the tests
need nothing outside the repository; one test checks that mapping against the published key list when
/work/shared/reference is present. CAMs of the imported file are compared with CAMs computed the
published way: a torchvision ResNet loaded with the file's `resnet.*` tensors and the `classifier`.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from conftest import REPO, run_vwe
from vwe.formats.checkpoint import load_weights
from vwe.formats.config import load_config
from vwe import cli
from vwe.tools.import_weights import (SOURCES, canonical_name, convert, import_weights, recipe_config,
                                to_authors)
from vwe.stages.infer import load_cam_model
from vwe.nets.cam import build_model
from vwe.runtime.errors import WeightsImportError

REFERENCE = Path("/work/shared/reference/original_state_dict_keys.txt")


def _model_state(source: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A vwe network of the source's recipe with random (but sane) BatchNorm statistics and affine."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        state = build_model(recipe_config(source).model).state_dict()
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if k.endswith("running_var"):
            v = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith("running_mean") or (k.endswith(".bias") and "bn" in k or "downsample.1.bias" in k):
            v = 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith(".weight") and v.dim() == 1:
            v = 1 + 0.1 * torch.randn(v.shape, generator=g)
        out[k] = v.clone()
    return out


@pytest.fixture(scope="module")
def vwe2021():
    state = _model_state("vwe-2021")
    return state, to_authors(state, "vwe-2021")


def test_recipes():
    cfgs = {s: recipe_config(s) for s in SOURCES}
    voc = load_config(REPO / "configs" / "voc.yaml")
    assert cfgs["vwe-2021"].model.backbone == voc.model.backbone == "resnet50"
    assert cfgs["vwe-2021"].eval.bkg == 0.14 and cfgs["vwe-2021"].model.detach_stage2
    for s in ("vwl-l", "vwl-m"):
        assert cfgs[s].model.backbone == "resnet101" and cfgs[s].eval.bkg == 0.13
    assert cfgs["vwl-l"].model.codebook == "learned" and cfgs["vwl-l"].model.decorrelation_weight == 1.0
    assert cfgs["vwl-m"].model.codebook == "memory" and not cfgs["vwl-m"].model.detach_stage2
    assert all(c.model.pretrained == "none" and c.model.norm == "frozen" for c in cfgs.values())


@pytest.mark.skipif(not REFERENCE.is_file(), reason="the published key list is not on this machine")
def test_mapping_matches_the_published_key_list():
    listed: dict[str, dict] = {}
    for line in REFERENCE.read_text().splitlines():
        if line.startswith("## "):
            current = listed.setdefault(line.split()[1], {})
        elif line and not line.startswith("#"):
            key, shape, dtype = line.split("\t")
            current[f"module.{key}"] = (tuple(int(x) for x in shape.strip("()").split(",") if x.strip()), dtype)
    assert set(listed) == set(SOURCES)
    for source, keys in listed.items():
        state = _model_state(source)
        generated = to_authors(state, source)
        assert {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in generated.items()} == keys
        # a file built from the list alone (random values, aliases sharing their tensor) converts
        shared: dict = {}
        authors = {}
        for key, (shape, dtype) in keys.items():
            name = canonical_name(key, source)
            if name not in shared:
                shared[name] = torch.randn(shape) if dtype == "float32" else torch.zeros(shape, dtype=torch.int64)
            authors[key] = shared[name]
        out, absent = convert(authors, source, state)
        assert set(out) | set(absent) == set(state)
        assert absent == (["codebook.weight", "codebook.initialised"] if source == "vwl-m" else [])
        assert torch.equal(out["classifier.weight"], shared["classifier.weight"])


@pytest.mark.parametrize("source", SOURCES)
def test_round_trip(source):
    state = _model_state(source, seed=1)
    out, absent = convert(to_authors(state, source), source, state)
    assert sorted(out) == sorted(k for k in state if k not in absent)
    assert all(torch.equal(out[k], state[k]) for k in out)


@pytest.mark.filterwarnings("ignore:model.pretrained=none")
def test_cli_import_then_cams_equal_the_published_forward(vwe2021, tmp_path):
    state, authors = vwe2021
    pth, out = tmp_path / "vwe_2021.pth", tmp_path / "vwe_2021.safetensors"
    torch.save(authors, pth)
    proc = run_vwe("import-weights", "--from", "vwe-2021", str(pth), "--out", str(out))
    assert "backbone resnet50" in proc.stdout
    weights, config = load_weights(out)
    assert sorted(weights) == sorted(state) and all(torch.equal(weights[k], state[k]) for k in state)
    assert config["model"]["backbone"] == "resnet50" and config["eval"]["bkg"] == 0.14

    # vwe's inference path: the network rebuilt from the file's config, BatchNorm folded
    cfg = load_config(REPO / "configs" / "voc.yaml", [f"infer.weights={out}", "model.pretrained=none"])
    model, _, _ = load_cam_model(cfg, torch.device("cpu"))
    x = torch.randn(2, 3, 72, 88, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.cam(x)

    # the published way: a torchvision ResNet-50 (output stride 16) with the file's resnet.* tensors
    ref = torchvision.models.resnet50(weights=None)
    ref.layer4[0].conv2.stride = (1, 1)
    ref.layer4[0].downsample[0].stride = (1, 1)
    loaded = torch.load(pth, weights_only=True)
    own = {k[len("module.resnet."):]: v for k, v in loaded.items() if k.startswith("module.resnet.")}
    missing, unexpected = ref.load_state_dict(own, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    ref.eval()
    with torch.no_grad():
        f = ref.layer4(ref.layer3(ref.layer2(ref.layer1(ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))))))
        theirs = F.relu(F.conv2d(f, loaded["module.classifier.weight"]))
    assert ours.shape == theirs.shape == (2, 20, 5, 6)
    assert float(theirs.abs().max()) > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))


def test_infer_and_evaluate_with_imported_weights(vwe2021, synthetic_shards, tmp_path):
    """No training: the imported file drives `vwe infer` and `vwe evaluate`, with CAMs identical to those of
    the same weights exported by vwe itself."""
    from vwe.formats.checkpoint import export_weights
    state, authors = vwe2021
    torch.save(authors, tmp_path / "a.pth")
    run_vwe("import-weights", "--from", "vwe-2021", str(tmp_path / "a.pth"), "--out", str(tmp_path / "a.safetensors"))
    export_weights(state, recipe_config("vwe-2021").to_dict(), tmp_path / "direct.safetensors")
    common = ["--config", str(REPO / "configs" / "voc.yaml"), f"data.root={synthetic_shards}", "data.infer_split=val",
              "infer.scales=[1.0, 0.5]", "infer.mixed_precision=no", "infer.dtype=float32", "infer.num_workers=0",
              "model.pretrained=none"]
    cams = {}
    for name in ("a", "direct"):
        run = [*common, f"infer.weights={tmp_path / name}.safetensors", f"output.run_dir={tmp_path / name}"]
        run_vwe("infer", *run)
        if name == "a":
            run_vwe("evaluate", *run)
            report = json.loads((tmp_path / name / "eval" / "report.json").read_text())
            assert report["num_images"] == 12 and 0.0 <= report["miou"] <= 1.0
        cams[name] = {p.name: np.load(p) for p in sorted((tmp_path / name / "cams").glob("*.npz"))}
    assert len(cams["a"]) == 12 and cams["a"].keys() == cams["direct"].keys()
    for key in cams["a"]:
        for field in ("keys", "cam", "high_res"):
            np.testing.assert_array_equal(cams["a"][key][field], cams["direct"][key][field])


def _convert_error(state: dict, authors: dict, source: str = "vwe-2021") -> str:
    with pytest.raises(WeightsImportError) as e:
        convert(authors, source, state, where="weights file x.pth")
    return str(e.value)


def test_refuses_shapes_aliases_missing_and_unknown_keys(vwe2021):
    state, authors = vwe2021
    bad = dict(authors)
    bad["module.resnet.layer3.2.conv2.weight"] = torch.zeros(256, 256, 1, 1)
    for alias in ("module.stage3.0.2.conv2.weight", "module.backbone.2.0.2.conv2.weight"):
        bad[alias] = bad["module.resnet.layer3.2.conv2.weight"]
    msg = _convert_error(state, bad)
    assert "x.pth does not hold the vwe-2021 network" in msg and "1 shapes that do not fit" in msg
    assert "module.resnet.layer3.2.conv2.weight: shape (256, 256, 1, 1), expected (256, 256, 3, 3)" in msg

    bad = dict(authors)
    bad["module.newly_added.0.weight"] = authors["module.classifier.weight"] + 1
    msg = _convert_error(state, bad)
    assert "1 aliases that disagree" in msg
    assert "module.newly_added.0.weight differs from module.classifier.weight" in msg

    bad = {k: v for k, v in authors.items() if ".fc_b." not in k and "newly_added.3." not in k}
    bad["module.resnet.fc.weight"] = torch.zeros(1000, 2048)
    msg = _convert_error(state, bad)
    assert "1 tensors missing:\n  fc_b.weight (vwe word_head.weight, shape (256, 2048, 1, 1))" in msg
    assert "1 keys not in the published network:\n  module.resnet.fc.weight" in msg


def test_wrong_variant_and_bad_files_exit_2(vwe2021, tmp_path, capsys):
    _, authors = vwe2021
    pth = tmp_path / "w.pth"
    torch.save(authors, pth)
    proc = run_vwe("import-weights", "--from", "vwl-l", str(pth), "--out", str(tmp_path / "o.safetensors"),
                   check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"weights file {pth} does not hold the vwl-l network" in proc.stderr
    assert "tensors missing" in proc.stderr and "resnet.layer3.6.conv1.weight" in proc.stderr
    assert not (tmp_path / "o.safetensors").exists()

    import pickle
    (tmp_path / "obj.pth").write_bytes(pickle.dumps({"weights": object()}))
    torch.save({"epoch": torch.tensor(3), "state_dict": {"a": torch.zeros(1)}}, tmp_path / "nested.pth")
    for name, message in (("obj.pth", f"weights file {tmp_path / 'obj.pth'}: unreadable"),
                          ("nested.pth", f"weights file {tmp_path / 'nested.pth'}: not a state dict"),
                          ("none.pth", f"weights file {tmp_path / 'none.pth'} not found")):
        assert cli.main(["import-weights", "--from", "vwe-2021", str(tmp_path / name), "--out",
                         str(tmp_path / "o.safetensors")]) == 2
        assert message in capsys.readouterr().err


def test_memory_bank_codebook(tmp_path):
    state = _model_state("vwl-m", seed=2)
    authors = to_authors(state, "vwl-m")
    assert not any("centroid" in k for k in authors)
    pth = tmp_path / "vwl_m.pth"
    torch.save(authors, pth)
    proc = run_vwe("import-weights", "--from", "vwl-m", str(pth), "--out", str(tmp_path / "m.safetensors"))
    assert "holds no codebook" in proc.stdout
    weights, config = load_weights(tmp_path / "m.safetensors")
    assert not bool(weights["codebook.initialised"]) and config["model"]["codebook"] == "memory"
    bank = np.random.default_rng(0).standard_normal((256, 2048, 1, 1)).astype(np.float32)
    np.save(tmp_path / "bank.npy", bank)
    import_weights("vwl-m", pth, tmp_path / "m2.safetensors", codebook=tmp_path / "bank.npy")
    weights, _ = load_weights(tmp_path / "m2.safetensors")
    assert bool(weights["codebook.initialised"])
    np.testing.assert_array_equal(weights["codebook.weight"].numpy(), bank[:, :, 0, 0])
    np.save(tmp_path / "short.npy", bank[:10])
    with pytest.raises(WeightsImportError, match=r"short.npy: shape \(10, 2048\), expected \(256, 2048\)"):
        import_weights("vwl-m", pth, tmp_path / "m3.safetensors", codebook=tmp_path / "short.npy")
