"""Applying a layer's tar stream into a snapshot directory, as containerd's applier does.

The rules (paths, whiteouts, xattrs, times) are `index.applyrules`, shared with the lazy layer
tree, so a layer unpacked here looks exactly like the same layer served lazily and like
containerd 1.6's own unpack (`archive.Apply` with the overlayfs whiteout conversion):

* names are cleaned with `clean_path` (`..` stops at the layer root) and parent directories
  are resolved inside the root, following this layer's symlinks as if the root were `/`
  (containerd's `fs.RootPath`), so nothing is ever written outside `root`; an entry naming the
  root itself is ignored; missing parents are created 0755;
* `.wh.<name>` becomes a character device 0/0 named `<name>` (owned as the whiteout header
  says) unless this layer already has a `<name>`; `.wh..wh..opq` sets
  `trusted.overlay.opaque=y` (`user.overlay.opaque` with `userxattr`) on its directory;
* every header, hard links included, applies lchown, the xattrs `archive_xattrs` keeps, chmod
  (not for symlinks) and the times: mtime exactly as recorded (PAX `mtime` parsed as a
  decimal, nanoseconds kept), atime the later of PAX `atime` and mtime, both bounded as
  containerd's `boundTime` does; directories get their times after the whole layer.

The uncompressed stream is hashed on the way (its diffID). Synchronous: run it in a worker
thread.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import os
import shutil
import stat
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Final, cast

import zstandard

from index.applyrules import (
    OPAQUE_MARKER,
    WHITEOUT_PREFIX,
    archive_xattrs,
    clean_path,
    opaque_xattr,
    tar_times_ns,
)
from index.digest import Digest
from index.oci import mediatypes as mt

from .errors import UnpackError

COPY_CHUNK_BYTES: Final = 1024 * 1024
MAX_SYMLINKS: Final = 255
"""Symlinks followed while resolving one parent path (Go's `fs.RootPath` limit)."""
_TYPE_BITS: Final = {
    tarfile.DIRTYPE: stat.S_IFDIR,
    tarfile.SYMTYPE: stat.S_IFLNK,
    tarfile.CHRTYPE: stat.S_IFCHR,
    tarfile.BLKTYPE: stat.S_IFBLK,
    tarfile.FIFOTYPE: stat.S_IFIFO,
}


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


class _Applier:
    """Applies tar members under `root` (an empty directory owned by this unpack)."""

    def __init__(self, root: Path, opaque: str) -> None:
        self.root = os.path.realpath(root)
        self.opaque_xattr = opaque
        self.dir_times: list[tuple[str, int, int]] = []
        self._resolved: dict[str, str] = {}
        """Parent paths already resolved; cleared whenever a path is replaced or a symlink
        created (either can change what a path resolves to)."""

    def _root_path(self, rel: str) -> str:
        """The absolute path `rel` names when `root` is `/`: symlinks followed (absolute ones
        from the root), `..` stopping at the root. Raises `OSError` (ELOOP) after
        `MAX_SYMLINKS`."""
        cached = self._resolved.get(rel)
        if cached is not None:
            return cached
        parts = rel.split("/")[::-1]
        resolved: list[str] = []
        links = 0
        while parts:
            part = parts.pop()
            if part in ("", "."):
                continue
            if part == "..":
                if resolved:
                    resolved.pop()
                continue
            try:
                target = os.readlink(os.path.join(self.root, *resolved, part))
            except OSError:  # not a symlink, or not there (yet)
                resolved.append(part)
                continue
            links += 1
            if links > MAX_SYMLINKS:
                raise OSError(errno.ELOOP, f"{rel!r}: more than {MAX_SYMLINKS} symlinks")
            if target.startswith("/"):
                resolved = []
            parts.extend(target.split("/")[::-1])
        path = os.path.join(self.root, *resolved)
        self._resolved[rel] = path
        return path

    def _replaced(self) -> None:
        self._resolved.clear()

    def _remove(self, path: str, st: os.stat_result) -> None:
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)
        self._replaced()

    def apply(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        """Apply one member. Raises `OSError`, `ValueError` (bad PAX time, unsupported type);
        `apply_tar` translates them."""
        rel = clean_path(m.name)
        if not rel:
            return  # the layer root keeps the snapshotter's attributes, as in containerd
        parent_rel, _, base = rel.rpartition("/")
        parent = self._root_path(parent_rel)
        if parent != self.root:
            os.makedirs(parent, mode=0o755, exist_ok=True)
        if base == OPAQUE_MARKER:
            os.setxattr(parent, self.opaque_xattr, b"y", follow_symlinks=False)
            return
        if base.startswith(WHITEOUT_PREFIX):
            target = os.path.join(parent, base[len(WHITEOUT_PREFIX) :])
            if not os.path.lexists(target):  # a real entry of this layer wins
                os.mknod(target, stat.S_IFCHR, os.makedev(0, 0))
                os.lchown(target, m.uid, m.gid)
            return
        path = os.path.join(parent, base)
        self._create(tf, m, path)
        self._set_metadata(m, path)

    def _create(self, tf: tarfile.TarFile, m: tarfile.TarInfo, path: str) -> None:
        try:
            st: os.stat_result | None = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None and not (m.isdir() and stat.S_ISDIR(st.st_mode)):
            self._remove(path, st)
            st = None
        if m.isdir():
            if st is None:
                os.mkdir(path, 0o700)
        elif m.isreg():
            src = tf.extractfile(m)
            if src is None:
                raise ValueError(f"tar entry {m.name!r}: no data")
            with src, open(path, "wb") as out:
                shutil.copyfileobj(src, out, COPY_CHUNK_BYTES)
        elif m.issym():
            os.symlink(m.linkname, path)
            self._replaced()
        elif m.islnk():
            target_rel = clean_path(m.linkname)
            head, _, tail = target_rel.rpartition("/")
            target = os.path.join(self._root_path(head), tail)
            os.link(target, path, follow_symlinks=False)
        elif m.ischr() or m.isblk() or m.isfifo():
            os.mknod(path, _TYPE_BITS[m.type] | 0o600, os.makedev(m.devmajor, m.devminor))
        else:
            raise ValueError(f"tar entry {m.name!r} has unsupported type {m.type!r}")

    def _set_metadata(self, m: tarfile.TarInfo, path: str) -> None:
        """lchown, setxattr, chmod (not on a symlink), times: on the inode `path` names (for
        a hard link the shared one), in containerd's order."""
        os.lchown(path, m.uid, m.gid)
        mode = os.lstat(path).st_mode if m.islnk() else _TYPE_BITS.get(m.type, stat.S_IFREG)
        for name, value in archive_xattrs(m.pax_headers, mode).items():
            try:
                os.setxattr(path, name, value, follow_symlinks=False)
            except OSError as e:
                if e.errno != errno.ENOTSUP:
                    raise
        if not stat.S_ISLNK(mode):
            os.chmod(path, m.mode & 0o7777)
        atime, mtime = tar_times_ns(m.pax_headers, m.mtime)
        if stat.S_ISDIR(mode):
            self.dir_times.append((path, atime, mtime))
        else:
            os.utime(path, ns=(atime, mtime), follow_symlinks=False)

    def finish(self) -> None:
        """Set the directories' times, once nothing more is created in them."""
        for path, atime, mtime in self.dir_times:
            if os.path.isdir(path):
                os.utime(path, ns=(atime, mtime), follow_symlinks=False)


def apply_tar(
    stream: IO[bytes],
    root: Path,
    *,
    userxattr: bool = False,
    cancelled: Callable[[], bool] | None = None,
) -> Digest:
    """Apply the tar stream into `root` with whiteout conversion; return the stream's diffID.

    `cancelled` is asked before each tar member; when it answers True the apply stops
    (UnpackError "cancelled"; what was applied so far stays, the caller clears `root`).
    Raises UnpackError, the one translation of every failure (a bad tar or PAX time, an
    unsupported entry type, too many symlinks in a path, a uid, gid or device number too large
    for the kernel, any OSError); the cause is chained.
    """
    hashing = _HashingReader(stream)
    applier = _Applier(root, opaque_xattr(userxattr))
    try:
        with tarfile.open(fileobj=hashing, mode="r|", format=tarfile.PAX_FORMAT) as tf:
            for member in tf:
                if cancelled is not None and cancelled():
                    raise UnpackError(f"applying layer into {root}: cancelled")
                applier.apply(tf, member)
        applier.finish()
        while hashing.read(COPY_CHUNK_BYTES):
            pass
    except (
        tarfile.TarError,
        OSError,
        EOFError,
        ValueError,
        OverflowError,  # an id or device number the kernel's types cannot hold
        zstandard.ZstdError,
    ) as e:
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
