"""Reading shards back: local ones memory-mapped (headers parsed by `tarfile` once per process), remote
ones streamed and verified as they are read; samples grouped from tar members as webdataset groups them.

A shard `{split}-{NNNNNN}.tar` holds, per sample (key = image id, in split-list order):
    {key}.jpg          the original JPEG bytes, never re-encoded
    {key}.labels.json  JSON list of class indices 0..19 present in the image, e.g. [6, 14]
    {key}.mask.png     the index mask PNG (0 = background, c+1 = class c, 255 = ignore), when one exists
    {key}.target.png   a segmentation split's training target (pseudo labels; same values), when it has one
"""

import hashlib
import json
import mmap
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from vwe.data import voc as vocdata
from vwe.data.index import (EXT_IMAGE, EXT_LABELS, EXT_MASK, EXT_TARGET, ShardInfo, SplitIndex, index_path,
                            is_remote, open_stream, stream_error)
from vwe.runtime.errors import DataError
from vwe.runtime.files import file_sha256


@dataclass
class RawSample:
    """One sample as stored; `error` is set (and the rest may be missing) when the sample is bad."""
    shard: str
    key: str
    jpg: bytes | memoryview | None = None
    labels: list[int] = field(default_factory=list)
    mask: bytes | memoryview | None = None
    error: str | None = None
    target: bytes | memoryview | None = None  # a segmentation split's training target (index PNG)


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


def _finish(shard: str, key: str, members: dict[str, bytes]) -> RawSample:
    where = f"shard {shard}, sample {key!r}"
    s = RawSample(shard, key, members.get(EXT_IMAGE), mask=members.get(EXT_MASK), target=members.get(EXT_TARGET))
    if s.jpg is None:
        s.error = f"{where}: no image ({key}.{EXT_IMAGE}) in the shard"
    elif EXT_LABELS not in members:
        s.error = f"{where}: no labels ({key}.{EXT_LABELS}) in the shard"
    else:
        try:
            s.labels = _check_labels(members[EXT_LABELS], where)
        except DataError as e:
            s.error = str(e)
    return s


_ZERO_BLOCK = bytes(512)


def _group(members: Iterator[tuple[str, bytes | memoryview]], name: str, where: str,
           expected: int | None) -> Iterator[RawSample]:
    """Samples from tar members in stored order: consecutive members sharing the key before the first
    '.' of their file name (folders dropped) form one sample, as webdataset groups them."""
    n, key, sample, last = 0, None, {}, None
    try:
        for member, data in members:
            k, _, ext = member.rsplit("/", 1)[-1].partition(".")
            if k != key:
                if key is not None:
                    n += 1
                    last = key
                    yield _finish(name, key, sample)
                key, sample = k, {}
            if ext in sample:
                raise DataError(f"{where}: member {member!r} appears twice in sample {key!r}")
            sample[ext] = data
    except DataError as e:
        if key is None:
            raise
        raise DataError(f"{e}; in or after sample {key!r}"
                        + (f" (the sample before it, {last!r}, is complete)" if last is not None else "")) from None
    if key is not None:
        n += 1
        yield _finish(name, key, sample)
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
        stream = open_stream(url)
    except Exception as e:
        raise DataError(f"{where}: cannot open: {stream_error(e)}") from None
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
            msg = stream_error(e)
            try:
                _close_stream(stream, True)
            except Exception as status:      # the reading command's exit status says more
                if stream_error(status) != msg:
                    msg = f"{msg}; {stream_error(status)}"
            raise DataError(f"{where}: cannot read the streamed tar: {msg}") from None
        complete = True
    finally:
        try:
            _close_stream(stream, complete)
        except Exception as e:
            raise DataError(f"{where}: the stream failed: {stream_error(e)}") from None
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
    """The samples of one shard of `index` (local or streamed; a streamed one is verified as it goes), each
    checked to be the one the index lists at its place (DataError naming both keys otherwise)."""
    samples = iter_shard(index.path(shard), shard.count, name=shard.name, size=shard.bytes,
                         sha256=shard.sha256 if verify else None)
    for i, raw in enumerate(samples):
        if i < len(shard.keys) and raw.key != shard.keys[i]:
            raise DataError(f"shard {shard.name}: sample {i} is {raw.key!r} but "
                            f"{index_path(index.root, index.split)} lists {shard.keys[i]!r} there (the shard and "
                            f"its index do not belong together: rerun `vwe prepare`)")
        yield raw

