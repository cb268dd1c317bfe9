"""Every shipped config loads, and the paper configs hold the published recipes' values
(docs/method.md: conference VWE; the extension's VWL-L and VWL-M)."""
import dataclasses

import pytest

from vwe.formats.config import Config, load_config, repo_configs_dir

CONFIGS = repo_configs_dir()
SHIPPED = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml"))
ABLATION = {"cam": ("gap", 0.0, 0.0), "hspp": ("hspp", 0.0, 0.0), "vwe": ("gap", 1.0, 1.0),
            "hspp_vwe": ("hspp", 1.0, 1.0)}


def _load(name: str) -> Config:
    return load_config(CONFIGS / name)


def test_the_expected_configs_ship():
    expected = {"demo.yaml", "voc.yaml", "voc_vwl_l.yaml", "voc_vwl_m.yaml",
                *(f"ablation/{v}.yaml" for v in ABLATION)}
    assert expected <= set(SHIPPED), sorted(expected - set(SHIPPED))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_loads(name, monkeypatch):
    for var in ("VWE_SHARDS", "VWE_RUN_DIR"):
        monkeypatch.delenv(var, raising=False)
    assert isinstance(_load(name), Config)


def _common_recipe(cfg: Config) -> None:
    """What the conference and extension recipes share (train_aug, 512 crops, 6 epochs of batch 16...)."""
    d, m, t = cfg.data, cfg.model, cfg.train
    assert (d.train_split, d.infer_split, d.crop_size, d.long_side) == ("train_aug", "train", 512, [320, 640])
    assert (m.pretrained, m.norm, m.num_words, m.pooling) == ("imagenet", "frozen", 256, "hspp")
    assert (m.pool_levels, m.pool_gamma, m.num_classes) == ([1, 2, 4], 2.0, 20)
    assert (t.batch_size, t.epochs, t.lr, t.head_lr_mult) == (16, 6, 0.01, 10.0)
    assert t.weight_decay == 1e-4 and t.poly_power == 0.9
    assert t.momentum == pytest.approx(1e-4)  # the weight decay in SGD's momentum slot, as it ran
    assert cfg.infer.scales == [1.0, 0.5, 1.5, 2.0] and cfg.infer.flip
    # inference precision: fp32 compute, float16 CAM files (docs/inference.md, "Precision")
    assert cfg.infer.mixed_precision == "no" and cfg.infer.dtype == "float16"


def test_conference_recipe_vwe():
    cfg = _load("voc.yaml")
    _common_recipe(cfg)
    m = cfg.model
    assert (m.backbone, m.codebook, m.detach_stage2) == ("resnet50", "learned", True)
    assert (m.cls_weight, m.hist_weight, m.word_weight, m.decorrelation_weight) == (1.0, 1.0, 1.0, 0.0)
    assert cfg.eval.bkg == 0.14


def test_extension_recipe_vwl_l():
    cfg = _load("voc_vwl_l.yaml")
    _common_recipe(cfg)
    m = cfg.model
    assert (m.backbone, m.codebook, m.detach_stage2) == ("resnet101", "learned", True)
    assert (m.cls_weight, m.hist_weight, m.word_weight, m.decorrelation_weight) == (1.0, 1.0, 1.0, 1.0)
    assert cfg.eval.bkg == 0.13


def test_extension_recipe_vwl_m():
    cfg = _load("voc_vwl_m.yaml")
    _common_recipe(cfg)
    m = cfg.model
    assert (m.backbone, m.codebook, m.detach_stage2) == ("resnet101", "memory", False)
    assert m.memory_rho == 1e-3 and (m.cls_weight, m.word_weight) == (1.0, 1.0)
    assert cfg.eval.bkg == 0.13


def test_ablation_configs_differ_only_in_pooling_and_word_heads():
    demo = dataclasses.asdict(_load("demo.yaml"))
    for variant, (pooling, hist, word) in ABLATION.items():
        cfg = _load(f"ablation/{variant}.yaml")
        assert (cfg.model.pooling, cfg.model.hist_weight, cfg.model.word_weight) == (pooling, hist, word)
        assert cfg.output.run_dir == f"runs/ablation/{variant}"
        tree = dataclasses.asdict(cfg)
        for section in ("model", "train", "infer", "eval"):
            differ = {k for k in tree[section] if tree[section][k] != demo[section][k]}
            allowed = {"model": {"pooling", "hist_weight", "word_weight"},
                       # the ablation table was measured in fp32 (mixed_precision "no"); demo uses auto
                       "train": {"checkpoint_every", "epochs", "mixed_precision"},
                       "infer": {"scales"}}.get(section, set())
            assert differ <= allowed, (variant, section, differ)
        assert {k for k in tree["data"] if tree["data"][k] != demo["data"][k]} == {"root", "crop_size", "long_side"}


# deeplab-pytorch configs/voc12.yaml, restated (docs/segmentation.md): SOLVER, DATASET, MODEL and CRF
DEEPLAB_VOC12 = {"backbone": "resnet101", "num_classes": 21, "aspp_rates": [6, 12, 18, 24],
                 "msc_scales": [0.5, 0.75], "crop_size": 321, "scales": [0.5, 0.75, 1.0, 1.25, 1.5],
                 "flip": True, "batch_size": 5 * 2, "grad_accum": 2, "max_steps": 20000, "lr": 2.5e-4,
                 "momentum": 0.9, "weight_decay": 5e-4, "poly_power": 0.9, "lr_every": 10,
                 "norm": "frozen_all", "test_scales": [1.0, 0.5, 0.75], "test_flip": False, "crf": True,
                 "crf_iterations": 10, "crf_pos_w": 3, "crf_pos_xy_std": 1, "crf_bi_w": 4, "crf_bi_xy_std": 67,
                 "crf_bi_rgb_std": 3, "head_lr_mult": 10, "head_bias_lr_mult": 20}
# IRNet's run_sample.py defaults (semantic path) and train_irn.py's fixed values, restated (docs/irnet.md)
IRNET_DEFAULTS = {"conf_fg_thres": 0.30, "conf_bg_thres": 0.05, "backbone": "resnet50", "crop_size": 512,
                  "scale_range": [0.5, 1.5], "radius": 10, "batch_size": 32, "grad_accum": 1, "epochs": 3,
                  "max_steps": 0, "lr": 0.1, "weight_decay": 1e-4, "momentum": 1e-4, "poly_power": 0.9,
                  "beta": 10, "exp_times": 8, "walk_radius": 5, "sem_seg_bg_thres": 0.25}


@pytest.mark.parametrize("name", ["voc_seg.yaml", "voc_irn.yaml"])
def test_deeplab_recipe(name):
    seg = dataclasses.asdict(_load(name).seg)
    assert {k: seg[k] for k in DEEPLAB_VOC12} == DEEPLAB_VOC12
    assert seg["pretrained"] == "imagenet"  # the fair initialisation, not the recipe's COCO one


def test_irnet_recipe():
    cfg = _load("voc_irn.yaml")
    _common_recipe(cfg)  # the CAMs it starts from are the conference recipe's
    irn = dataclasses.asdict(cfg.irn)
    assert {k: irn[k] for k in IRNET_DEFAULTS} == IRNET_DEFAULTS
    assert (irn["label_split"], irn["pretrained"], cfg.seg.labels) == ("train_aug", "imagenet", "irn")
