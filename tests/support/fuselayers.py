"""Serving test layers through the FUSE layer host in a subprocess.

A test must survive a hung or crashed server, so the host runs in a child process:

    python -m tests.support.fuselayers CONFIG.json

CONFIG: ``{"mountpoint": str, "ready_file": str, "verify_headers": bool,
"passthrough": {"directory": str, "min_file_bytes": int} | null,
"layers": [{"name": str, "blob": str, "media_type": str}]}``. The child builds each layer's zTOC,
mounts the host, writes ``ready_file`` and serves until SIGTERM/SIGINT, then unmounts. On
SIGUSR1 it runs the commands in ``<ready_file>.cmd`` (``[{"remove": name}`` or ``{"add": layer}]``)
through `FuseMount` and writes ``<ready_file>.ack`` with their results.

:class:`FuseServer` starts it and always stops it and removes the mount, even when the test fails.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gzip
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from index.model import (
    BUILD_TOOL_IDENTIFIER,
    DEFAULT_SPAN_SIZE,
    ZTOC_VERSION,
    CompressionAlgorithm,
    CompressionInfo,
    EntryType,
    FileMetadata,
    SpanId,
    UncompressedOffset,
    Ztoc,
)
from index.tartime import format_mod_time, parse_pax_time
from index.zinfo import build_gzip_checkpoints

MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REPO_ROOT = Path(__file__).resolve().parents[2]

_TYPES = {
    tarfile.REGTYPE: EntryType.REG,
    tarfile.AREGTYPE: EntryType.REG,
    tarfile.LNKTYPE: EntryType.HARDLINK,
    tarfile.SYMTYPE: EntryType.SYMLINK,
    tarfile.CHRTYPE: EntryType.CHAR,
    tarfile.BLKTYPE: EntryType.BLOCK,
    tarfile.DIRTYPE: EntryType.DIR,
    tarfile.FIFOTYPE: EntryType.FIFO,
}


def _mod_time(info: tarfile.TarInfo) -> str:
    """The zTOC `mod_time` of a member: its PAX mtime parsed exactly, as the builder does."""
    raw = info.pax_headers.get("mtime")
    if raw is None:
        return format_mod_time(int(info.mtime))
    return format_mod_time(*parse_pax_time(raw.encode("utf-8", "surrogateescape")))


def read_dir_raw(path: Path, offset: int = 0) -> list[tuple[bytes, int, int]]:
    """`(name, d_ino, d_off)` of every entry `readdir(3)` returns for directory `path`, `.` and
    `..` included (unlike `os.scandir`), starting at `offset` (0, or a `d_off` returned
    earlier: `seekdir`). Raises `OSError`."""
    with os.scandir(path):  # a clear OSError for a path that is not a readable directory
        pass
    dirp = _libc.opendir(os.fsencode(path))
    if not dirp:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    try:
        if offset:
            _libc.seekdir(dirp, offset)
        out = []
        while True:
            ent = _libc.readdir(dirp)
            if not ent:
                break
            d = ent.contents
            out.append((d.d_name, d.d_ino, d.d_off))
        return out
    finally:
        _libc.closedir(dirp)


class _Dirent(ctypes.Structure):
    _fields_ = (
        ("d_ino", ctypes.c_uint64),
        ("d_off", ctypes.c_int64),
        ("d_reclen", ctypes.c_ushort),
        ("d_type", ctypes.c_ubyte),
        ("d_name", ctypes.c_char * 256),
    )


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.opendir.restype = ctypes.c_void_p
_libc.opendir.argtypes = (ctypes.c_char_p,)
_libc.readdir.restype = ctypes.POINTER(_Dirent)
_libc.readdir.argtypes = (ctypes.c_void_p,)
_libc.seekdir.argtypes = (ctypes.c_void_p, ctypes.c_long)
_libc.closedir.argtypes = (ctypes.c_void_p,)


def entries_from_tar(path: Path) -> tuple[list[FileMetadata], int]:
    """zTOC entries of an uncompressed tar file, and the tar-reader EOF offset."""
    entries: list[FileMetadata] = []
    with tarfile.open(path, mode="r:", errors="surrogateescape") as tf:
        for info in tf:
            kind = _TYPES.get(info.type)
            if kind is None:
                raise ValueError(f"unsupported tar entry {info.name!r} type {info.type!r}")
            if kind == EntryType.REG and info.name.endswith("/"):
                kind = EntryType.DIR
            entries.append(
                FileMetadata(
                    name=info.name + ("/" if kind == EntryType.DIR else ""),
                    type=kind,
                    uncompressed_offset=UncompressedOffset(info.offset_data),
                    uncompressed_size=info.size if kind == EntryType.REG else 0,
                    linkname=info.linkname,
                    mode=info.mode,
                    uid=info.uid,
                    gid=info.gid,
                    uname=info.uname,
                    gname=info.gname,
                    mod_time=_mod_time(info),
                    devmajor=info.devmajor,
                    devminor=info.devminor,
                    xattrs=dict(sorted(info.pax_headers.items())),
                )
            )
        end = tf.offset + 1024
    return entries, end


def ztoc_for_layer(blob: Path, span_size: int = DEFAULT_SPAN_SIZE) -> Ztoc:
    """The zTOC of a gzip layer blob: `index.builder.build_ztoc` when it is available, else a
    local equivalent (TOC from Python's tarfile, checkpoints from `index.zinfo`)."""
    try:
        from index.builder import build_ztoc
    except ImportError:
        pass
    else:
        return build_ztoc(blob, MEDIA_LAYER_GZIP, span_size)
    with open(blob, "rb") as f:
        result = build_gzip_checkpoints(f, span_size, lambda _view: None)
    with tempfile.NamedTemporaryFile(suffix=".tar") as tmp:
        with gzip.open(blob, "rb") as src:
            while chunk := src.read(1 << 20):
                tmp.write(chunk)
        tmp.flush()
        entries, end = entries_from_tar(Path(tmp.name))
    return Ztoc(
        version=ZTOC_VERSION,
        build_tool_identifier=BUILD_TOOL_IDENTIFIER,
        compressed_archive_size=blob.stat().st_size,
        uncompressed_archive_size=end,
        files=tuple(entries),
        compression=CompressionInfo(
            algorithm=CompressionAlgorithm.GZIP,
            max_span_id=SpanId(len(result.span_digests) - 1),
            span_digests=result.span_digests,
            checkpoints=result.zinfo.encode(),
        ),
    )


@dataclass(frozen=True)
class LayerBlob:
    """One layer to serve: its directory name under the mount and its gzip blob."""

    name: str
    blob: Path
    span_size: int = DEFAULT_SPAN_SIZE


class FuseServer:
    """A running FUSE host child process; `mountpoint / layer.name` is each layer's tree."""

    def __init__(self, mountpoint: Path, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.mountpoint = mountpoint
        self.proc = proc
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def control(self, commands: list[dict[str, object]], timeout_s: float = 30.0) -> list[str]:
        """Run add/remove commands in the server; returns one result string per command."""
        ready = self.mountpoint.parent / "ready"
        cmd, ack = ready.with_suffix(".cmd"), ready.with_suffix(".ack")
        ack.unlink(missing_ok=True)
        cmd.write_text(json.dumps(commands))
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout_s
        while not ack.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"FUSE server did not answer a command:\n{self.log()}")
            time.sleep(0.02)
        results: list[str] = json.loads(ack.read_text())
        return results


@contextmanager
def fuse_server(
    workdir: Path,
    layers: list[LayerBlob],
    *,
    verify_headers: bool = True,
    passthrough_min_bytes: int | None = None,
    timeout_s: float = 120.0,
) -> Iterator[FuseServer]:
    """Start a FUSE host serving `layers` at `workdir/mnt`; stop it and unmount on exit.
    `passthrough_min_bytes`: serve with FUSE passthrough, backing files in
    `workdir/passthrough` for files of at least that size.

    Raises `RuntimeError` (with the child's log) if it does not come up within `timeout_s`.
    """
    from snapshotter.fs.fuse import cleanup_stale_mount
    from snapshotter.mountinfo import is_mountpoint

    mountpoint = workdir / "mnt"
    mountpoint.mkdir(parents=True, exist_ok=True)
    cleanup_stale_mount(mountpoint)
    ready = workdir / "ready"
    ready.unlink(missing_ok=True)
    config = workdir / "server.json"
    config.write_text(
        json.dumps(
            {
                "mountpoint": str(mountpoint),
                "ready_file": str(ready),
                "verify_headers": verify_headers,
                "passthrough": None
                if passthrough_min_bytes is None
                else {
                    "directory": str(workdir / "passthrough"),
                    "min_file_bytes": passthrough_min_bytes,
                },
                "layers": [
                    {"name": x.name, "blob": str(x.blob), "span_size": x.span_size} for x in layers
                ],
            }
        )
    )
    log_path = workdir / "server.log"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.fuselayers", str(config)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=env,
        )
    server = FuseServer(mountpoint, proc, log_path)
    try:
        deadline = time.monotonic() + timeout_s
        while not (ready.exists() and is_mountpoint(mountpoint)):
            if proc.poll() is not None:
                raise RuntimeError(f"FUSE server exited with {proc.returncode}:\n{server.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"FUSE server not ready after {timeout_s}s:\n{server.log()}")
            time.sleep(0.05)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        cleanup_stale_mount(mountpoint)


async def _serve(config_path: Path) -> None:
    import logging

    import trio

    from snapshotter.fs.fuse import FuseMount, open_fuse_host
    from snapshotter.fs.host import LayerHost
    from snapshotter.fs.passthrough import PassthroughConfig
    from snapshotter.fs.readers import LocalBlobReader
    from snapshotter.fs.tree import build_tree

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = json.loads(config_path.read_text())
    host = LayerHost(verify_headers=config["verify_headers"])
    ready = Path(config["ready_file"])

    def add(target: LayerHost | FuseMount, layer: dict[str, object]) -> None:
        blob = Path(str(layer["blob"]))
        ztoc = ztoc_for_layer(blob, int(str(layer["span_size"])))
        slot = layer.get("slot")
        target.add_layer(
            str(layer["name"]),
            build_tree(ztoc.files),
            LocalBlobReader(blob, ztoc),
            slot=None if slot is None else int(str(slot)),
        )

    for layer in config["layers"]:
        add(host, layer)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1) as signals:
        passthrough = config.get("passthrough")
        async with open_fuse_host(
            Path(config["mountpoint"]),
            host,
            passthrough=None
            if passthrough is None
            else PassthroughConfig(
                Path(passthrough["directory"]), min_file_bytes=passthrough["min_file_bytes"]
            ),
        ) as mount:
            ready.write_text("ready\n")
            async for signum in signals:
                if signum != signal.SIGUSR1:
                    break
                results: list[str] = []
                for command in json.loads(ready.with_suffix(".cmd").read_text()):
                    try:
                        if "remove" in command:
                            mount.remove_layer(command["remove"])
                        else:
                            add(mount, command["add"])
                        results.append("ok")
                    except Exception as e:
                        results.append(f"error: {e!r}")
                tmp = ready.with_suffix(".ack.tmp")
                tmp.write_text(json.dumps(results))
                tmp.replace(ready.with_suffix(".ack"))


def _timed_read(path: Path, block: int = 1 << 20, *, evict: bool = False) -> tuple[float, str]:
    """Read `path` sequentially; (MB/s, sha256). `evict` drops its pages from the cache first."""
    import hashlib

    fd = os.open(path, os.O_RDONLY)
    try:
        if evict:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        digest = hashlib.sha256()
        total = 0
        started = time.perf_counter()
        while chunk := os.read(fd, block):
            digest.update(chunk)
            total += len(chunk)
        elapsed = time.perf_counter() - started
    finally:
        os.close(fd)
    return total / elapsed / 1e6, digest.hexdigest()


def bench_read_throughput(workdir: Path, size: int = 100_000_000) -> dict[str, float]:
    """Sequential read of a `size`-byte file through the FUSE host, cold (spans inflated from
    the local blob) and warm (kernel page cache), against the same file on local disk.

    Returns MB/s per case. Run as ``python -m tests.support.fuselayers bench [WORKDIR]``.
    """
    from tests.support.images import File, write_layer

    workdir.mkdir(parents=True, exist_ok=True)
    layer = write_layer([File(path="big", size=size)], workdir / "blobs")
    local = workdir / "big.local"
    with gzip.open(layer.path) as gz, tarfile.open(fileobj=gz, mode="r|") as tf:
        for info in tf:
            src = tf.extractfile(info)
            if src is not None:
                with open(local, "wb") as out:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
    os.sync()
    results: dict[str, float] = {}
    results["local_cold"], want = _timed_read(local, evict=True)
    results["local_warm"], _ = _timed_read(local)
    with fuse_server(workdir / "srv", [LayerBlob("l", layer.path)]) as server:
        target = server.mountpoint / "l" / "big"
        results["fuse_cold"], got_cold = _timed_read(target)
        results["fuse_warm"], got_warm = _timed_read(target)
    if not want == got_cold == got_warm:
        raise RuntimeError("FUSE read returned different bytes than the local file")
    return results


if __name__ == "__main__":
    if sys.argv[1] == "bench":
        work = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(tempfile.mkdtemp())
        for case, rate in bench_read_throughput(work).items():
            print(f"{case:12s} {rate:8.1f} MB/s")
    else:
        import trio

        trio.run(_serve, Path(sys.argv[1]))
