"""Generated tar archives and gzip blobs for the zinfo / extract / builder tests.

`TarEntrySpec` lists describe an archive; `make_tar` writes it with `tarfile` (PAX format, so
long names, unicode and big ids work); `member` and `members_tar` write hand-made members
(any name, PAX records, metadata) for the applier tests; `compress` turns a tar into a gzip blob with one of
several compressors (Python gzip levels, the `gzip` and `pigz` commands, multi-member splits).
Everything is deterministic for a given spec.
"""

from __future__ import annotations

import gzip
import io
import random
import shutil
import subprocess
import tarfile
import zlib
from dataclasses import dataclass
from typing import Any, Literal

EntryKind = Literal["reg", "dir", "symlink", "hardlink", "fifo", "char", "block"]
ContentKind = Literal["random", "text", "zeros", "mixed"]

_WORDS = (
    b"alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
    b"sigma tau upsilon phi chi psi omega container layer snapshot span checkpoint window "
).split()


def content(kind: ContentKind, size: int, seed: int) -> bytes:
    """Deterministic file content of `size` bytes."""
    rng = random.Random(seed)
    if kind == "random":
        return rng.randbytes(size)
    if kind == "zeros":
        return bytes(size)
    if kind == "text":
        out = bytearray()
        while len(out) < size:
            out += rng.choice(_WORDS) + (b"\n" if rng.random() < 0.1 else b" ")
        return bytes(out[:size])
    # mixed: alternate random and text runs, so deflate switches between stored and coded blocks
    out = bytearray()
    while len(out) < size:
        run = rng.randint(1, 40000)
        out += content("random" if rng.random() < 0.5 else "text", run, rng.randint(0, 1 << 30))
    return bytes(out[:size])


@dataclass(frozen=True)
class TarEntrySpec:
    """One archive member. `target` is the link target for symlinks and hardlinks."""

    name: str
    kind: EntryKind = "reg"
    size: int = 0
    content: ContentKind = "text"
    seed: int = 0
    target: str = ""

    def data(self) -> bytes:
        return content(self.content, self.size, self.seed) if self.kind == "reg" else b""


_TYPES = {
    "reg": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "fifo": tarfile.FIFOTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
}


def make_tar(entries: list[TarEntrySpec], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """The tar archive (with its end-of-archive blocks and record padding) for `entries`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for i, spec in enumerate(entries):
            info = tarfile.TarInfo(spec.name)
            info.type = _TYPES[spec.kind]
            info.mtime = 1_700_000_000 + i
            info.mode = 0o755 if spec.kind == "dir" else 0o644
            info.uname = "root"
            info.gname = "root"
            if spec.kind in ("symlink", "hardlink"):
                info.linkname = spec.target
            if spec.kind in ("char", "block"):
                info.devmajor, info.devminor = 1, 3
            data = spec.data()
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, **fields: Any) -> tarfile.TarInfo:
    """A tar member called `name` (kept as given, `..` and all): mode 0755 for directories,
    else 0644, mtime 1700000000, no owner names; `fields` set any other `TarInfo` attribute
    (`uid`, `linkname`, `pax_headers`, ...)."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = fields.pop("mode", 0o755 if kind == tarfile.DIRTYPE else 0o644)
    info.mtime = fields.pop("mtime", 1_700_000_000)
    info.uname = info.gname = ""
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def members_tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    """A PAX tar of `(member, data)` pairs; a regular member's size is its data's length."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


Compressor = Literal[
    "py0", "py1", "py6", "py9", "gzip-cmd", "pigz", "multi-member", "multi-member-3", "zlib-sync"
]
COMPRESSORS: tuple[Compressor, ...] = (
    "py0",
    "py1",
    "py6",
    "py9",
    "gzip-cmd",
    "pigz",
    "multi-member",
    "multi-member-3",
    "zlib-sync",
)


def have_pigz() -> bool:
    return shutil.which("pigz") is not None


def _gzip_member(data: bytes, level: int) -> bytes:
    return gzip.compress(data, compresslevel=level, mtime=0)


def compress(data: bytes, how: Compressor, split_seed: int = 0) -> bytes:
    """Gzip `data` with compressor `how`.

    `multi-member` splits at a pseudo-random point (usually inside a file) into two members;
    `multi-member-3` makes three, with different levels. `zlib-sync` inserts full flushes, which
    puts empty stored blocks (and so bits != 0 boundaries) in the stream.
    """
    if how.startswith("py"):
        return _gzip_member(data, int(how[2:]))
    if how == "gzip-cmd":
        return subprocess.run(
            ["gzip", "-6", "-n", "-c"], input=data, check=True, capture_output=True
        ).stdout
    if how == "pigz":
        return subprocess.run(
            ["pigz", "-6", "-n", "-c", "-b", "128"], input=data, check=True, capture_output=True
        ).stdout
    rng = random.Random(split_seed)
    if how == "multi-member":
        cut = rng.randint(0, len(data))
        return _gzip_member(data[:cut], 6) + _gzip_member(data[cut:], 6)
    if how == "multi-member-3":
        a, b = sorted(rng.randint(0, len(data)) for _ in range(2))
        return _gzip_member(data[:a], 1) + _gzip_member(data[a:b], 9) + _gzip_member(data[b:], 0)
    if how == "zlib-sync":
        comp = zlib.compressobj(6, zlib.DEFLATED, 31)
        out = bytearray()
        pos = 0
        while pos < len(data):
            step = rng.randint(1000, 100000)
            out += comp.compress(data[pos : pos + step])
            out += comp.flush(zlib.Z_FULL_FLUSH if rng.random() < 0.5 else zlib.Z_SYNC_FLUSH)
            pos += step
        out += comp.flush()
        return bytes(out)
    raise ValueError(f"unknown compressor {how!r}")
