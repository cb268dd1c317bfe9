"""The split index and its shards must belong together (issue 21 cases 8 and 9): a shard listed twice, an
id in two shards, and a shard whose samples are not the ones its index lists are named with exit 2,
never read twice or reported as skipped."""
import json
import shutil

import pytest

from conftest import TINY, run_vwe
from vwe.data.index import load_index
from vwe.runtime.errors import DataError


def _edited(synthetic_shards, tmp_path, edit):
    root = tmp_path / "shards"
    shutil.copytree(synthetic_shards, root)
    index = json.loads((root / "train.json").read_text())
    edit(index)
    (root / "train.json").write_text(json.dumps(index))
    return root


def test_a_shard_listed_twice_is_refused(synthetic_shards, tmp_path, repo):
    def twice(index):
        index["shards"].append(dict(index["shards"][0]))
        index["num_samples"] += index["shards"][0]["count"]
    root = _edited(synthetic_shards, tmp_path, twice)
    with pytest.raises(DataError, match=r"train\.json: shard train-000000\.tar is listed twice"):
        load_index(root, "train")
    proc = run_vwe("train", "--config", str(repo / "configs/demo.yaml"), *TINY, f"data.root={root}",
                   "data.train_split=train", f"output.run_dir={tmp_path / 'run'}", "train.max_steps=1",
                   check=False, cwd=repo)
    assert proc.returncode == 2 and "is listed twice" in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def test_an_id_in_two_shards_is_refused(synthetic_shards, tmp_path):
    def moved(index):
        index["shards"][1]["keys"][0] = index["shards"][0]["keys"][2]
    root = _edited(synthetic_shards, tmp_path, moved)
    first = json.loads((synthetic_shards / "train.json").read_text())["shards"][0]
    with pytest.raises(DataError, match=rf"image id '{first['keys'][2]}' is listed in shard train-000000\.tar "
                                        rf"and again in shard train-000001\.tar"):
        load_index(root, "train")


def test_a_shard_that_does_not_hold_its_listed_ids_is_named_not_skipped(synthetic_shards, tmp_path, repo):
    def renamed(index):
        index["shards"][2]["keys"][3] = "synth_999999"
    root = _edited(synthetic_shards, tmp_path, renamed)
    real = json.loads((synthetic_shards / "train.json").read_text())["shards"][2]["keys"][3]
    proc = run_vwe("evaluate", "--config", str(repo / "configs/demo.yaml"), *TINY, f"data.root={root}",
                   "data.infer_split=train", f"eval.cams={tmp_path}", f"output.run_dir={tmp_path / 'run'}",
                   check=False, cwd=repo)
    assert proc.returncode == 2, proc.stderr
    assert (f"shard train-000002.tar: sample 3 is {real!r} but {root / 'train.json'} lists 'synth_999999' there"
            in proc.stderr), proc.stderr
    assert "skipped by the loader" not in proc.stderr
