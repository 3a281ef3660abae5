"""Deterministic test images, built without any daemon.

A layer is a list of entry specs (:class:`File`, :class:`Dir`, :class:`Symlink`, ...) or a
directory tree on disk. Layers are written as PAX tar streams with fixed metadata (mtime, owner
names), gzip-compressed with a fixed header (mtime 0, no file name), so the same specs always
give the same blob digests. :func:`write_oci_layout` writes an OCI image layout directory
(``oci-layout``, ``index.json`` with a ref name, manifest, config with diff ids and a runnable
``Cmd``); :func:`push` copies it into a registry with ``skopeo``.

Ready-made images:

- :func:`busybox_image`: three layers (busybox-static with applet symlinks; some real files;
  a whiteout deleting a file of layer 2 and an opaque directory).
- :func:`bulk_image`: busybox plus ``/usr/lib/python3.11`` (over 100 MB), cached under
  :data:`CACHE_DIR` keyed by a hash of its inputs.
- :func:`pause_image`: one layer with busybox; ``Cmd`` sleeps forever (a sandbox image).

Errors: :class:`ImageBuildError` for bad specs or missing inputs, :class:`PushError` when
skopeo fails; both chain the underlying cause.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sysconfig
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import zstandard

FIXED_MTIME = 1_700_000_000
"""The mtime (seconds since the epoch) of every generated tar entry."""

GZIP_LEVEL = 6
CACHE_DIR = Path("/var/tmp/sociable-test-images")
BUSYBOX = Path("/bin/busybox")

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ImageError(Exception):
    """Base class of the errors of this module."""


class ImageBuildError(ImageError):
    """A layer or image could not be built (bad spec, missing input file)."""


class PushError(ImageError):
    """``skopeo copy`` failed; the message carries its stderr."""


# ---------------------------------------------------------------------------------------------
# Entry specs


@dataclass(frozen=True)
class _Meta:
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    xattrs: tuple[tuple[str, str], ...] = ()
    """PAX ``SCHILY.xattr.<name>`` records, e.g. ``(("user.k", "v"),)``."""


@dataclass(frozen=True)
class File(_Meta):
    """A regular file. ``data`` is the content; ``size`` > len(data) pads it with
    deterministic pseudo-random bytes derived from ``path`` (for large files)."""

    path: str = ""
    data: bytes = b""
    size: int | None = None


@dataclass(frozen=True)
class Dir(_Meta):
    path: str = ""
    mode: int = 0o755


@dataclass(frozen=True)
class Symlink(_Meta):
    path: str = ""
    target: str = ""
    mode: int = 0o777


@dataclass(frozen=True)
class Hardlink(_Meta):
    """A hard link to ``target`` (a path earlier in the same layer)."""

    path: str = ""
    target: str = ""


@dataclass(frozen=True)
class Fifo(_Meta):
    path: str = ""


@dataclass(frozen=True)
class CharDev(_Meta):
    path: str = ""
    major: int = 0
    minor: int = 0


@dataclass(frozen=True)
class BlockDev(_Meta):
    path: str = ""
    major: int = 0
    minor: int = 0


@dataclass(frozen=True)
class Whiteout:
    """Deletes ``path`` of a lower layer (written as ``dir/.wh.name``)."""

    path: str


@dataclass(frozen=True)
class Opaque:
    """Hides everything lower layers have under directory ``path`` (``path/.wh..wh..opq``)."""

    path: str


Entry = File | Dir | Symlink | Hardlink | Fifo | CharDev | BlockDev | Whiteout | Opaque


@dataclass(frozen=True)
class TreeSource:
    """A directory tree on disk copied into a layer under ``dest`` (e.g. ``usr/lib/x``).

    Ownership is normalised to root, mtimes to :data:`FIXED_MTIME`; names in ``exclude`` are
    skipped at any depth. Sockets are skipped.
    """

    src: Path
    dest: str
    exclude: frozenset[str] = frozenset()


LayerSpec = Sequence[Entry | TreeSource]


def _pseudo_random(seed: str, size: int) -> Iterator[bytes]:
    """Yields ``size`` bytes in chunks, a deterministic function of ``seed``.

    Half of each 64 KiB chunk is hash output and half repeats it, so gzip compresses it to
    about 55%: close to real binaries, which is what benchmarks want.
    """
    counter = 0
    produced = 0
    while produced < size:
        h = hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        block = (h * 1024)[:32768]
        rnd = hashlib.shake_256(h).digest(32768)
        chunk = (rnd + block)[: size - produced]
        produced += len(chunk)
        counter += 1
        yield chunk


class _ChunkReader(io.RawIOBase):
    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        while not self._buf:
            try:
                self._buf = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def _norm(path: str) -> str:
    p = path.strip("/")
    if not p or ".." in p.split("/"):
        raise ImageBuildError(f"entry path {path!r}: must be relative, non-empty, without '..'")
    return p


def _tarinfo(name: str, meta: _Meta) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.mode = meta.mode
    ti.uid = meta.uid
    ti.gid = meta.gid
    ti.uname = ""
    ti.gname = ""
    ti.mtime = FIXED_MTIME
    if meta.xattrs:
        ti.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in meta.xattrs}
    return ti


def _add_entry(tf: tarfile.TarFile, entry: Entry) -> None:
    if isinstance(entry, Whiteout):
        p = _norm(entry.path)
        head, _, tail = p.rpartition("/")
        wh = f"{head}/.wh.{tail}" if head else f".wh.{tail}"
        tf.addfile(_tarinfo(wh, _Meta(mode=0o644)), io.BytesIO(b""))
        return
    if isinstance(entry, Opaque):
        tf.addfile(_tarinfo(f"{_norm(entry.path)}/.wh..wh..opq", _Meta()), io.BytesIO(b""))
        return
    ti = _tarinfo(_norm(entry.path), entry)
    if isinstance(entry, File):
        size = entry.size if entry.size is not None else len(entry.data)
        if size < len(entry.data):
            raise ImageBuildError(f"file {entry.path!r}: size {size} < len(data)")
        ti.type = tarfile.REGTYPE
        ti.size = size

        def chunks() -> Iterator[bytes]:
            yield entry.data
            yield from _pseudo_random(entry.path, size - len(entry.data))

        tf.addfile(ti, io.BufferedReader(_ChunkReader(chunks()), 1 << 20))
    elif isinstance(entry, Dir):
        ti.type = tarfile.DIRTYPE
        tf.addfile(ti)
    elif isinstance(entry, Symlink):
        ti.type = tarfile.SYMTYPE
        ti.linkname = entry.target
        tf.addfile(ti)
    elif isinstance(entry, Hardlink):
        ti.type = tarfile.LNKTYPE
        ti.linkname = _norm(entry.target)
        tf.addfile(ti)
    elif isinstance(entry, Fifo):
        ti.type = tarfile.FIFOTYPE
        tf.addfile(ti)
    elif isinstance(entry, CharDev | BlockDev):
        ti.type = tarfile.CHRTYPE if isinstance(entry, CharDev) else tarfile.BLKTYPE
        ti.devmajor = entry.major
        ti.devminor = entry.minor
        tf.addfile(ti)
    else:  # pragma: no cover - exhaustive
        raise ImageBuildError(f"unknown entry spec {entry!r}")


def _add_tree(tf: tarfile.TarFile, source: TreeSource) -> None:
    if not source.src.is_dir():
        raise ImageBuildError(f"tree source {source.src}: not a directory")
    dest = _norm(source.dest)
    # Parent directories of dest, so the layer is self-contained.
    parts = dest.split("/")
    for i in range(1, len(parts)):
        _add_entry(tf, Dir(path="/".join(parts[:i])))
    seen: dict[tuple[int, int], str] = {}

    def walk(src: Path, name: str) -> None:
        st = src.lstat()
        meta = _Meta(mode=stat.S_IMODE(st.st_mode))
        if stat.S_ISDIR(st.st_mode):
            _add_entry(tf, Dir(path=name, mode=meta.mode))
            for child in sorted(os.listdir(src)):
                if child not in source.exclude:
                    walk(src / child, f"{name}/{child}")
        elif stat.S_ISLNK(st.st_mode):
            _add_entry(tf, Symlink(path=name, target=os.readlink(src)))
        elif stat.S_ISREG(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in seen:
                # The link header carries the inode's metadata: containerd applies every
                # header's mode and owner to the shared inode, so the last one wins.
                _add_entry(tf, Hardlink(path=name, target=seen[key], mode=meta.mode))
                return
            seen[key] = name
            ti = _tarinfo(name, meta)
            ti.size = st.st_size
            with open(src, "rb") as f:
                tf.addfile(ti, f)
        elif stat.S_ISFIFO(st.st_mode):
            _add_entry(tf, Fifo(path=name, mode=meta.mode))
        # sockets and devices on the host are skipped: tests describe devices as specs

    walk(source.src, dest)


class _HashingSink(io.RawIOBase):
    """A write-only stream that hashes and counts what passes through to ``out``."""

    def __init__(self, out: BinaryIO | None) -> None:
        self.out = out
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        self.sha.update(b)
        self.size += len(b)
        if self.out is not None:
            self.out.write(b)
        return len(b)


@dataclass(frozen=True)
class Layer:
    """A gzip layer blob stored at ``path``; digests are ``sha256:<hex>``."""

    path: Path
    digest: str
    diff_id: str
    size: int
    media_type: str = MEDIA_LAYER_GZIP


def write_layer(spec: LayerSpec | Iterable[Entry | TreeSource], blobs_dir: Path) -> Layer:
    """Builds one gzip layer from ``spec`` into ``blobs_dir/<hex digest>``.

    Deterministic: the same spec (and the same tree contents) give the same digest. Memory use
    is bounded (streams). Raises :class:`ImageBuildError` for a bad spec.
    """
    blobs_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=blobs_dir, prefix=".layer-")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as raw:
            compressed = _HashingSink(raw)
            with gzip.GzipFile(
                filename="", mode="wb", fileobj=compressed, mtime=0, compresslevel=GZIP_LEVEL
            ) as gz:
                uncompressed = _HashingSink(gz)  # type: ignore[arg-type]
                with tarfile.open(
                    fileobj=uncompressed,
                    mode="w|",
                    format=tarfile.PAX_FORMAT,
                ) as tf:
                    for item in spec:
                        if isinstance(item, TreeSource):
                            _add_tree(tf, item)
                        else:
                            _add_entry(tf, item)
        digest = "sha256:" + compressed.sha.hexdigest()
        final = blobs_dir / compressed.sha.hexdigest()
        os.replace(tmp, final)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ImageBuildError(f"writing layer into {blobs_dir}: {e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Layer(
        path=final,
        digest=digest,
        diff_id="sha256:" + uncompressed.sha.hexdigest(),
        size=compressed.size,
    )


def write_raw_layer(
    members: Iterable[tuple[tarfile.TarInfo, bytes | None]],
    blobs_dir: Path,
    *,
    fmt: int = tarfile.PAX_FORMAT,
    compression: Literal["gzip", "zstd"] = "gzip",
) -> Layer:
    """A layer of hand-made tar members, written as given: any name (``..`` included), PAX
    records (``mtime``/``atime`` with nanoseconds, xattrs), GNU long names with
    ``fmt=tarfile.GNU_FORMAT``. Compressed deterministically with gzip (as
    :func:`write_layer`) or zstd (level 3, media type :data:`MEDIA_LAYER_ZSTD`), stored as
    ``blobs_dir/<hex digest>``. Raises :class:`ImageBuildError`."""
    raw = io.BytesIO()
    try:
        with tarfile.open(fileobj=raw, mode="w", format=fmt) as tf:
            for info, data in members:
                tf.addfile(info, io.BytesIO(data) if data is not None else None)
    except (ValueError, tarfile.TarError) as e:
        raise ImageBuildError(f"raw layer: {e}") from e
    tar_bytes = raw.getvalue()
    if compression == "zstd":
        blob = zstandard.ZstdCompressor(level=3).compress(tar_bytes)
        media_type = MEDIA_LAYER_ZSTD
    else:
        out = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=6) as gz:
            gz.write(tar_bytes)
        blob, media_type = out.getvalue(), MEDIA_LAYER_GZIP
    blobs_dir.mkdir(parents=True, exist_ok=True)
    digest, size = _put_blob(blobs_dir, blob)
    return Layer(
        path=blobs_dir / digest.removeprefix("sha256:"),
        digest=digest,
        diff_id="sha256:" + hashlib.sha256(tar_bytes).hexdigest(),
        size=size,
        media_type=media_type,
    )


# ---------------------------------------------------------------------------------------------
# OCI layout


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _put_blob(blobs_dir: Path, data: bytes) -> tuple[str, int]:
    hexd = hashlib.sha256(data).hexdigest()
    path = blobs_dir / hexd
    if not path.exists():
        tmp = blobs_dir / f".tmp-{hexd}"
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return "sha256:" + hexd, len(data)


@dataclass(frozen=True)
class Image:
    """An OCI image layout at ``layout`` holding one manifest tagged ``tag``."""

    layout: Path
    tag: str
    manifest_digest: str
    config_digest: str
    layers: tuple[Layer, ...]
    cmd: tuple[str, ...]

    @property
    def chain_ids(self) -> list[str]:
        """The OCI ChainIDs of the layers, bottom first (what snapshot names become)."""
        out: list[str] = []
        for layer in self.layers:
            if not out:
                out.append(layer.diff_id)
            else:
                out.append(
                    "sha256:" + hashlib.sha256(f"{out[-1]} {layer.diff_id}".encode()).hexdigest()
                )
        return out


def write_oci_layout(
    layout: Path,
    layer_specs: Sequence[LayerSpec],
    *,
    tag: str = "latest",
    cmd: Sequence[str] = ("/bin/sh",),
    env: Sequence[str] = (DEFAULT_PATH_ENV,),
) -> Image:
    """Writes an OCI image layout with one linux/amd64 manifest whose layers are built from
    ``layer_specs`` (bottom first). Creates ``layout`` if needed; an existing ``index.json`` is
    replaced. Raises :class:`ImageBuildError`.
    """
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    layers = tuple(write_layer(spec, blobs) for spec in layer_specs)
    return write_image_layout(layout, layers, tag=tag, cmd=cmd, env=env)


def write_image_layout(
    layout: Path,
    layers: Sequence[Layer],
    *,
    tag: str = "latest",
    cmd: Sequence[str] = ("/bin/sh",),
    env: Sequence[str] = (DEFAULT_PATH_ENV,),
) -> Image:
    """Writes the config, manifest and ``index.json`` of a linux/amd64 image whose layers (bottom
    first) are already in ``layout/blobs/sha256`` (:func:`write_layer`,
    :func:`write_raw_layer`). Raises :class:`ImageBuildError`."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "2023-11-14T22:13:20Z",
        "config": {"Cmd": list(cmd), "Env": list(env), "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [lyr.diff_id for lyr in layers]},
        "history": [{"created_by": f"sociable test layer {i}"} for i in range(len(layers))],
    }
    config_digest, config_size = _put_blob(blobs, _canonical(config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": config_size},
        "layers": [
            {"mediaType": lyr.media_type, "digest": lyr.digest, "size": lyr.size} for lyr in layers
        ],
    }
    manifest_digest, manifest_size = _put_blob(blobs, _canonical(manifest))
    index = {
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [
            {
                "mediaType": MEDIA_MANIFEST,
                "digest": manifest_digest,
                "size": manifest_size,
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {REF_NAME_ANNOTATION: tag},
            }
        ],
    }
    (layout / "oci-layout").write_bytes(_canonical({"imageLayoutVersion": "1.0.0"}))
    (layout / "index.json").write_bytes(_canonical(index))
    return Image(
        layout=layout,
        tag=tag,
        manifest_digest=manifest_digest,
        config_digest=config_digest,
        layers=tuple(layers),
        cmd=tuple(cmd),
    )


def push(image: Image, registry_host: str, repo: str, tag: str | None = None) -> str:
    """Copies ``image`` to ``docker://<registry_host>/<repo>:<tag>`` over plain HTTP with skopeo,
    keeping the layer blobs byte for byte. Returns the pushed reference.

    Raises :class:`PushError` with skopeo's stderr when the copy fails.
    """
    ref = f"{registry_host}/{repo}:{tag or image.tag}"
    cmd = [
        "skopeo",
        "copy",
        "--quiet",
        "--all",
        "--preserve-digests",
        "--dest-tls-verify=false",
        f"oci:{image.layout}:{image.tag}",
        f"docker://{ref}",
    ]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    except subprocess.CalledProcessError as e:
        raise PushError(f"pushing {image.layout} to {ref}: {e.stderr.strip()}") from e
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PushError(f"pushing {image.layout} to {ref}: {e}") from e
    return ref


# ---------------------------------------------------------------------------------------------
# Ready-made images


def busybox_applets() -> list[str]:
    """The applet names of the host's static busybox (``busybox --list``)."""
    try:
        out = subprocess.run(
            [str(BUSYBOX), "--list"], check=True, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise ImageBuildError(f"{BUSYBOX}: cannot list applets (install busybox-static)") from e
    return sorted(a for a in out.split() if a and a != "busybox")


def busybox_layer() -> list[Entry]:
    """Layer 1 of the standard image: dirs of a minimal rootfs, /bin/busybox (static) and a
    symlink per applet in /bin."""
    try:
        data = BUSYBOX.read_bytes()
    except OSError as e:
        raise ImageBuildError(f"{BUSYBOX}: {e}") from e
    entries: list[Entry] = [Dir(path=d) for d in ("bin", "dev", "etc", "proc", "sys", "tmp")]
    entries[-1] = Dir(path="tmp", mode=0o1777)
    entries += [Dir(path="root", mode=0o700), Dir(path="usr"), Dir(path="usr/bin")]
    entries.append(File(path="bin/busybox", data=data, mode=0o755))
    entries += [Symlink(path=f"bin/{a}", target="busybox") for a in busybox_applets()]
    entries.append(File(path="etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n"))
    entries.append(File(path="etc/group", data=b"root:x:0:\n"))
    return entries


FEATURES_LAYER: list[Entry] = [
    Dir(path="data"),
    File(path="data/hello.txt", data=b"hello from layer 2\n"),
    File(path="data/empty"),
    File(path="data/doomed.txt", data=b"deleted by layer 3\n"),
    File(path="data/big.bin", data=b"BIG", size=3 * 1024 * 1024 + 17),
    File(path="data/exec.sh", data=b"#!/bin/sh\necho script-ran\n", mode=0o755),
    Hardlink(path="data/hello-link.txt", target="data/hello.txt"),
    Symlink(path="data/hello-sym", target="hello.txt"),
    Symlink(path="data/dangling", target="/nonexistent/target"),
    File(path="data/" + "n" * 120 + "/" + "long-name-" + "x" * 150, data=b"long\n"),
    File(
        path="data/xattr.txt",
        data=b"with xattrs\n",
        xattrs=(("user.sociable.test", "value-1"), ("user.other", "two")),
    ),
    File(path="data/owned.txt", data=b"owned\n", uid=1234, gid=5678, mode=0o640),
    Fifo(path="data/fifo"),
    CharDev(path="data/null-dev", major=1, minor=3),
    BlockDev(path="data/blk-dev", major=7, minor=0),
    Dir(path="data/opaque"),
    File(path="data/opaque/old.txt", data=b"hidden by opaque\n"),
]
"""Layer 2 of the standard image: one of every tar entry kind."""

WHITEOUT_LAYER: list[Entry] = [
    Whiteout(path="data/doomed.txt"),
    Opaque(path="data/opaque"),
    File(path="data/opaque/new.txt", data=b"after opaque\n"),
    File(path="data/hello.txt", data=b"hello from layer 3\n"),
    File(path="etc/motd", data=b"sociable test image\n"),
]
"""Layer 3: deletes ``data/doomed.txt``, makes ``data/opaque`` opaque, overwrites a file."""


def _cache_key(*parts: object) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _file_fingerprint(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path), st.st_size, st.st_mtime_ns)


def _cached_layout(name: str, key: str, build: Callable[[Path], None]) -> Path:
    """Returns ``CACHE_DIR/<name>-<key>``, building it with ``build(tmpdir)`` if absent
    (into a temporary sibling, then renamed, so a killed build leaves no half layout)."""
    final = CACHE_DIR / f"{name}-{key}"
    if (final / "index.json").exists():
        return final
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=CACHE_DIR, prefix=f".{name}-"))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "index.json").exists():
                raise
            shutil.rmtree(tmp)  # somebody else built it concurrently
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


BUSYBOX_CMD = ("/bin/sh", "-c", "cat /data/hello.txt")


def busybox_image(layout: Path, tag: str = "latest") -> Image:
    """The standard three-layer image, written to ``layout``. Its ``Cmd`` prints
    ``hello from layer 3``."""
    return write_oci_layout(
        layout, [busybox_layer(), FEATURES_LAYER, WHITEOUT_LAYER], tag=tag, cmd=BUSYBOX_CMD
    )


def pause_image(layout: Path, tag: str = "latest") -> Image:
    """A one-layer sandbox ("pause") image: busybox, ``Cmd`` sleeps forever."""
    return write_oci_layout(layout, [busybox_layer()], tag=tag, cmd=("/bin/sleep", "2147483647"))


def python_stdlib_dir() -> Path:
    """The running interpreter's stdlib directory (the bulk image copies it)."""
    return Path(sysconfig.get_paths()["stdlib"])


BULK_MIN_BYTES = 100 * 1024 * 1024
BULK_EXCLUDE = frozenset({"site-packages", "dist-packages", "__pycache__"})


def _tree_size(root: Path, exclude: frozenset[str]) -> tuple[int, list[tuple[str, int, int]]]:
    total = 0
    prints: list[tuple[str, int, int]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in exclude)
        for fn in sorted(filenames):
            p = os.path.join(dirpath, fn)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
                prints.append((p, st.st_size, st.st_mtime_ns))
    return total, prints


def bulk_image(tag: str = "latest") -> Image:
    """The standard image plus a fourth layer holding ``/usr/lib/python3.11`` (the host's
    stdlib without site-packages and caches, padded with a deterministic file up to at least
    100 MB). Built once and cached under :data:`CACHE_DIR`, keyed by a hash of the inputs
    (busybox binary, stdlib file sizes and mtimes), so repeated runs take milliseconds.
    """
    stdlib = python_stdlib_dir()
    total, prints = _tree_size(stdlib, BULK_EXCLUDE)
    pad = max(0, BULK_MIN_BYTES + 1024 * 1024 - total)
    key = _cache_key("bulk-v2", _file_fingerprint(BUSYBOX), prints, pad, tag)
    py_layer: list[Entry | TreeSource] = [
        TreeSource(src=stdlib, dest="usr/lib/python3.11", exclude=BULK_EXCLUDE)
    ]
    if pad:
        py_layer.append(File(path="usr/lib/python3.11/_bulk_padding.bin", size=pad))
    specs: list[LayerSpec] = [busybox_layer(), FEATURES_LAYER, WHITEOUT_LAYER, py_layer]
    cmd = ("/bin/sh", "-c", "ls /usr/lib/python3.11 | wc -l")

    def build(tmp: Path) -> None:
        write_oci_layout(tmp, specs, tag=tag, cmd=cmd)

    layout = _cached_layout("bulk", key, build)
    return _image_from_layout(layout, tag)


def _image_from_layout(layout: Path, tag: str) -> Image:
    """Reads back the :class:`Image` record of a layout written by :func:`write_oci_layout`.
    Raises :class:`ImageBuildError` if the layout is malformed or lacks ``tag``."""
    try:
        index = json.loads((layout / "index.json").read_text())
        desc = next(
            m
            for m in index["manifests"]
            if m.get("annotations", {}).get(REF_NAME_ANNOTATION) == tag
        )
        blobs = layout / "blobs" / "sha256"
        manifest = json.loads((blobs / desc["digest"].split(":", 1)[1]).read_text())
        config_digest = manifest["config"]["digest"]
        config = json.loads((blobs / config_digest.split(":", 1)[1]).read_text())
        diff_ids = config["rootfs"]["diff_ids"]
        layers = tuple(
            Layer(
                path=blobs / d["digest"].split(":", 1)[1],
                digest=d["digest"],
                diff_id=diff_id,
                size=d["size"],
                media_type=d["mediaType"],
            )
            for d, diff_id in zip(manifest["layers"], diff_ids, strict=True)
        )
        cmd = tuple(config["config"]["Cmd"])
    except (OSError, KeyError, ValueError, StopIteration) as e:
        raise ImageBuildError(f"OCI layout {layout}: cannot read tag {tag!r}: {e!r}") from e
    return Image(
        layout=layout,
        tag=tag,
        manifest_digest=desc["digest"],
        config_digest=config_digest,
        layers=layers,
        cmd=cmd,
    )


__all__ = [
    "BUSYBOX_CMD",
    "CACHE_DIR",
    "FEATURES_LAYER",
    "FIXED_MTIME",
    "WHITEOUT_LAYER",
    "BlockDev",
    "CharDev",
    "Dir",
    "Entry",
    "Fifo",
    "File",
    "Hardlink",
    "Image",
    "ImageBuildError",
    "ImageError",
    "Layer",
    "LayerSpec",
    "Opaque",
    "PushError",
    "Symlink",
    "TreeSource",
    "Whiteout",
    "bulk_image",
    "busybox_image",
    "busybox_layer",
    "pause_image",
    "push",
    "write_layer",
    "write_oci_layout",
]
