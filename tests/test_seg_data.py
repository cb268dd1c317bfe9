"""Segmentation training data: deeplab-pytorch's augmentation (seg_augment) keeps image and target aligned,
pads as the recipe does, and the training loader streams (image, target) batches from a label split."""
import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from vwe.data.loader import train_batches
from vwe.data.targets import prepare_targets
from vwe.data.transforms import MEAN_UINT8, seg_augment
from vwe.formats.config import load_config
from vwe.runtime.errors import DataError

from data_helpers import label_folder


def _pair(w=90, h=60):
    """An image whose colour is a function of the label: four blocks of labels 1..4 (grey 40 x label)."""
    label = np.zeros((h, w), np.uint8)
    label[: h // 2, : w // 2], label[: h // 2, w // 2:] = 1, 2
    label[h // 2:, : w // 2], label[h // 2:, w // 2:] = 3, 4
    image = np.repeat((label * 40)[..., None], 3, axis=2).astype(np.uint8)
    jpg, png = io.BytesIO(), io.BytesIO()
    Image.fromarray(image).save(jpg, format="JPEG", quality=100)
    Image.fromarray(label, mode="L").save(png, format="PNG")
    return jpg.getvalue(), png.getvalue()


def test_image_and_target_stay_aligned_and_padding_is_the_recipes():
    jpg, png = _pair()
    for seed in range(12):
        img, tgt = torch.empty(3, 81, 81, dtype=torch.uint8), torch.empty(81, 81, dtype=torch.uint8)
        seg_augment(jpg, png, np.random.default_rng(seed), (0.5, 1.0, 1.5), 81, True, img, tgt, "x")
        values = set(torch.unique(tgt).tolist())
        assert values <= {1, 2, 3, 4, 255}
        labelled = tgt != 255
        # away from block edges (bilinear, JPEG) the grey level is 40 x label
        grey = img[0].float()
        inner = labelled & (torch.nn.functional.max_pool2d(tgt[None, None].float(), 5, 1, 2)[0, 0] ==
                            -torch.nn.functional.max_pool2d(-tgt[None, None].float(), 5, 1, 2)[0, 0])
        assert inner.any()
        assert (grey[inner] - 40 * tgt[inner].float()).abs().max() <= 6
        pad = ~labelled
        if pad.any():  # padding: the mean colour where the target is ignored
            assert all((img[c][pad] == MEAN_UINT8[c]).all() for c in range(3))


def test_draws_depend_on_the_seed_only_and_a_wrong_size_target_is_named():
    jpg, png = _pair()
    outs = []
    for _ in range(2):
        img, tgt = torch.empty(3, 41, 41, dtype=torch.uint8), torch.empty(41, 41, dtype=torch.uint8)
        seg_augment(jpg, png, np.random.default_rng(7), (0.5, 0.75, 1.0, 1.25, 1.5), 41, True, img, tgt, "x")
        outs.append((img.clone(), tgt.clone()))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    _, small = _pair(45, 30)
    with pytest.raises(DataError, match="sample s: target is 45x30 but the image is 90x60"):
        seg_augment(jpg, small, np.random.default_rng(0), (1.0,), 41, True, torch.empty(3, 41, 41, dtype=torch.uint8),
                    torch.empty(41, 41, dtype=torch.uint8), "sample s")


def test_loader_streams_targets_from_a_label_split(synthetic_shards, tmp_path, repo):
    root = tmp_path / "shards"
    shutil.copytree(synthetic_shards, root)
    label_folder(root, "train", tmp_path / "labels")
    prepare_targets(root, "train", "train_gt", tmp_path / "labels", shard_size=10)
    cfg = load_config(repo / "configs" / "demo.yaml", [f"data.root={root}", "data.train_split=train_gt",
                                                       "data.crop_size=64", "train.batch_size=4", "data.num_workers=0"])
    batches = list(train_batches(cfg.data, cfg.train, 0, 1, 0, seg_scales=(0.5, 1.0, 1.5)))
    assert len(batches) == 12
    b = batches[0]
    assert b["image"].shape == (4, 3, 64, 64) and b["target"].shape == (4, 64, 64) and b["target"].dtype == torch.uint8
    values = set(torch.cat([x["target"].flatten() for x in batches]).unique().tolist())
    assert 0 in values and 255 in values and values <= set(range(21)) | {255} and len(values) > 3
    # the CAM split has no targets: a named error, not a silent CAM batch
    cam = load_config(repo / "configs" / "demo.yaml", [f"data.root={root}", "data.train_split=train",
                                                       "data.crop_size=64", "train.batch_size=4", "data.num_workers=0"])
    with pytest.raises(DataError, match=r"no segmentation target .*vwe prepare --labels-from"):
        next(iter(train_batches(cam.data, cam.train, 0, 1, 0, seg_scales=(1.0,))))
