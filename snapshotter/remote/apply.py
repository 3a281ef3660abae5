"""Applying a layer's tar stream into a snapshot directory, as containerd's applier does.

OCI whiteouts are converted to overlayfs form: `.wh.<name>` becomes a character device 0/0
named `<name>`, `.wh..wh..opq` sets `trusted.overlay.opaque=y` (`user.overlay.opaque` with
`userxattr`) on its directory. The uncompressed stream is hashed on the way (its diffID).
Synchronous: run it in a worker thread.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import shutil
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, cast

import zstandard

from index.digest import Digest
from index.oci import mediatypes as mt

from .errors import UnpackError

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
PAX_XATTR_PREFIX = "SCHILY.xattr."
COPY_CHUNK_BYTES = 1024 * 1024


class _HashingReader(io.RawIOBase):
    """Passes reads through and hashes every byte (the diffID of the tar stream)."""

    def __init__(self, inner: IO[bytes]) -> None:
        self._inner = inner
        self.hasher = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._inner.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.hasher.update(data)
        return n


@contextlib.contextmanager
def decompressed(path: Path, media_type: str) -> Iterator[IO[bytes]]:
    try:
        compression = mt.layer_compression(media_type)
    except ValueError:
        compression = mt.LayerCompression.GZIP
    with open(path, "rb") as raw:
        if compression is mt.LayerCompression.ZSTD:
            with zstandard.ZstdDecompressor().stream_reader(raw) as z:
                yield z
        elif compression is mt.LayerCompression.NONE:
            yield raw
        else:
            with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
                yield cast(IO[bytes], gz)


def _clean(name: str) -> str:
    """The member path relative to the layer root; raises UnpackError for escaping names."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UnpackError(f"tar entry {name!r} escapes the layer root")
    return "/".join(parts)


class _Applier:
    """Applies tar members under `root` (an empty directory owned by this unpack)."""

    def __init__(self, root: Path, opaque_xattr: str) -> None:
        self.root = root
        self.real_root = os.path.realpath(root)
        self.opaque_xattr = opaque_xattr
        self.dir_times: list[tuple[str, int]] = []

    def _inside(self, rel: str) -> str:
        """Absolute path of `rel`, after checking no parent component is a symlink out."""
        path = os.path.join(self.real_root, rel) if rel else self.real_root
        parent = os.path.realpath(os.path.dirname(path))
        if parent != self.real_root and not parent.startswith(self.real_root + os.sep):
            raise UnpackError(f"tar entry {rel!r} resolves outside the layer root")
        return path

    def _parent(self, rel: str) -> None:
        parent = os.path.dirname(rel)
        if parent:
            os.makedirs(self._inside(parent), mode=0o755, exist_ok=True)

    @staticmethod
    def _remove(path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)

    def apply(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        rel = _clean(m.name)
        base = os.path.basename(rel)
        if base == OPAQUE_MARKER:
            d = os.path.dirname(rel)
            if d:
                self._parent(rel)
            path = self._inside(d) if d else self.real_root
            os.makedirs(path, mode=0o755, exist_ok=True)
            os.setxattr(path, self.opaque_xattr, b"y", follow_symlinks=False)
            return
        if base.startswith(WHITEOUT_PREFIX):
            target = os.path.join(os.path.dirname(rel), base[len(WHITEOUT_PREFIX) :])
            self._parent(target)
            path = self._inside(target)
            self._remove(path)
            os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))
            return
        if not rel:
            path = self.real_root
        else:
            self._parent(rel)
            path = self._inside(rel)
        if m.isdir():
            if os.path.lexists(path) and not os.path.isdir(path):
                self._remove(path)
            os.makedirs(path, mode=0o755, exist_ok=True)
        else:
            self._remove(path)
            if m.isreg():
                src = tf.extractfile(m)
                assert src is not None
                with src, open(path, "wb") as out:
                    shutil.copyfileobj(src, out, COPY_CHUNK_BYTES)
            elif m.issym():
                os.symlink(m.linkname, path)
            elif m.islnk():
                os.link(self._inside(_clean(m.linkname)), path, follow_symlinks=False)
                return  # a hard link shares the target's inode and attributes
            elif m.ischr() or m.isblk():
                kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
                os.mknod(path, kind | 0o600, os.makedev(m.devmajor, m.devminor))
            elif m.isfifo():
                os.mkfifo(path)
            else:
                raise UnpackError(f"tar entry {m.name!r} has unsupported type {m.type!r}")
        os.lchown(path, m.uid, m.gid)
        if not m.issym():
            os.chmod(path, m.mode & 0o7777)
        for key, value in sorted(m.pax_headers.items()):
            if key.startswith(PAX_XATTR_PREFIX):
                raw = value.encode("utf-8", "surrogateescape")
                os.setxattr(path, key[len(PAX_XATTR_PREFIX) :], raw, follow_symlinks=False)
        mtime_ns = int(m.mtime * 1_000_000_000)
        if m.isdir():
            self.dir_times.append((path, mtime_ns))
        else:
            os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)

    def finish(self) -> None:
        for path, mtime_ns in reversed(self.dir_times):
            os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)


def apply_tar(stream: IO[bytes], root: Path, *, userxattr: bool = False) -> Digest:
    """Apply the tar stream into `root` with whiteout conversion; return the stream's diffID.

    Raises UnpackError (bad tar, escaping paths, unsupported entries, OSError).
    """
    opaque = "user.overlay.opaque" if userxattr else "trusted.overlay.opaque"
    hashing = _HashingReader(stream)
    applier = _Applier(root, opaque)
    try:
        with tarfile.open(fileobj=hashing, mode="r|", format=tarfile.PAX_FORMAT) as tf:
            for member in tf:
                applier.apply(tf, member)
        applier.finish()
        while hashing.read(COPY_CHUNK_BYTES):
            pass
    except (tarfile.TarError, OSError, EOFError, zstandard.ZstdError) as e:
        raise UnpackError(f"applying layer into {root}: {e}") from e
    return Digest.from_hasher(hashing.hasher)


def clear_dir(root: Path) -> None:
    """Remove everything inside `root` (after a failed unpack). Never raises."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(root):
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
