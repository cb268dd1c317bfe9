"""Segmentation splits (`vwe prepare --labels-from`): a split's images paired with a folder of label PNGs,
written as shards the loaders read; every problem of the folder named with exit 2 before anything is
written. Also the prepare/synth argument errors of issue 21 (cases 13 and 14)."""
import io
import json
import shutil

import numpy as np
from PIL import Image

from conftest import run_vwe
from data_helpers import label_folder
from vwe.data.index import load_index
from vwe.data.reading import read_shard
from vwe.data.voc import decode_mask


def _copy(shards, tmp_path):
    root = tmp_path / "shards"
    shutil.copytree(shards, root)
    return root


def test_labels_folder_becomes_a_streamable_split(synthetic_shards, tmp_path):
    root = _copy(synthetic_shards, tmp_path)
    want = label_folder(root, "train", tmp_path / "labels", bump=1)
    (tmp_path / "labels" / "color").mkdir()  # refine's colour copies and report are not labels
    (tmp_path / "labels" / "report.json").write_text("{}")
    proc = run_vwe("prepare", "--labels-from", str(tmp_path / "labels"), "--split", "train_pseudo",
                   "--from-split", "train", "--out", str(root), "--shard-size", "7")
    assert "train_pseudo: 48 samples of 'train'" in proc.stdout
    idx = load_index(root, "train_pseudo")
    src = load_index(root, "train")
    assert idx.keys == src.keys and len(idx.shards) == 7 and idx.has_masks
    assert idx.targets == {"from": str((tmp_path / "labels").resolve()), "source_split": "train", "count": 48}
    originals = {raw.key: raw for s in src.shards for raw in read_shard(src, s)}
    for shard in idx.shards:
        for raw in read_shard(idx, shard):  # SHA-256 verified against the new index
            assert raw.error is None
            assert np.array_equal(decode_mask(bytes(raw.target), raw.key), want[raw.key])
            o = originals[raw.key]
            assert bytes(raw.jpg) == bytes(o.jpg) and raw.labels == o.labels and bytes(raw.mask) == bytes(o.mask)
    # a rerun keeps identical shards
    again = run_vwe("prepare", "--labels-from", str(tmp_path / "labels"), "--split", "train_pseudo",
                    "--from-split", "train", "--out", str(root), "--shard-size", "7")
    assert "(0 written, 7 kept identical)" in again.stdout


def test_missing_and_extra_labels_are_listed_and_nothing_is_written(synthetic_shards, tmp_path):
    root = _copy(synthetic_shards, tmp_path)
    labels = tmp_path / "labels"
    keys = list(label_folder(root, "train", labels))
    (labels / f"{keys[3]}.png").unlink()
    (labels / f"{keys[9]}.png").unlink()
    shutil.copy(labels / f"{keys[0]}.png", labels / "not_an_image.png")
    proc = run_vwe("prepare", "--labels-from", str(labels), "--split", "train_pseudo", "--from-split", "train",
                   "--out", str(root), check=False)
    assert proc.returncode == 2, proc.stderr
    assert "3 problem(s) pairing it with split 'train'" in proc.stderr
    assert f"image {keys[3]!r} of split 'train': no label {labels / keys[3]}.png" in proc.stderr
    assert f"image {keys[9]!r}" in proc.stderr
    assert f"label {labels / 'not_an_image.png'}: no image 'not_an_image' in split 'train'" in proc.stderr
    assert not list(root.glob("train_pseudo*"))


def test_wrong_sizes_and_values_are_named(synthetic_shards, tmp_path):
    root = _copy(synthetic_shards, tmp_path)
    labels = tmp_path / "labels"
    keys = list(label_folder(root, "train", labels))
    short = np.asarray(Image.open(labels / f"{keys[1]}.png"))
    h, w = short.shape
    Image.fromarray(short[:-2]).save(labels / f"{keys[1]}.png")
    m = np.asarray(Image.open(labels / f"{keys[5]}.png")).copy()
    m[3, 4] = 30
    Image.fromarray(m).save(labels / f"{keys[5]}.png")
    (labels / f"{keys[7]}.png").write_bytes(b"not a png")
    rgb = io.BytesIO()
    Image.new("RGB", (8, 8)).save(rgb, format="PNG")
    (labels / f"{keys[8]}.png").write_bytes(rgb.getvalue())
    proc = run_vwe("prepare", "--labels-from", str(labels), "--split", "train_pseudo", "--from-split", "train",
                   "--out", str(root), check=False)
    assert proc.returncode == 2, proc.stderr
    assert "4 problem(s)" in proc.stderr
    assert f"{labels / keys[1]}.png: label is {w}x{h - 2} but the image is {w}x{h}" in proc.stderr
    assert f"{labels / keys[5]}.png: label values [30] are outside 0..20 and 255 (first at y=3, x=4)" in proc.stderr
    assert f"{labels / keys[7]}.png: cannot decode mask PNG" in proc.stderr
    assert f"{labels / keys[8]}.png: mask must be an index PNG (mode P or L), got mode RGB" in proc.stderr
    assert not list(root.glob("train_pseudo*"))


def test_a_label_split_may_not_replace_a_prepared_one(synthetic_shards, tmp_path):
    root = _copy(synthetic_shards, tmp_path)
    label_folder(root, "train", tmp_path / "labels")
    for split in ("train", "val", "train_aug"):
        proc = run_vwe("prepare", "--labels-from", str(tmp_path / "labels"), "--split", split,
                       "--from-split", "train", "--out", str(root), check=False)
        assert proc.returncode == 2 and "name the new split something other" in proc.stderr
    assert json.loads((root / "train.json").read_text()) == json.loads((synthetic_shards / "train.json").read_text())


def test_prepare_and_synth_argument_errors(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [
        (("prepare", "--voc", str(tmp_path), "--out", str(a_file)), f"--out {a_file} is a file"),
        (("prepare", "--out", str(tmp_path / "s")), "give --voc"),
        (("prepare", "--labels-from", str(tmp_path), "--out", str(tmp_path / "s")), "--labels-from needs --split"),
        (("synth", "--out", str(tmp_path / "d"), "--size", "0"), "--size 0: must be an integer >= 16"),
        (("synth", "--out", str(tmp_path / "d"), "--train", "-1"), "--train -1: must be an integer >= 1"),
        (("synth", "--out", str(tmp_path / "d"), "--val", "0"), "--val 0: must be an integer >= 1"),
        (("synth", "--out", str(a_file)), f"--out {a_file} is a file"),
    ]
    for args, message in cases:
        proc = run_vwe(*args, check=False)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
    assert not (tmp_path / "d").exists()
