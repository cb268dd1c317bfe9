"""Shards are webdataset: webdataset reads what `vwe prepare` writes, vwe reads what webdataset's TarWriter
writes, and training and inference stream shards from an HTTP server (and a `pipe:` command) through
webdataset's opener with the same batches, the same exactly-once inference and the same errors."""
from __future__ import annotations

import functools
import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from conftest import REPO, TINY, run_vwe
from data_helpers import demo_cfg, samples_of
from vwe.formats.cams import read_cam
from vwe.formats.checkpoint import FINAL_WEIGHTS_NAME
from vwe.data.loader import infer_samples, train_batches
from vwe.data.index import ShardInfo, load_index, write_index
from vwe.data.prepare import prepare
from vwe.data.synthetic import write_dataset
from vwe.runtime.errors import DataError
from vwe.runtime.files import file_sha256


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    write_dataset(src, n_train=16, n_val=6, seed=3, size=64)
    out = tmp_path_factory.mktemp("shards")
    prepare(src, None, out, shard_size=5)
    return out


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def serve():
    """serve(folder) -> base URL of a real HTTP server on 127.0.0.1 (a thread of this process)."""
    servers = []

    def start(folder: Path) -> str:
        handler = functools.partial(_Quiet, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_webdataset_reads_prepared_shards(shards):
    ours = samples_of(shards, "train")
    n = len(load_index(shards, "train").shards)
    # webdataset's own reader, with its brace notation over the shard names
    url = str(shards / f"train-{{000000..{n - 1:06d}}}.tar")
    theirs = list(wds.WebDataset(url, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in theirs] == [s["key"] for s in ours]
    for t, o in zip(theirs, ours):
        assert {k for k in t if not k.startswith("__")} == set(o["parts"])
        for ext, data in o["parts"].items():
            assert t[ext] == bytes(data), (o["key"], ext)


def _tarwriter_split(root: Path, split: str, samples: list[dict], per_shard: int) -> None:
    """`samples` written by webdataset's TarWriter (its default user, mode and mtime), plus a vwe index."""
    root.mkdir(parents=True, exist_ok=True)
    infos = []
    for i in range(0, len(samples), per_shard):
        chunk = samples[i:i + per_shard]
        path = root / f"{split}-{i // per_shard:06d}.tar"
        with wds.TarWriter(str(path), encoder=False) as sink:
            for s in chunk:
                sink.write({"__key__": s["key"], **{ext: bytes(v) for ext, v in s["parts"].items()}})
        infos.append(ShardInfo(path.name, len(chunk), file_sha256(path), path.stat().st_size,
                               tuple(s["key"] for s in chunk)))
    write_index(root, split, infos, has_masks=True)


def test_vwe_reads_tarwriter_shards(shards, tmp_path):
    src = samples_of(shards, "train")
    _tarwriter_split(tmp_path / "tw", "train", src, per_shard=4)
    got = samples_of(tmp_path / "tw", "train")
    assert [s["key"] for s in got] == [s["key"] for s in src]
    for g, s in zip(got, src):
        assert {k: bytes(v) for k, v in g["parts"].items()} == {k: bytes(v) for k, v in s["parts"].items()}
    # the loaders give exactly what they give on vwe's own shards of the same samples
    for split_root in (shards, tmp_path / "tw"):
        cfg = demo_cfg(split_root, "data.train_split=train", "train.batch_size=4", "infer.scales=[1.0,0.5]")
        inf = list(infer_samples(cfg.data, cfg.infer, 0, 1, split="train"))
        assert [s["key"] for s in inf] == [s["key"] for s in src]
    ref = list(infer_samples((c := demo_cfg(shards)).data, c.infer, 0, 1, split="train"))
    for a, b in zip(inf, ref):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        assert all(torch.equal(x, y) for x, y in zip(a["scales"], b["scales"]))


def _batches(cfg, rank=0, world=1, start=0):
    return list(train_batches(cfg.data, cfg.train, rank, world, 0, start_batch=start))


def _same_batches(a, b) -> bool:
    return len(a) == len(b) and all(x["key"] == y["key"] and torch.equal(x["image"], y["image"])
                                    and torch.equal(x["labels"], y["labels"]) for x, y in zip(a, b))


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_loaders_stream_from_http_like_from_files(shards, serve, kind):
    url = serve(shards)
    local = ["data.train_split=train", "train.batch_size=4", "data.num_workers=2", f"data.worker_kind={kind}",
             "infer.num_workers=2"]
    files, http_ = demo_cfg(shards, *local), demo_cfg(url, *local)
    assert load_index(url, "train").keys == load_index(shards, "train").keys
    # training: the same micro-batches per rank, and an exact restart from any micro-batch
    for rank, world in [(0, 1), (1, 2)]:
        ref = _batches(files, rank, world)
        assert _same_batches(_batches(http_, rank, world), ref) and len(ref) >= 2
        assert _same_batches(_batches(http_, rank, world, start=1), ref[1:])
    # inference: every sample exactly once over the ranks, identical content
    ref = {s["key"]: s for s in infer_samples(files.data, files.infer, 0, 1, split="train")}
    got = [s for r in range(3) for s in infer_samples(http_.data, http_.infer, r, 3, split="train")]
    assert sorted(s["key"] for s in got) == sorted(ref) and len(got) == len(ref) == 16
    for s in got:
        assert torch.equal(s["image"], ref[s["key"]]["image"]) and torch.equal(s["mask"], ref[s["key"]]["mask"])


def test_pipe_command_root(shards):
    root = f"pipe:cat {shards}/{{name}}"
    keys = [s["key"] for s in infer_samples(demo_cfg(root).data, demo_cfg(root).infer, 0, 1, split="val",
                                            with_scales=False)]
    assert keys == load_index(shards, "val").keys
    with pytest.raises(DataError, match=r"must contain \{name\}"):
        load_index(f"pipe:cat {shards}/val.json", "val")


def test_http_errors_name_the_url(shards, serve, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    url = serve(copy)
    with pytest.raises(DataError, match=f"no index for split 'nope': cannot read {url}/nope.json"):
        load_index(url, "nope")
    # a shard changed on the server after its index was written: caught as it streams
    shard = copy / "val-000000.tar"
    data = bytearray(shard.read_bytes())
    data[1500] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"shard {url}/val-000000.tar: SHA-256 .* does not match its index"):
        list(infer_samples((c := demo_cfg(url)).data, c.infer, 0, 1, split="val", with_scales=False))
    # cut short: the size check (also with verification off)
    shard.write_bytes(bytes(data[:len(data) - 2048]))
    with pytest.raises(DataError, match=f"shard {url}/val-000000.tar: .*bytes streamed, its index says"):
        list(infer_samples((c := demo_cfg(url, "data.verify_shards=false")).data, c.infer, 0, 1, split="val",
                            with_scales=False))
    shard.unlink()
    with pytest.raises(DataError, match=f"shard {url}/val-000000.tar"):
        list(infer_samples((c := demo_cfg(url)).data, c.infer, 0, 1, split="val", with_scales=False))


def test_train_and_infer_from_an_http_server(shards, serve, tmp_path):
    """`vwe train` and `vwe infer` as real processes, data.root an http:// URL."""
    url = serve(shards)
    run = tmp_path / "run"
    cfg = ["--config", str(REPO / "configs" / "demo.yaml"), *TINY, f"data.root={url}", f"output.run_dir={run}",
           "data.worker_kind=thread"]
    run_vwe("train", *cfg, "train.max_steps=2")
    assert (run / FINAL_WEIGHTS_NAME).is_file()
    out = tmp_path / "cams"
    proc = run_vwe("infer", *cfg, f"infer.out_dir={out}", "infer.dtype=float32")
    assert "6 written" in proc.stdout
    keys = load_index(shards, "val").keys
    assert sorted(p.stem for p in out.glob("*.npz")) == sorted(keys)
    manifest = json.loads((out / "manifest-rank000.json").read_text())
    assert sorted(manifest["ids"]) == sorted(keys)
    cam = read_cam(out / f"{keys[0]}.npz")
    assert np.isfinite(cam.high_res).all() and cam.high_res.shape[0] == len(cam.keys)
    # a rerun over HTTP finds every CAM done: exactly once
    assert "0 written, 6 already done" in run_vwe("infer", *cfg, f"infer.out_dir={out}", "infer.dtype=float32").stdout


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_streaming_command_survives_preemption_signals(shards, kind):
    """A job-wide SIGTERM must reach vwe (which checkpoints and stops), not kill the command that streams
    a shard: here every reading command sends SIGTERM to itself before it reads."""
    root = f"pipe:kill -TERM $$ && kill -USR1 $$ && cat {shards}/{{name}}"
    cfg = demo_cfg(root, "data.train_split=train", "train.batch_size=4", "data.num_workers=2",
                   f"data.worker_kind={kind}")
    assert _same_batches(_batches(cfg), _batches(demo_cfg(shards, "data.train_split=train", "train.batch_size=4")))
