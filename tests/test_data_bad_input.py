"""Bad input: each case gives a DataError naming the shard (or file) and the sample key; with
data.on_corrupt=skip, corrupt samples are skipped, counted and logged."""
from __future__ import annotations

import io
import logging
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_helpers import demo_cfg, samples_of, write_split
from vwe.data.loader import infer_samples, train_batches
from vwe.data.index import load_index
from vwe.data.prepare import prepare
from vwe.data.synthetic import write_dataset
from vwe.data.voc import encode_mask
from vwe.runtime.errors import DataError

SHARD = "train-000000.tar"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    write_dataset(src, n_train=8, n_val=2, seed=5, size=48)
    out = tmp_path_factory.mktemp("shards")
    prepare(src, None, out, shard_size=100)
    return src, samples_of(out, "train")


def _split(tmp_path, samples, n_shards=1):
    root = tmp_path / "bad"
    write_split(root, "train", samples, n_shards)
    return root


def _mutated(source, i, **parts):
    samples = [{"key": s["key"], "parts": dict(s["parts"])} for s in source[1]]
    for ext, data in parts.items():
        if data is None:
            del samples[i]["parts"][ext]
        else:
            samples[i]["parts"][ext] = data
    return samples, samples[i]["key"]


def _train(root, *over):
    cfg = demo_cfg(root, "train.batch_size=8", "data.train_split=train", "data.shuffle_buffer=0", *over)
    return list(train_batches(cfg.data, cfg.train, 0, 1, 0))


def _infer(root, *over):
    return list(infer_samples((cfg := demo_cfg(root, *over)).data, cfg.infer, 0, 1, split="train"))


def _both_fail(root, *patterns):
    for run in (_train, _infer):
        with pytest.raises(DataError) as e:
            run(root)
        for p in patterns:
            assert p in str(e.value), (run.__name__, str(e.value))


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_corrupt_jpeg(source, tmp_path, how):
    jpg = source[1][3]["parts"]["jpg"]
    bad = b"not a jpeg at all" * 10 if how == "garbage" else jpg[: len(jpg) // 2]
    samples, key = _mutated(source, 3, jpg=bad)
    root = _split(tmp_path, samples)
    _both_fail(root, SHARD, repr(key), "JPEG")
    for kind in ("process", "thread"):
        with pytest.raises(DataError, match=f"{SHARD}, sample '{key}': cannot decode JPEG"):
            _train(root, "data.num_workers=2", f"data.worker_kind={kind}")
        with pytest.raises(DataError, match=f"{SHARD}, sample '{key}': cannot decode JPEG"):
            _infer(root, "infer.num_workers=2", f"data.worker_kind={kind}")


def test_corrupt_jpeg_skipped_counted_and_logged(source, tmp_path, caplog):
    samples, key = _mutated(source, 3, jpg=b"\xff\xd8broken")
    root = _split(tmp_path, samples)
    with caplog.at_level(logging.WARNING, logger="vwe.data"):
        batches = _train(root, "data.on_corrupt=skip")
    assert len(batches) == 1 and batches[0]["image"].shape[0] == 8
    assert batches[0]["skipped"] == 1 and key not in batches[0]["key"]
    assert any(key in r.getMessage() and SHARD in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vwe.data"):
        got = _infer(root, "data.on_corrupt=skip")
    assert [s["key"] for s in got] == [s["key"] for s in samples if s["key"] != key]
    assert sum(s["skipped"] for s in got) == 1
    got = _infer(root, "data.on_corrupt=skip", "infer.num_workers=2", "data.worker_kind=thread")
    assert [s["key"] for s in got] == [s["key"] for s in samples if s["key"] != key]
    assert sum(s["skipped"] for s in got) == 1
    threaded = _train(root, "data.on_corrupt=skip", "data.num_workers=2", "data.worker_kind=thread")
    assert threaded[0]["skipped"] == 1 and threaded[0]["key"] == batches[0]["key"]
    assert (threaded[0]["image"] == batches[0]["image"]).all()
    assert any(key in r.getMessage() for r in caplog.records)


def test_corrupt_png_mask(source, tmp_path):
    samples, key = _mutated(source, 2, **{"mask.png": b"\x89PNG\r\n\x1a\nbroken"})
    _both_fail(_split(tmp_path, samples), SHARD, repr(key), "mask PNG")


def test_mask_size_differs_from_image(source, tmp_path):
    samples, key = _mutated(source, 1, **{"mask.png": encode_mask(np.zeros((5, 7), np.uint8))})
    _both_fail(_split(tmp_path, samples), SHARD, repr(key), "mask is 7x5")


@pytest.mark.parametrize("ext,text", [("jpg", "no image"), ("labels.json", "no labels")])
def test_sample_without_image_or_labels(source, tmp_path, ext, text):
    samples, key = _mutated(source, 4, **{ext: None})
    _both_fail(_split(tmp_path, samples), SHARD, repr(key), text)


@pytest.mark.parametrize("labels,text", [(b"[3, 25]", "label index 25 out of range"),
                                         (b"[-1]", "label index -1 out of range"),
                                         (b"{oops", "not JSON")])
def test_bad_labels(source, tmp_path, labels, text):
    samples, key = _mutated(source, 5, **{"labels.json": labels})
    _both_fail(_split(tmp_path, samples), SHARD, repr(key), text)


def test_truncated_tar(source, tmp_path):
    root = _split(tmp_path, source[1])
    shard = root / SHARD
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(DataError, match=f"{SHARD}.*index says"):   # size check before reading
        _train(root)
    keys = [s["key"] for s in source[1]]
    for run in (_train, _infer):
        with pytest.raises(DataError) as e:
            run(root, "data.verify_shards=false")
        msg = str(e.value)
        assert SHARD in msg and "truncated" in msg and any(repr(k) in msg for k in keys), msg


def test_empty_tar(source, tmp_path):
    root = _split(tmp_path, source[1])
    (root / SHARD).write_bytes(b"")
    for run in (_train, _infer):
        with pytest.raises(DataError, match=f"{SHARD} is empty"):
            run(root, "data.verify_shards=false")
    with tarfile.open(root / SHARD, "w"):
        pass          # a valid tar without members
    with pytest.raises(DataError, match=f"{SHARD} holds no samples"):
        _infer(root, "data.verify_shards=false")


def test_checksum_mismatch(source, tmp_path):
    root = _split(tmp_path, source[1], n_shards=2)
    shard = root / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[1500] ^= 0xFF
    shard.write_bytes(bytes(data))
    for run in (_train, _infer):
        with pytest.raises(DataError, match="train-000001.tar: SHA-256 .* does not match its index"):
            run(root)


def test_missing_shard_folder_and_index(source, tmp_path):
    with pytest.raises(DataError, match="data folder not found: .*nowhere"):
        _train(tmp_path / "nowhere")
    root = _split(tmp_path, source[1])
    (root / "train.json").unlink()
    with pytest.raises(DataError, match="no index for split 'train'.*train.json is missing"):
        _infer(root)
    root2 = _split(tmp_path / "b", source[1])
    (root2 / SHARD).unlink()
    with pytest.raises(DataError, match=f"shard .*{SHARD} .*is missing"):
        _train(root2)
    (root2 / "train.json").write_text("{not json")
    with pytest.raises(DataError, match="train.json: not a valid shard index"):
        load_index(root2, "train")


def test_prepare_rejects_bad_masks(source, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(source[0], src)
    voc = src / "VOCdevkit" / "VOC2012"
    key = "synth_000002"
    png = voc / "SegmentationClass" / f"{key}.png"
    good = png.read_bytes()
    png.write_bytes(encode_mask(np.zeros((3, 4), np.uint8)))
    with pytest.raises(DataError, match=f"{key}.png: mask is 4x3 but image .*{key}.jpg"):
        prepare(src, None, tmp_path / "o1")
    m = np.array(Image.open(io.BytesIO(good)))
    m[0, 0] = 33
    png.write_bytes(encode_mask(m))
    with pytest.raises(DataError, match=rf"{key}.png: mask values \[33\]"):
        prepare(src, None, tmp_path / "o2")
    png.write_bytes(b"garbage")
    with pytest.raises(DataError, match=f"{key}.png: cannot decode mask PNG"):
        prepare(src, None, tmp_path / "o3")
    png.unlink()
    (voc / "SegmentationClassAug" / f"{key}.png").unlink()
    xml = voc / "Annotations" / f"{key}.xml"
    xml.write_text(xml.read_text().replace("<name>", "<name>x", 1))
    with pytest.raises(DataError, match=f"{key}.xml: unknown class name"):
        prepare(src, None, tmp_path / "o4")
    assert not (tmp_path / "o4" / "train.json").exists()


def test_skip_mode_stops_when_nothing_is_usable(source, tmp_path):
    samples = [{"key": s["key"], "parts": {"jpg": s["parts"]["jpg"]}} for s in source[1]]  # no labels anywhere
    root = _split(tmp_path, samples)
    with pytest.raises(DataError, match="no usable sample"):
        _train(root, "data.on_corrupt=skip")
