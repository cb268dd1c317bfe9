"""Training and inference loaders: batch counts, layout-independent augmentation, exact restart,
exactly-once inference for any world size and shard count."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from data_helpers import demo_cfg, samples_of, write_split
from vwe.data.loader import infer_samples, steps_per_epoch, train_batches
from vwe.data.index import load_index
from vwe.data.prepare import prepare
from vwe.data.synthetic import write_dataset
from vwe.data.transforms import IMAGENET_MEAN, IMAGENET_STD, MEAN_UINT8, normalize
from vwe.runtime.errors import VweError


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    write_dataset(src, n_train=24, n_val=4, seed=2, size=64)
    out = tmp_path_factory.mktemp("shards")
    prepare(src, None, out, shard_size=5)
    return out


def _all(cfg, rank, world, epoch=0, start=0):
    return list(train_batches(cfg.data, cfg.train, rank, world, epoch, start_batch=start))


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x["image"], y["image"]) and x["key"] == y["key"]
                                    and torch.equal(x["labels"], y["labels"]) for x, y in zip(a, b))


def test_equal_batch_counts_and_shapes_per_rank(shards):
    for world, accum in [(1, 1), (2, 1), (3, 1), (3, 2)]:
        cfg = demo_cfg(shards, "train.batch_size=6", f"train.grad_accum={accum}", "data.train_split=train_aug")
        assert steps_per_epoch(cfg.data, cfg.train) == 4
        for rank in range(world):
            batches = _all(cfg, rank, world)
            assert len(batches) == 4 * accum
            for b in batches:
                assert b["image"].dtype == torch.uint8 and b["image"].shape == (6 // (world * accum), 3, 48, 48)
                assert b["labels"].dtype == torch.float32 and b["labels"].shape == (6 // (world * accum), 20)
                assert len(b["key"]) == b["image"].shape[0] and b["skipped"] == 0


def test_labels_follow_the_keys(shards):
    cfg = demo_cfg(shards, "train.batch_size=6", "data.train_split=train")
    truth = {s["key"]: s["parts"]["labels.json"] for s in samples_of(shards, "train")}
    for b in _all(cfg, 0, 1):
        for key, vec in zip(b["key"], b["labels"]):
            assert torch.nonzero(vec).flatten().tolist() == sorted(eval(truth[key]))


def test_ranks_read_different_samples(shards):
    cfg = demo_cfg(shards, "train.batch_size=4", "data.train_split=train", "data.shuffle_buffer=0")
    keys = [[k for b in _all(cfg, r, 2) for k in b["key"]] for r in range(2)]
    assert len(keys[0]) == len(keys[1]) == 12
    # 5 shards (5,5,5,5,4 samples) dealt to 2 ranks: each rank's first two shards (>= 8 samples) are
    # disjoint from the other's; later the shard cycle repeats with a fresh permutation
    assert not set(keys[0][:8]) & set(keys[1][:8])
    assert len(set(keys[0]) | set(keys[1])) >= 20


def test_batches_do_not_depend_on_worker_count(shards):
    base = demo_cfg(shards, "train.batch_size=4", "data.train_split=train")
    two = demo_cfg(shards, "train.batch_size=4", "data.train_split=train", "data.num_workers=2")
    three = demo_cfg(shards, "train.batch_size=4", "data.train_split=train", "data.num_workers=3")
    threads = demo_cfg(shards, "train.batch_size=4", "data.train_split=train", "data.num_workers=3",
                       "data.worker_kind=thread")
    ref = _all(base, 1, 2, epoch=1)
    assert _same(ref, _all(two, 1, 2, epoch=1)) and _same(ref, _all(three, 1, 2, epoch=1))
    assert _same(ref, _all(threads, 1, 2, epoch=1))
    assert _same(ref[5:], _all(threads, 1, 2, epoch=1, start=5))


def test_augmentation_of_a_key_is_independent_of_layout(shards):
    """The same key in one epoch gets the same crop/flip/scale whatever rank, world or batch it lands in."""
    crops = {}
    for world, workers in [(1, 0), (2, 2), (3, 1)]:
        cfg = demo_cfg(shards, "train.batch_size=6", "data.train_split=train", f"data.num_workers={workers}")
        for rank in range(world):
            for b in _all(cfg, rank, world, epoch=3):
                for key, img in zip(b["key"], b["image"]):
                    if key in crops:
                        assert torch.equal(crops[key], img), key
                    crops[key] = img
    assert len(crops) >= 12
    other = demo_cfg(shards, "train.batch_size=6", "data.train_split=train")
    b = _all(other, 0, 1, epoch=4)[0]
    assert any(not torch.equal(crops[k], i) for k, i in zip(b["key"], b["image"]) if k in crops)


def test_exact_restart_at_any_micro_batch(shards):
    for workers in (0, 2):
        cfg = demo_cfg(shards, "train.batch_size=4", "train.grad_accum=2", "data.train_split=train",
                       f"data.num_workers={workers}")
        full = _all(cfg, 0, 2, epoch=2)
        assert len(full) == 12
        for k in (1, 4, 11, 12):
            assert _same(full[k:], _all(cfg, 0, 2, epoch=2, start=k)), (workers, k)
    with pytest.raises(VweError, match="start_batch"):
        _all(cfg, 0, 2, start=13)


def test_augmentation_geometry_and_padding(shards):
    cfg = demo_cfg(shards, "train.batch_size=4", "data.train_split=train", "data.long_side=[24,30]",
                   "data.crop_size=40", "data.flip=false")
    for b in _all(cfg, 0, 1):
        for img in b["image"]:
            pad = (img == torch.tensor(MEAN_UINT8, dtype=torch.uint8).view(3, 1, 1)).all(0)
            rows, cols = (~pad).any(1).sum().item(), (~pad).any(0).sum().item()
            assert 24 <= max(rows, cols) <= 30 and 10 <= min(rows, cols)  # image placed inside the padding
    # a crop smaller than the image: no padding at all
    cfg = demo_cfg(shards, "train.batch_size=4", "data.train_split=train", "data.long_side=[60,64]",
                   "data.crop_size=32")
    img = _all(cfg, 0, 1)[0]["image"]
    assert not (img == torch.tensor(MEAN_UINT8, dtype=torch.uint8).view(1, 3, 1, 1)).all(1).all()


def test_normalize():
    x = torch.tensor(MEAN_UINT8, dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    y = normalize(x)
    assert y.dtype == torch.float32 and y.shape == (2, 3, 4, 4) and y.abs().max() < 0.01
    z = normalize(torch.full((3, 2, 2), 255, dtype=torch.uint8))
    expected = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    assert torch.allclose(z[:, 0, 0], torch.tensor(expected))


@pytest.fixture(scope="module")
def split_variants(shards, tmp_path_factory):
    """The train split rewritten into 1, 2 and 7 shards."""
    samples = samples_of(shards, "train")
    roots = {}
    for n in (1, 2, 7):
        root = tmp_path_factory.mktemp(f"s{n}")
        write_split(root, "train", samples, n)
        roots[n] = root
    return roots


@pytest.mark.parametrize("n_shards", [1, 2, 7])
def test_inference_covers_every_sample_exactly_once(split_variants, n_shards):
    root = split_variants[n_shards]
    expected = sorted(load_index(root, "train").keys)
    for world, kind in [(1, "process"), (2, "process"), (3, "process"), (3, "thread")]:
        cfg = demo_cfg(root, "infer.num_workers=2", f"data.worker_kind={kind}")
        keys = [s["key"] for r in range(world)
                for s in infer_samples(cfg.data, cfg.infer, r, world, split="train", with_scales=False)]
        assert sorted(keys) == expected and len(keys) == len(set(keys)) == 24, (n_shards, world, kind)


def test_inference_sample_content(shards):
    cfg = demo_cfg(shards, "infer.scales=[1.0,0.5,1.5]")
    src = {s["key"]: s["parts"] for s in samples_of(shards, "val")}
    got = list(infer_samples(cfg.data, cfg.infer, 0, 1, split="val"))
    assert [s["key"] for s in got] == load_index(shards, "val").keys
    for s in got:
        parts = src[s["key"]]
        ref = np.array(Image.open(io.BytesIO(parts["jpg"])).convert("RGB"))
        assert s["image"].dtype == torch.uint8 and torch.equal(s["image"], torch.from_numpy(ref).permute(2, 0, 1))
        mask = np.array(Image.open(io.BytesIO(parts["mask.png"])))
        assert torch.equal(s["mask"], torch.from_numpy(mask))
        h, w = ref.shape[:2]
        assert [tuple(x.shape) for x in s["scales"]] == [(2, 3, round(h * f), round(w * f)) for f in (1.0, 0.5, 1.5)]
        for x in s["scales"]:
            assert torch.equal(x[1], x[0].flip(-1))
        assert torch.equal(s["scales"][0][0], s["image"])
        assert s["labels"].shape == (20,) and s["labels"].sum() >= 1


def test_inference_with_more_ranks_than_samples(split_variants):
    root = split_variants[2]
    cfg = demo_cfg(root, "infer.num_workers=2", "data.worker_kind=thread")
    per_rank = [[s["key"] for s in infer_samples(cfg.data, cfg.infer, r, 30, split="train", with_scales=False)]
                for r in range(30)]
    assert sorted(k for keys in per_rank for k in keys) == sorted(load_index(root, "train").keys)
    assert sum(1 for keys in per_rank if not keys) == 6


def _pil_bicubic(img: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((w, h), Image.BICUBIC)).astype(np.int16)


@pytest.mark.parametrize("resize", ["bicubic", "bilinear"])
def test_inference_scales_follow_data_resize(shards, resize):
    """data.resize=bicubic (the default) is PIL's bicubic within a small fraction of a grey level;
    bilinear is a measurably different image."""
    overrides = [] if resize == "bicubic" else ["data.resize=bilinear"]
    cfg = demo_cfg(shards, "infer.scales=[0.5,1.5,2.0]", *overrides)
    for s in infer_samples(cfg.data, cfg.infer, 0, 1, split="val"):
        ref = s["image"].permute(1, 2, 0).numpy()
        for x in s["scales"]:
            h, w = x.shape[-2:]
            diff = np.abs(x[0].permute(1, 2, 0).numpy().astype(np.int16) - _pil_bicubic(ref, h, w))
            if resize == "bicubic":
                assert diff.mean() < 0.05 and diff.max() <= 2, (s["key"], diff.mean())
            else:
                assert diff.mean() > 0.2, (s["key"], diff.mean())


def test_training_resize_follows_data_resize(shards):
    """With no crop and no flip, a training sample is the PIL-bicubic resized image placed in padding."""
    common = ["train.batch_size=4", "data.train_split=val", "data.long_side=[48,48]", "data.crop_size=64",
              "data.flip=false", "data.shuffle_buffer=0"]
    src = {s["key"]: s["parts"] for s in samples_of(shards, "val")}
    bic = _all(demo_cfg(shards, *common), 0, 1)
    bil = _all(demo_cfg(shards, *common, "data.resize=bilinear"), 0, 1)
    assert not torch.equal(bic[0]["image"], bil[0]["image"])
    for key, img in zip(bic[0]["key"], bic[0]["image"]):
        ref = np.array(Image.open(io.BytesIO(src[key]["jpg"])).convert("RGB"))
        h0, w0 = ref.shape[:2]
        h, w = round(h0 * 48 / max(h0, w0)), round(w0 * 48 / max(h0, w0))
        pad = (img == torch.tensor(MEAN_UINT8, dtype=torch.uint8).view(3, 1, 1)).all(0)
        ys, xs = np.nonzero(~pad.numpy())
        got = img[:, ys.min():ys.min() + h, xs.min():xs.min() + w].permute(1, 2, 0).numpy().astype(np.int16)
        assert np.abs(got - _pil_bicubic(ref, h, w)).mean() < 0.05, key
