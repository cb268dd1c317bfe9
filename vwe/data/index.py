"""The shard index of a split (`{split}.json`) and where a data root's files are.

The index lists a split's shards with sample count, byte size, SHA-256 and keys, plus the class names
and where the image labels (and, for a segmentation split, the training targets) came from. A data root
is a local folder, or a URL / `pipe:` command streamed through webdataset's `gopen` (docs/data.md).
"""

import json
import os
import re
import shlex
import signal
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from urllib.parse import urlparse
from urllib.request import url2pathname

from vwe.data import voc as vocdata
from vwe.runtime.errors import DataError
from vwe.runtime.files import atomic_write
from vwe.runtime.preempt import PREEMPT_SIGNALS

INDEX_VERSION = 1
SPLITS = ("train_aug", "train", "val")
EXT_IMAGE, EXT_LABELS, EXT_MASK, EXT_TARGET = "jpg", "labels.json", "mask.png", "target.png"


@dataclass(frozen=True)
class ShardInfo:
    name: str
    count: int
    sha256: str
    bytes: int
    keys: tuple[str, ...]


@dataclass(frozen=True)
class SplitIndex:
    root: Path | str                 # a local folder, or a URL / `pipe:` command (see `locate`)
    split: str
    shards: tuple[ShardInfo, ...]
    class_names: tuple[str, ...]
    has_masks: bool
    labels: dict | None = None       # where the image labels came from (prepare's record), if known
    targets: dict | None = None      # a segmentation split: where its training targets came from

    @property
    def num_samples(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def keys(self) -> list[str]:
        return [k for s in self.shards for k in s.keys]

    @property
    def remote(self) -> bool:
        return is_remote(self.root)

    def path(self, shard: ShardInfo) -> Path | str:
        """The shard's local path, or its URL / `pipe:` command when the root is remote."""
        return locate(self.root, shard.name)



# ---------------------------------------------------------------- locations

def is_remote(root: str | os.PathLike) -> bool:
    """True for a location webdataset's gopen streams: a URL with a scheme (http://, https://, ...,
    not file://) or a `pipe:` command; False for a local path."""
    text = str(root)
    return text.startswith("pipe:") or (re.match(r"^[A-Za-z][A-Za-z0-9+.-]+://", text) is not None
                                        and not text.startswith("file://"))


def _local_root(root: str | os.PathLike) -> Path:
    text = str(root)
    return Path(url2pathname(urlparse(text).path)) if text.startswith("file://") else Path(root)


def locate(root: str | os.PathLike, name: str) -> Path | str:
    """Where file `name` (an index or a shard) of a data root is: a local path, `{root}/{name}` for a
    URL, or the `pipe:` command with `{name}` replaced."""
    text = str(root)
    if not is_remote(text):
        return _local_root(root) / name
    if text.startswith("pipe:"):
        if "{name}" not in text:
            raise DataError(f"data.root {text!r}: a pipe: command must contain {{name}}, which is replaced by "
                            f"the file to read (e.g. 'pipe:curl -s -f https://host/shards/{{name}}')")
        return text.replace("{name}", name)
    return text.rstrip("/") + "/" + name


def index_path(root: str | os.PathLike, split: str) -> Path | str:
    return locate(root, f"{split}.json")


def stream_error(e: BaseException) -> str:
    """webdataset's message for a failed reading command, shortened to what a user acts on."""
    m = re.search(r"exit (-?\d+)", str(e))
    if m is None:
        return str(e)
    status = int(m.group(1))
    hint = " (curl: the server answered with an HTTP error, e.g. 404 not found)" if status == 22 else ""
    return f"the reading command exited with status {status}{hint}"


# Prefix of the shell commands that stream shards: they ignore the preemption signals (an ignored
# signal stays ignored in the programs a shell starts). A SIGTERM/SIGUSR1 sent to every process of a job
# must reach vwe, which stops cleanly after its checkpoint, and not kill a download, whose death would
# fail the run first. (Loader worker processes ignore these signals for the same reason.)
_SHIELD = "trap '' " + " ".join(signal.Signals(s).name[3:] for s in PREEMPT_SIGNALS) + "; "
# what webdataset's gopen runs for http(s) URLs (gopen_curl), here as a shell command so it can be shielded
_CURL = "exec curl --connect-timeout 30 --retry 30 --retry-delay 2 -f -s -L "


def open_stream(url: str):
    """Open a remote location with webdataset's gopen; `pipe:` commands and http(s) downloads (curl, as
    webdataset runs it) are started with the preemption signals ignored (see _SHIELD)."""
    from webdataset.gopen import gopen
    if url.startswith("pipe:"):
        return gopen("pipe:" + _SHIELD + url[5:], "rb")
    if url.startswith(("http://", "https://")):
        return gopen("pipe:" + _SHIELD + _CURL + shlex.quote(url), "rb")
    return gopen(url, "rb")


def _read_remote_index(url: str, split: str) -> bytes:
    try:
        with open_stream(url) as f:
            data = f.read()
    except Exception as e:
        raise DataError(f"no index for split '{split}': cannot read {url} ({stream_error(e)}; check data.root)") from None
    if not data:
        raise DataError(f"no index for split '{split}': {url} is empty (check data.root)")
    return data


def load_index(root: str | os.PathLike, split: str) -> SplitIndex:
    """Read and check `{split}.json` of a data root (a folder, a URL or a `pipe:` command)."""
    if is_remote(root):
        root = str(root)
        p = index_path(root, split)
        text = _read_remote_index(p, split)
    else:
        root = _local_root(root)
        if not root.is_dir():
            raise DataError(f"data folder not found: {root} (data.root; the shipped configs take it from "
                            f"$VWE_SHARDS): set data.root or VWE_SHARDS, or run `vwe prepare --out {root}`")
        p = index_path(root, split)
        if not p.is_file():
            have = sorted(q.stem for q in root.glob("*.json"))
            raise DataError(f"no index for split '{split}': {p} is missing (splits here: "
                            f"{', '.join(have) or 'none'}; run `vwe prepare`)")
        text = p.read_bytes()
    try:
        d = json.loads(text)
        shards = tuple(ShardInfo(s["name"], int(s["count"]), s["sha256"], int(s["bytes"]), tuple(s["keys"]))
                       for s in d["shards"])
        idx = SplitIndex(root, d["split"], shards, tuple(d["class_names"]), bool(d["has_masks"]),
                         d.get("labels"), d.get("targets"))
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{p}: not a valid shard index ({type(e).__name__}: {e})") from None
    for s in shards:
        check_shard_name(s.name, str(p))
    if len(idx.class_names) != vocdata.NUM_CLASSES:
        raise DataError(f"{p}: {len(idx.class_names)} class names, expected {vocdata.NUM_CLASSES}")
    seen_shards: set[str] = set()
    seen_keys: dict[str, str] = {}
    for s in shards:
        if len(s.keys) != s.count:
            raise DataError(f"{p}: shard {s.name} lists {len(s.keys)} keys but count {s.count}")
        if s.name in seen_shards:
            raise DataError(f"{p}: shard {s.name} is listed twice (its images would be used twice)")
        seen_shards.add(s.name)
        for k in s.keys:
            if k in seen_keys:
                raise DataError(f"{p}: image id {k!r} is listed in shard {seen_keys[k]} and again in shard {s.name}")
            seen_keys[k] = s.name
    return idx


def check_shard_name(name: str, index: str) -> None:
    """A shard named by an index must lie in the index's folder: a relative path without `..` (and not
    a URL or pipe: command of its own), in plain characters (it may be put into a `pipe:` command)."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if (not name or name.startswith(("/", "\\")) or PureWindowsPath(name).drive or ".." in parts
            or re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", name)):
        raise DataError(f"{index}: shard entry {name!r} names a file outside the index's folder "
                        f"(shard names must be relative paths without '..')")
    if not re.fullmatch(r"[A-Za-z0-9_.+/-]+", name):
        raise DataError(f"{index}: shard entry {name!r} has characters other than letters, digits and "
                        f"'_.+-/' (refused: the name may become part of a pipe: command)")


def write_index(root: Path, split: str, shards: list[ShardInfo], has_masks: bool,
                labels: dict | None = None, targets: dict | None = None) -> Path:
    """Write `{root}/{split}.json`; `labels` records where the image labels came from."""
    d = {"version": INDEX_VERSION, "split": split, "num_samples": sum(s.count for s in shards),
         "class_names": list(vocdata.CLASS_NAMES), "has_masks": has_masks,
         **({"labels": labels} if labels is not None else {}),
         **({"targets": targets} if targets is not None else {}),
         "sample_format": {"image": EXT_IMAGE, "labels": EXT_LABELS, "mask": EXT_MASK},
         "shards": [{"name": s.name, "count": s.count, "bytes": s.bytes, "sha256": s.sha256,
                     "keys": list(s.keys)} for s in shards]}
    p = index_path(root, split)
    atomic_write(p, (json.dumps(d, indent=1) + "\n").encode())
    return p

