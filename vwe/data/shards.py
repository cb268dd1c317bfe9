"""Webdataset shards: writing them from VOCdevkit (+SBD), their index, checksums and reading them back.

A shard `{split}-{NNNNNN}.tar` holds, per sample (key = image id, in split-list order):
    {key}.jpg          the original JPEG bytes, never re-encoded
    {key}.labels.json  JSON list of class indices 0..19 present in the image, e.g. [6, 14]
    {key}.mask.png     the index mask PNG (0 = background, c+1 = class c, 255 = ignore), when one exists
The index `{split}.json` lists the shards with sample count, byte size, SHA-256 and keys, plus the
class names. Tar headers are fixed (mtime 0, uid/gid 0, mode 0444), so the same input gives the same
bytes and a re-run can keep identical shards untouched. The shards are plain webdataset shards.

Reading: a data root is a local folder (shards memory-mapped, headers read by `tarfile`) or a URL /
`pipe:` command streamed through webdataset's `gopen` (see `locate`, docs/data.md).
"""
from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import re
import shlex
import signal
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterator
from urllib.parse import urlparse
from urllib.request import url2pathname

from PIL import Image

from vwe.data import voc as vocdata
from vwe.runtime.errors import DataError
from vwe.runtime.preempt import PREEMPT_SIGNALS
from vwe.runtime.files import atomic_write, file_sha256

INDEX_VERSION = 1
SPLITS = ("train_aug", "train", "val")
EXT_IMAGE, EXT_LABELS, EXT_MASK = "jpg", "labels.json", "mask.png"


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


@dataclass
class RawSample:
    """One sample as stored; `error` is set (and the rest may be missing) when the sample is bad."""
    shard: str
    key: str
    jpg: bytes | memoryview | None = None
    labels: list[int] = field(default_factory=list)
    mask: bytes | memoryview | None = None
    error: str | None = None


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


def _stream_error(e: BaseException) -> str:
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


def _open_stream(url: str):
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
        with _open_stream(url) as f:
            data = f.read()
    except Exception as e:
        raise DataError(f"no index for split '{split}': cannot read {url} ({_stream_error(e)}; check data.root)") from None
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
                         d.get("labels"))
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{p}: not a valid shard index ({type(e).__name__}: {e})") from None
    for s in shards:
        check_shard_name(s.name, str(p))
    if len(idx.class_names) != vocdata.NUM_CLASSES:
        raise DataError(f"{p}: {len(idx.class_names)} class names, expected {vocdata.NUM_CLASSES}")
    for s in shards:
        if len(s.keys) != s.count:
            raise DataError(f"{p}: shard {s.name} lists {len(s.keys)} keys but count {s.count}")
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
                labels: dict | None = None) -> Path:
    """Write `{root}/{split}.json`; `labels` records where the image labels came from."""
    d = {"version": INDEX_VERSION, "split": split, "num_samples": sum(s.count for s in shards),
         "class_names": list(vocdata.CLASS_NAMES), "has_masks": has_masks,
         **({"labels": labels} if labels is not None else {}),
         "sample_format": {"image": EXT_IMAGE, "labels": EXT_LABELS, "mask": EXT_MASK},
         "shards": [{"name": s.name, "count": s.count, "bytes": s.bytes, "sha256": s.sha256,
                     "keys": list(s.keys)} for s in shards]}
    p = index_path(root, split)
    atomic_write(p, (json.dumps(d, indent=1) + "\n").encode())
    return p


# ---------------------------------------------------------------- checksums

_VERIFIED: dict[tuple[str, int, int], str] = {}


def verify_shards(index: SplitIndex, shards: list[ShardInfo] | None = None) -> None:
    """Check that each shard exists with its indexed size and SHA-256 (cached per process by mtime/size).
    Streamed shards are not downloaded twice: they are checked as they are read (`read_shard`)."""
    if index.remote:
        return
    for s in shards if shards is not None else index.shards:
        p = index.path(s)
        if not p.is_file():
            raise DataError(f"shard {p} listed in {index_path(index.root, index.split)} is missing")
        st = p.stat()
        if st.st_size != s.bytes:
            raise DataError(f"shard {p}: {st.st_size} bytes, its index says {s.bytes} (truncated or replaced?)")
        ck = (str(p), st.st_size, st.st_mtime_ns)
        if _VERIFIED.get(ck) == s.sha256:
            continue
        digest = file_sha256(p)
        if digest != s.sha256:
            raise DataError(f"shard {p}: SHA-256 {digest[:16]}... does not match its index ({s.sha256[:16]}...)")
        _VERIFIED[ck] = digest


# ---------------------------------------------------------------- reading

def _check_labels(raw: bytes, where: str) -> list[int]:
    try:
        labels = json.loads(bytes(raw))
    except ValueError as e:
        raise DataError(f"{where}: {EXT_LABELS} is not JSON: {e}") from None
    if not isinstance(labels, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in labels):
        raise DataError(f"{where}: {EXT_LABELS} must be a list of class indices, got {labels!r}")
    bad = [c for c in labels if not 0 <= c < vocdata.NUM_CLASSES]
    if bad:
        raise DataError(f"{where}: label index {bad[0]} out of range 0..{vocdata.NUM_CLASSES - 1}")
    return labels


def _finish(shard: str, key: str, parts: dict[str, bytes]) -> RawSample:
    where = f"shard {shard}, sample {key!r}"
    s = RawSample(shard, key, parts.get(EXT_IMAGE), mask=parts.get(EXT_MASK))
    if s.jpg is None:
        s.error = f"{where}: no image ({key}.{EXT_IMAGE}) in the shard"
    elif EXT_LABELS not in parts:
        s.error = f"{where}: no labels ({key}.{EXT_LABELS}) in the shard"
    else:
        try:
            s.labels = _check_labels(parts[EXT_LABELS], where)
        except DataError as e:
            s.error = str(e)
    return s


_ZERO_BLOCK = bytes(512)


def _group(members: Iterator[tuple[str, bytes | memoryview]], name: str, where: str,
           expected: int | None) -> Iterator[RawSample]:
    """Samples from tar members in stored order: consecutive members sharing the key before the first
    '.' of their file name (folders dropped) form one sample, as webdataset groups them."""
    n, key, parts, last = 0, None, {}, None
    try:
        for member, data in members:
            k, _, ext = member.rsplit("/", 1)[-1].partition(".")
            if k != key:
                if key is not None:
                    n += 1
                    last = key
                    yield _finish(name, key, parts)
                key, parts = k, {}
            if ext in parts:
                raise DataError(f"{where}: member {member!r} appears twice in sample {key!r}")
            parts[ext] = data
    except DataError as e:
        if key is None:
            raise
        raise DataError(f"{e}; in or after sample {key!r}"
                        + (f" (the sample before it, {last!r}, is complete)" if last is not None else "")) from None
    if key is not None:
        n += 1
        yield _finish(name, key, parts)
    if n == 0:
        raise DataError(f"{where} holds no samples (empty tar)")
    if expected is not None and n != expected:
        raise DataError(f"{where}: {n} samples read but its index says {expected} "
                        f"(last sample {key!r}; truncated?)")


# (path, size, mtime) -> [(name, data offset, size)] of shards this process has read completely: the
# training stream replays each shard every epoch (in every loader worker), and a re-read then needs no
# header parsing at all. A changed file has another size or mtime, so it is scanned again.
_MEMBERS: dict[tuple[str, int, int], list[tuple[str, int, int]]] = {}
_MEMBERS_MAX_SHARDS = 512


def _scan_members(f, view: memoryview, where: str) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of each regular file, read by the standard library's tarfile (ustar,
    GNU, pax); a cut or corrupt archive raises DataError."""
    if bytes(view[:512]) == _ZERO_BLOCK:
        return           # a valid tar without members (tarfile calls it "empty file")
    try:
        tf = tarfile.open(fileobj=f, mode="r:")
    except tarfile.TarError as e:
        raise DataError(f"{where}: not a readable tar archive ({e})") from None
    while True:
        try:
            ti = tf.next()
        except tarfile.TarError as e:
            raise DataError(f"{where}: truncated or corrupt tar ({e})") from None
        if ti is None:
            break
        tf.members = []          # tarfile keeps every header otherwise
        if ti.isreg():
            if ti.offset_data + ti.size > len(view):
                raise DataError(f"{where}: truncated tar (member {ti.name!r} at byte {ti.offset} needs "
                                f"{ti.size} bytes, {len(view) - ti.offset_data} left)")
            yield ti.name, ti.offset_data, ti.size
    # tarfile ends quietly at a cut or corrupt header; a complete archive has its end marker here
    if bytes(view[tf.offset:tf.offset + 512]) != _ZERO_BLOCK:
        raise DataError(f"{where}: truncated tar (archive cut or corrupt at byte {tf.offset}: no valid "
                        f"header and no end-of-archive marker)")


def _local_members(path: Path, where: str) -> Iterator[tuple[str, memoryview]]:
    """(name, data) of each regular file of a local tar: headers read by tarfile (once per process and
    file version, see _MEMBERS), data left in place in the memory-mapped file (zero copy; loader
    workers skip the samples they do not decode without reading them)."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            view = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
            ck = (str(path), st.st_size, st.st_mtime_ns)
            cached = _MEMBERS.get(ck)
            if cached is not None:
                for name, start, size in cached:
                    yield name, view[start:start + size]
                return
            members = []
            for name, start, size in _scan_members(f, view, where):
                members.append((name, start, size))
                yield name, view[start:start + size]
            if len(_MEMBERS) >= _MEMBERS_MAX_SHARDS:
                _MEMBERS.pop(next(iter(_MEMBERS)))
            _MEMBERS[ck] = members
    except OSError as e:
        raise DataError(f"{where}: cannot read: {e}") from None


class _HashingReader:
    """A read-only stream that hashes and counts what passes through it; `unread` puts bytes back."""

    def __init__(self, stream):
        self.stream, self.sha, self.bytes, self.pending = stream, hashlib.sha256(), 0, b""

    def unread(self, data: bytes) -> None:
        self.pending = data + self.pending

    def read(self, n: int = -1) -> bytes:
        if self.pending:
            data = self.pending if n < 0 else self.pending[:n]
            self.pending = self.pending[len(data):]
            return data
        data = self.stream.read(n)
        self.sha.update(data)
        self.bytes += len(data)
        return data


def _close_stream(stream, complete: bool) -> None:
    """Close a gopen stream. After a complete read its errors (e.g. curl's exit status) propagate; a
    stream abandoned early (the reader had what it needed) has its process ended quietly."""
    proc = getattr(stream, "proc", None)
    if complete:
        stream.close()
        return
    if proc is not None and proc.poll() is None:
        proc.kill()
    try:
        stream.close()
    except Exception:   # the killed command's status: nothing was expected from it any more
        pass


def _remote_members(url: str, where: str, size: int | None,
                    sha256: str | None) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file of a shard streamed through webdataset's gopen (http(s) by curl,
    `pipe:` commands, ...), parsed by the standard library's tarfile in stream mode. The stream is
    counted and hashed as it goes: at its end the size (and, given `sha256`, the SHA-256) must match the
    index, else DataError naming the shard."""
    try:
        stream = _open_stream(url)
    except Exception as e:
        raise DataError(f"{where}: cannot open: {_stream_error(e)}") from None
    reader, complete = _HashingReader(stream), False
    try:
        try:
            head = reader.read(512)
            reader.unread(head)
            # a valid tar without members starts with its end marker (tarfile calls that "empty file")
            members = () if head == _ZERO_BLOCK else tarfile.open(fileobj=reader, mode="r|")
            for ti in members:
                members.members = []
                if ti.isreg():
                    yield ti.name, members.extractfile(ti).read()
            while reader.read(1 << 16):     # the end-of-archive blocks and padding: all bytes get hashed
                pass
        except (tarfile.TarError, OSError, ValueError) as e:
            msg = _stream_error(e)
            try:
                _close_stream(stream, True)
            except Exception as status:      # the reading command's exit status says more
                if _stream_error(status) != msg:
                    msg = f"{msg}; {_stream_error(status)}"
            raise DataError(f"{where}: cannot read the streamed tar: {msg}") from None
        complete = True
    finally:
        try:
            _close_stream(stream, complete)
        except Exception as e:
            raise DataError(f"{where}: the stream failed: {_stream_error(e)}") from None
    if size is not None and reader.bytes != size:
        raise DataError(f"shard {url}: {reader.bytes} bytes streamed, its index says {size} (truncated or replaced?)")
    if sha256 is not None and reader.sha.hexdigest() != sha256:
        raise DataError(f"shard {url}: SHA-256 {reader.sha.hexdigest()[:16]}... of the streamed bytes does not "
                        f"match its index ({sha256[:16]}...)")


def iter_shard(path: Path | str, expected: int | None = None, *, name: str | None = None,
               size: int | None = None, sha256: str | None = None) -> Iterator[RawSample]:
    """Samples of one shard in stored order. Bad samples come with `error` set (the caller decides);
    a shard that is missing, empty, truncated or unreadable raises DataError naming it.

    `path` is a local file (read memory-mapped: `jpg` and `mask` are zero-copy memoryviews, which
    compare equal to bytes) or a URL / `pipe:` command (see `is_remote`), streamed; a streamed shard is
    checked against `size` and `sha256` (its index entry) at its end. `name` names the shard in samples
    (default: the file name)."""
    if isinstance(path, str) and is_remote(path):
        where = f"shard {path}"
        yield from _group(_remote_members(path, where, size, sha256), name or path.rsplit("/", 1)[-1],
                          where, expected)
        return
    path = Path(path)
    if not path.is_file():
        raise DataError(f"shard {path} is missing")
    if path.stat().st_size == 0:
        raise DataError(f"shard {path} is empty (0 bytes)")
    yield from _group(_local_members(path, f"shard {path}"), name or path.name, f"shard {path}", expected)


def remember_members(index: SplitIndex, shards: list[ShardInfo]) -> None:
    """Read the tar headers of local shards into this process's offset memory (_MEMBERS), so that
    loader worker processes forked afterwards start with it instead of each parsing them again."""
    if index.remote:
        return
    for s in shards:
        for _ in _local_members(Path(index.path(s)), f"shard {index.path(s)}"):
            pass


def read_shard(index: SplitIndex, shard: ShardInfo, verify: bool = True) -> Iterator[RawSample]:
    """The samples of one shard of `index` (local or streamed; a streamed one is verified as it goes)."""
    return iter_shard(index.path(shard), shard.count, name=shard.name, size=shard.bytes,
                      sha256=shard.sha256 if verify else None)


# ---------------------------------------------------------------- writing

def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0o444, 0, 0, "", ""
    return ti


def write_shard(path: Path, samples: list[RawSample]) -> tuple[ShardInfo, bool]:
    """Write samples into a tar atomically; keep an existing identical file. Returns (info, rewritten)."""
    path = Path(path)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for s in samples:
            members = [(EXT_IMAGE, s.jpg), (EXT_LABELS, json.dumps(sorted(s.labels)).encode())]
            if s.mask is not None:
                members.append((EXT_MASK, s.mask))
            for ext, data in members:
                tf.addfile(_tarinfo(f"{s.key}.{ext}", len(data)), io.BytesIO(data))
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    info = ShardInfo(path.name, len(samples), digest, len(data), tuple(s.key for s in samples))
    if path.is_file() and path.stat().st_size == len(data) and file_sha256(path) == digest:
        return info, False
    atomic_write(path, data)
    return info, True


def _jpeg_size(data: bytes, where: str) -> tuple[int, int]:
    """(width, height) of a JPEG after checking it decodes (at 1/8 scale: fast, reads all the data)."""
    try:
        im = Image.open(io.BytesIO(data))
        if im.format != "JPEG":
            raise DataError(f"{where}: not a JPEG (format {im.format})")
        size = im.size
        im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
        im.load()
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{where}: cannot decode JPEG: {e}") from None
    return size


LABEL_SOURCES = ("xml", "mask")


class _Source:
    """Finds image, mask and labels for an id in VOC (+SBD) folders.

    Image labels come from `labels` first ("xml": the VOC annotation, every object including difficult
    ones, as the published code's cls_labels.npy; "mask": the classes present in the mask) and from the
    other where that file is missing; `counts` tallies which one each image used."""

    def __init__(self, layout: vocdata.VocLayout, sbd_dir: Path | None, labels: str = "xml"):
        if labels not in LABEL_SOURCES:
            raise DataError(f"label source must be one of {', '.join(LABEL_SOURCES)}, got {labels!r}")
        self.layout, self.sbd_dir, self.labels = layout, sbd_dir, labels
        self.counts = {"xml": 0, "mask": 0}

    def sample(self, image_id: str) -> RawSample:
        lay = self.layout
        jpg_path = lay.images / f"{image_id}.jpg"
        if not jpg_path.is_file() and self.sbd_dir is not None and (self.sbd_dir / "img" / f"{image_id}.jpg").is_file():
            jpg_path = self.sbd_dir / "img" / f"{image_id}.jpg"
        if not jpg_path.is_file():
            raise DataError(f"image {image_id!r}: {lay.images / (image_id + '.jpg')} not found")
        jpg = jpg_path.read_bytes()
        w, h = _jpeg_size(jpg, str(jpg_path))
        mask, mask_src, mask_labels = None, None, None
        for cand in (lay.seg_class / f"{image_id}.png",
                     self.sbd_dir / "cls" / f"{image_id}.mat" if self.sbd_dir else None,
                     lay.seg_class_aug / f"{image_id}.png"):
            if cand is not None and cand.is_file():
                mask_src = cand
                break
        if mask_src is not None:
            if mask_src.suffix == ".mat":
                arr = vocdata.load_sbd_mask(mask_src)
                mask = vocdata.encode_mask(arr)
            else:
                mask = mask_src.read_bytes()
                arr = vocdata.decode_mask(mask, str(mask_src))
            if arr.shape != (h, w):
                raise DataError(f"{mask_src}: mask is {arr.shape[1]}x{arr.shape[0]} but image {jpg_path} is {w}x{h}")
            mask_labels = vocdata.labels_from_mask(arr, str(mask_src))
        xml = lay.annotations / f"{image_id}.xml"
        use = self.labels
        if use == "xml" and not xml.is_file():
            use = "mask"
        elif use == "mask" and mask_labels is None:
            use = "xml"
        if use == "mask" and mask_labels is None or use == "xml" and not xml.is_file():
            raise DataError(f"image {image_id!r}: no annotation {xml} and no mask (SegmentationClass, SBD, "
                            f"SegmentationClassAug)")
        labels = vocdata.labels_from_xml(xml) if use == "xml" else mask_labels
        self.counts[use] += 1
        return RawSample("", image_id, jpg, labels, mask)


def split_ids(layout: vocdata.VocLayout, sbd_dir: Path | None) -> dict[str, list[str]]:
    """Image ids per split; train_aug = SBD train + SBD val + VOC train - VOC val (VOC train without SBD)."""
    train = vocdata.read_id_list(layout.seg_lists / "train.txt")
    val = vocdata.read_id_list(layout.seg_lists / "val.txt")
    if sbd_dir is None:
        aug = list(train)
    else:
        pool = set(vocdata.read_id_list(sbd_dir / "train.txt")) | set(vocdata.read_id_list(sbd_dir / "val.txt")) | set(train)
        aug = sorted(pool - set(val))
    return {"train_aug": aug, "train": train, "val": val}


def prepare(voc: Path, sbd: Path | None, out: Path, shard_size: int = 1000, labels: str = "xml") -> None:
    """Convert VOC2012 (+SBD) into shards and an index per split under `out`; image labels from the
    XML annotations (`labels="xml"`, as the published code) or from the masks (`"mask"`), each falling
    back to the other where its file is missing."""
    if shard_size < 1:
        raise DataError(f"shard size must be >= 1, got {shard_size}")
    if labels not in LABEL_SOURCES:
        raise DataError(f"label source must be one of {', '.join(LABEL_SOURCES)}, got {labels!r}")
    layout = vocdata.find_voc(Path(voc))
    print(f"prepare: VOC2012 data found at {layout.root}")
    sbd_dir = vocdata.find_sbd(Path(sbd)) if sbd is not None else None
    if sbd_dir is not None:
        print(f"prepare: SBD data found at {sbd_dir}")
    else:
        print("prepare: no SBD given: train_aug = VOC train only")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tar.tmp*"):
        stale.unlink()
    for split, ids in split_ids(layout, sbd_dir).items():
        if not ids:
            raise DataError(f"split '{split}' is empty")
        source = _Source(layout, sbd_dir, labels)
        infos, rewritten, with_mask = [], 0, 0
        for i in range(0, len(ids), shard_size):
            samples = [source.sample(k) for k in ids[i:i + shard_size]]
            with_mask += sum(s.mask is not None for s in samples)
            info, new = write_shard(out / f"{split}-{i // shard_size:06d}.tar", samples)
            infos.append(info)
            rewritten += new
        other = "mask" if labels == "xml" else "xml"
        label_info = {"source": labels, "fallback": other, "images_from_fallback": source.counts[other]}
        write_index(out, split, infos, has_masks=with_mask == len(ids), labels=label_info)
        listed = {s.name for s in infos}
        for old in out.glob(f"{split}-*.tar"):
            if old.name not in listed:
                old.unlink()
        print(f"prepare: {split}: {len(ids)} samples ({with_mask} with masks; labels from {labels}, "
              f"{source.counts[other]} from the {other} fallback) in {len(infos)} shards "
              f"({rewritten} written, {len(infos) - rewritten} kept identical) -> {index_path(out, split)}")
