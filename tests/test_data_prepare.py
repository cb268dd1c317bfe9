"""`vwe prepare`: split algebra, byte-exact samples, index and checksums, SBD masks, re-runs, atomicity."""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import scipy.io

from conftest import run_vwe
from vwe.data.index import load_index
from vwe.data.prepare import prepare
from vwe.data.reading import iter_shard
from vwe.data.synthetic import write_dataset
from vwe.data.voc import CLASS_NAMES, decode_mask, labels_from_mask
from vwe.runtime.errors import DataError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    write_dataset(src, n_train=12, n_val=5, seed=1, size=64, sbd=True)
    out = tmp_path_factory.mktemp("shards")
    prepare(src / "VOCdevkit" / "VOC2012", src / "benchmark_RELEASE", out, shard_size=5)
    return src, out


def _ids(path):
    return path.read_text().split()


def test_split_algebra_and_counts(data):
    src, out = data
    voc = src / "VOCdevkit" / "VOC2012"
    sbd = src / "benchmark_RELEASE" / "dataset"
    train, val = _ids(voc / "ImageSets/Segmentation/train.txt"), _ids(voc / "ImageSets/Segmentation/val.txt")
    expected_aug = sorted((set(_ids(sbd / "train.txt")) | set(_ids(sbd / "val.txt")) | set(train)) - set(val))
    assert len(expected_aug) == 12 + 12 - 0  # 12 SBD-only + 12 VOC train; SBD's val ids are removed
    for split, ids in [("train_aug", expected_aug), ("train", train), ("val", val)]:
        idx = load_index(out, split)
        assert idx.keys == ids
        assert idx.num_samples == len(ids)
        assert [s.count for s in idx.shards] == [min(5, len(ids) - i) for i in range(0, len(ids), 5)]
        assert idx.class_names == CLASS_NAMES and idx.has_masks
        d = json.loads((out / f"{split}.json").read_text())
        assert d["num_samples"] == len(ids)


def test_checksums_and_sizes_match_the_index(data):
    _, out = data
    for split in ("train_aug", "train", "val"):
        for s in load_index(out, split).shards:
            raw = (out / s.name).read_bytes()
            assert hashlib.sha256(raw).hexdigest() == s.sha256 and len(raw) == s.bytes


def test_every_sample_equals_its_source(data):
    src, out = data
    voc = src / "VOCdevkit" / "VOC2012"
    sbd = src / "benchmark_RELEASE" / "dataset"
    n_sbd_masks = 0
    for split in ("train_aug", "train", "val"):
        idx = load_index(out, split)
        for s in idx.shards:
            for raw in iter_shard(out / s.name, s.count):
                assert raw.error is None
                assert raw.jpg == (voc / "JPEGImages" / f"{raw.key}.jpg").read_bytes()
                official = voc / "SegmentationClass" / f"{raw.key}.png"
                if official.exists():
                    assert raw.mask == official.read_bytes()
                else:  # SBD-only id: the mask comes from SBD's .mat, converted to an index PNG
                    seg = scipy.io.loadmat(sbd / "cls" / f"{raw.key}.mat", squeeze_me=True,
                                           struct_as_record=False)["GTcls"].Segmentation
                    assert np.array_equal(decode_mask(raw.mask, raw.key), seg)
                    n_sbd_masks += 1
                assert raw.labels == labels_from_mask(decode_mask(raw.mask, raw.key), raw.key)
    assert n_sbd_masks == 12


def test_rerun_keeps_identical_shards(data, tmp_path):
    src, out = data
    copy = tmp_path / "shards"
    shutil.copytree(out, copy)
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in copy.glob("*.tar")}
    proc = run_vwe("prepare", "--voc", str(src), "--sbd", str(src / "benchmark_RELEASE"), "--out", str(copy),
                   "--shard-size", "5")
    assert "found at" in proc.stdout and "0 written" in proc.stdout
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in copy.glob("*.tar")}
    assert after == before
    # a different shard size rewrites, and removes shards the new index no longer lists
    prepare(src, src / "benchmark_RELEASE", copy, shard_size=100)
    assert sorted(p.name for p in copy.glob("train_aug-*.tar")) == ["train_aug-000000.tar"]
    assert load_index(copy, "train_aug").num_samples == 24


def test_without_sbd_and_xml_fallback(data, tmp_path):
    src, _ = data
    voc = tmp_path / "VOC2012"
    shutil.copytree(src / "VOCdevkit" / "VOC2012", voc)
    key = _ids(voc / "ImageSets/Segmentation/train.txt")[0]
    (voc / "SegmentationClass" / f"{key}.png").unlink()
    (voc / "SegmentationClassAug" / f"{key}.png").unlink()
    out = tmp_path / "out"
    prepare(voc, None, out, shard_size=1000)
    idx = load_index(out, "train_aug")
    assert idx.keys == load_index(out, "train").keys and not idx.has_masks
    raw = next(r for r in iter_shard(out / idx.shards[0].name) if r.key == key)
    assert raw.mask is None
    mask = decode_mask((src / "VOCdevkit/VOC2012/SegmentationClass" / f"{key}.png").read_bytes(), key)
    assert raw.labels == labels_from_mask(mask, key)  # synthetic XML and masks agree


def test_interrupted_write_leaves_no_complete_looking_shard(data, tmp_path):
    src, _ = data
    voc = tmp_path / "VOC2012"
    shutil.copytree(src / "VOCdevkit" / "VOC2012", voc)
    bad = sorted(_ids(voc / "ImageSets/Segmentation/train.txt"))[7]   # in train_aug's second shard
    jpg = voc / "JPEGImages" / f"{bad}.jpg"
    jpg.write_bytes(jpg.read_bytes()[:200])
    out = tmp_path / "out"
    with pytest.raises(DataError, match=f"{bad}.jpg"):
        prepare(voc, None, out, shard_size=5)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["train_aug-000000.tar"], names      # no partial shard, no temp file, no index
    assert len(list(iter_shard(out / "train_aug-000000.tar"))) == 5


def test_prepare_errors_name_the_file(tmp_path, data):
    src, _ = data
    with pytest.raises(DataError, match="VOC folder not found"):
        prepare(tmp_path / "nope", None, tmp_path / "o")
    with pytest.raises(DataError, match="no VOC2012 data under"):
        prepare(tmp_path, None, tmp_path / "o")
    with pytest.raises(DataError, match="SBD folder not found"):
        prepare(src, tmp_path / "nosbd", tmp_path / "o")
    proc = run_vwe("prepare", "--voc", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "nope" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("fmt", ["pax", "gnu"])
def test_reader_accepts_tars_from_other_writers(tmp_path, fmt):
    """Shards repacked by other tools (pax or GNU headers, long names, folders) read the same."""
    import io
    import tarfile
    key = "k" * 120                                   # longer than ustar's 100-byte name field
    path = tmp_path / "x.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT if fmt == "pax" else tarfile.GNU_FORMAT) as tf:
        d = tarfile.TarInfo("dir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for ext, data in [("jpg", b"\xff\xd8jpegdata"), ("labels.json", b"[1, 2]")]:
            ti = tarfile.TarInfo(f"dir/{key}.{ext}")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    (raw,) = list(iter_shard(path, 1))
    assert raw.key == key and raw.jpg == b"\xff\xd8jpegdata" and raw.labels == [1, 2] and raw.error is None


def _add_xml_object(xml_path, class_name: str) -> None:
    text = xml_path.read_text()
    obj = (f"<object><name>{class_name}</name><difficult>1</difficult><bndbox><xmin>1</xmin><ymin>1</ymin>"
           f"<xmax>4</xmax><ymax>4</ymax></bndbox></object>")
    xml_path.write_text(text.replace("</annotation>", obj + "</annotation>"))


def test_labels_come_from_xml_by_default_and_from_masks_as_a_setting(data, tmp_path):
    src, _ = data
    voc = tmp_path / "VOC2012"
    shutil.copytree(src / "VOCdevkit" / "VOC2012", voc)
    key, no_xml = _ids(voc / "ImageSets/Segmentation/train.txt")[:2]
    mask_labels = labels_from_mask(decode_mask((voc / "SegmentationClass" / f"{key}.png").read_bytes(), key), key)
    extra = next(c for c in range(len(CLASS_NAMES)) if c not in mask_labels)
    _add_xml_object(voc / "Annotations" / f"{key}.xml", CLASS_NAMES[extra])   # a class the mask lacks
    (voc / "Annotations" / f"{no_xml}.xml").unlink()                           # falls back to its mask
    out = tmp_path / "xml"
    prepare(voc, None, out, shard_size=100)
    idx = load_index(out, "train")
    assert idx.labels == {"source": "xml", "fallback": "mask", "images_from_fallback": 1}
    raw = {r.key: r for r in iter_shard(out / idx.shards[0].name)}
    assert raw[key].labels == sorted(mask_labels + [extra])
    assert raw[no_xml].labels == labels_from_mask(decode_mask(raw[no_xml].mask, no_xml), no_xml)

    out2 = tmp_path / "mask"
    proc = run_vwe("prepare", "--voc", str(voc), "--out", str(out2), "--labels", "mask")
    assert "labels from mask, 0 from the xml fallback" in proc.stdout
    idx2 = load_index(out2, "train")
    assert idx2.labels == {"source": "mask", "fallback": "xml", "images_from_fallback": 0}
    raw2 = {r.key: r for r in iter_shard(out2 / idx2.shards[0].name)}
    assert raw2[key].labels == mask_labels


def test_duplicate_id_in_a_split_list_is_refused(data, tmp_path):
    src, _ = data
    voc = tmp_path / "VOC2012"
    shutil.copytree(src / "VOCdevkit" / "VOC2012", voc)
    lst = voc / "ImageSets/Segmentation/train.txt"
    ids = _ids(lst)
    lst.write_text("\n".join(ids[:3] + ["", ids[1]] + ids[3:]) + "\n")   # id 2 again on line 5
    with pytest.raises(DataError, match=f"train.txt: image id '{ids[1]}' is listed twice, on lines 2 and 5"):
        prepare(voc, None, tmp_path / "out")
    proc = run_vwe("prepare", "--voc", str(voc), "--out", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and f"'{ids[1]}' is listed twice, on lines 2 and 5" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out" / "train.json").exists()


@pytest.mark.parametrize("name", ["../train-000000.tar", "/etc/passwd", "sub/../../x.tar", "http://h/x.tar",
                                  "pipe:cat /etc/passwd", "x.tar; rm -rf ~"])
def test_index_must_not_name_files_outside_its_folder(data, tmp_path, name):
    _, out = data
    copy = tmp_path / "shards"
    shutil.copytree(out, copy)
    p = copy / "val.json"
    d = json.loads(p.read_text())
    d["shards"][0]["name"] = name
    p.write_text(json.dumps(d))
    with pytest.raises(DataError) as e:
        load_index(copy, "val")
    assert str(p) in str(e.value) and repr(name) in str(e.value)
    assert ("outside" if ";" not in name else "refused") in str(e.value)


def test_reader_rescans_a_changed_shard(tmp_path):
    """Member offsets are remembered per file version: a re-read is the same, a changed file is read anew."""
    import io
    import os
    import tarfile

    def write(keys):
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
            for k in keys:
                for ext, data in [("jpg", f"jpeg-{k}".encode()), ("labels.json", b"[3]")]:
                    ti = tarfile.TarInfo(f"{k}.{ext}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))

    path = tmp_path / "s.tar"
    write(["a", "b"])
    first = [(r.key, bytes(r.jpg)) for r in iter_shard(path, 2)]
    assert first == [("a", b"jpeg-a"), ("b", b"jpeg-b")] == [(r.key, bytes(r.jpg)) for r in iter_shard(path, 2)]
    write(["a", "b", "c"])
    assert [r.key for r in iter_shard(path, 3)] == ["a", "b", "c"]
    data = path.read_bytes()
    path.write_bytes(data[:2048 + 512 + 3])       # cut inside the data of b.jpg
    os.utime(path, ns=(1, 1))
    with pytest.raises(DataError, match="truncated tar .*b.jpg.*in or after sample 'a'"):
        list(iter_shard(path, 3))


def test_binary_index_is_named(tmp_path):
    (tmp_path / "val.json").write_bytes(bytes(range(256)))
    with pytest.raises(DataError, match=r"val.json: not a valid shard index"):
        load_index(tmp_path, "val")
