"""Synthetic VOCdevkit-style data: layout, agreement of masks/XML/labels, determinism, SBD files."""
from __future__ import annotations

import io
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import scipy.io
from PIL import Image

from conftest import run_vwe
from vwe.data.synthetic import DEFAULT_CLASSES, write_dataset
from vwe.data.voc import CLASS_NAMES, IGNORE_INDEX
from vwe.formats.labels import voc_palette


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    write_dataset(out, n_train=10, n_val=4, seed=3, size=80, sbd=True)
    return out


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_lists(synth):
    voc = synth / "VOCdevkit" / "VOC2012"
    train = (voc / "ImageSets/Segmentation/train.txt").read_text().split()
    val = (voc / "ImageSets/Segmentation/val.txt").read_text().split()
    assert len(train) == 10 and len(val) == 4 and not set(train) & set(val)
    for i in train + val:
        for sub, ext in [("JPEGImages", "jpg"), ("Annotations", "xml"), ("SegmentationClass", "png"),
                         ("SegmentationClassAug", "png")]:
            assert (voc / sub / f"{i}.{ext}").is_file(), (sub, i)
    sbd = synth / "benchmark_RELEASE" / "dataset"
    sbd_ids = (sbd / "train.txt").read_text().split() + (sbd / "val.txt").read_text().split()
    extra = [i for i in sbd_ids if i.startswith("synth_sbd_")]
    assert len(extra) == 10
    # SBD-only ids have images, XML and Aug masks but no official VOC mask
    for i in extra:
        assert (voc / "JPEGImages" / f"{i}.jpg").is_file() and not (voc / "SegmentationClass" / f"{i}.png").exists()
        assert (sbd / "cls" / f"{i}.mat").is_file() and (sbd / "img" / f"{i}.jpg").is_file()
    assert set(sbd_ids) & set(val), "some VOC val ids must be in SBD so train_aug has to remove them"


def test_masks_xml_and_images_agree(synth):
    voc = synth / "VOCdevkit" / "VOC2012"
    ids = (voc / "ImageSets/Segmentation/trainval.txt").read_text().split()
    seen_classes, shapes, n_multi = set(), set(), 0
    for i in ids:
        im = Image.open(voc / "JPEGImages" / f"{i}.jpg")
        m = Image.open(voc / "SegmentationClass" / f"{i}.png")
        assert m.mode == "P" and m.getpalette()[:3 * 256] == voc_palette()
        assert m.size == im.size and max(im.size) == 80
        mask = np.asarray(m)
        aug = np.asarray(Image.open(voc / "SegmentationClassAug" / f"{i}.png"))
        assert np.array_equal(mask, aug)
        assert (mask == IGNORE_INDEX).any(), "objects have a 255 border"
        values = set(np.unique(mask).tolist()) - {0, IGNORE_INDEX}
        from_mask = {CLASS_NAMES[v - 1] for v in values}
        root = ET.parse(voc / "Annotations" / f"{i}.xml").getroot()
        names = [o.findtext("name") for o in root.iter("object")]
        assert set(names) == from_mask, i
        assert int(root.findtext("size/width")) == im.size[0] and int(root.findtext("size/height")) == im.size[1]
        seen_classes |= values
        shapes.add(im.size)
        n_multi += len(names) > 1
    assert seen_classes <= {c + 1 for c in DEFAULT_CLASSES} and len(seen_classes) >= 3
    assert len(shapes) >= 3, "aspect ratios vary"
    assert n_multi >= 2, "several images hold more than one object"


def test_class_cue_is_a_small_part_of_the_object(synth):
    """The saturated class patch covers only part of each object's mask (the CAM-hard situation)."""
    voc = synth / "VOCdevkit" / "VOC2012"
    fractions = []
    for i in (voc / "ImageSets/Segmentation/train.txt").read_text().split():
        img = np.asarray(Image.open(voc / "JPEGImages" / f"{i}.jpg")).astype(int)
        mask = np.asarray(Image.open(voc / "SegmentationClass" / f"{i}.png"))
        saturated = (img.max(-1) - img.min(-1)) > 90
        for v in set(np.unique(mask).tolist()) - {0, IGNORE_INDEX}:
            fractions.append(saturated[mask == v].mean())
    assert 0.02 < float(np.median(fractions)) < 0.5


def test_sbd_mat_matches_masks(synth):
    voc = synth / "VOCdevkit" / "VOC2012"
    sbd = synth / "benchmark_RELEASE" / "dataset"
    for p in sorted((sbd / "cls").glob("*.mat")):
        seg = scipy.io.loadmat(p, squeeze_me=True, struct_as_record=False)["GTcls"].Segmentation
        aug = np.asarray(Image.open(voc / "SegmentationClassAug" / f"{p.stem}.png"))
        assert seg.shape == aug.shape and seg.dtype == np.uint8
        assert IGNORE_INDEX not in np.unique(seg)
        known = aug != IGNORE_INDEX
        assert np.array_equal(seg[known], aug[known])


def test_deterministic_per_seed(tmp_path, synth):
    write_dataset(tmp_path / "a", n_train=10, n_val=4, seed=3, size=80, sbd=True)
    assert _files(tmp_path / "a") == _files(synth)
    write_dataset(tmp_path / "b", n_train=10, n_val=4, seed=4, size=80)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    jpg = [k for k in b if k.suffix == ".jpg"]
    assert all(a[k] != b[k] for k in jpg)


def test_the_same_files_from_any_number_of_workers(tmp_path):
    # through the command: a process pool leaves a resource tracker in the process that made it
    for workers in (1, 2):
        run_vwe("synth", "--out", str(tmp_path / f"w{workers}"), "--train", "40", "--val", "8", "--seed", "5",
                "--size", "48", "--sbd", "--workers", str(workers))
    a, b = _files(tmp_path / "w1"), _files(tmp_path / "w2")
    assert len(a) > 200 and a == b


def test_cli_synth(tmp_path):
    run_vwe("synth", "--out", str(tmp_path), "--train", "3", "--val", "2", "--size", "64")
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    assert len(list((voc / "JPEGImages").glob("*.jpg"))) == 5
    assert not (tmp_path / "benchmark_RELEASE").exists()
    im = Image.open(io.BytesIO((voc / "JPEGImages" / "synth_000000.jpg").read_bytes()))
    assert im.format == "JPEG" and max(im.size) == 64
