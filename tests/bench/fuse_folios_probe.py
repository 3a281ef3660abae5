"""What this kernel and pyfuse3/libfuse let a FUSE server do about warm reads: page-cache folio
sizes, warm sequential throughput, and whether FUSE passthrough can be reached.

Run (root): ``python -m tests.bench.fuse_folios_probe [--size-mb 256] [--passes 5]``

A minimal pyfuse3 server (``--serve``, in a child process: pyfuse3 serves one mount per
process) exposes one file whose reads are ``pread``s of a local backing file on ext4 (made once
under ``/var/tmp/sociable-bench/folios``), opened with ``keep_cache`` like the daemon's layer
files. For each mount variant (mount options, ``read_ahead_kb``) the file is read sequentially
in 1 MiB reads: pass 1 after ``POSIX_FADV_DONTNEED`` (every byte through the server), then warm
passes from the page cache; the folio sizes holding the file come from
``tests.bench.page_cache_folios``, the READ request sizes from the server. The backing file
itself is the baseline (ext4, same passes).

Also, once: the INIT negotiation as libfuse prints it with ``-o debug`` (kernel flags offered,
flags and limits answered), and the ``FUSE_DEV_IOC_BACKING_OPEN`` ioctl that FUSE passthrough
needs, issued by the server on its own ``/dev/fuse`` descriptor with the backing file.

Prints a markdown report (``docs/benchmarks.md``, "Warm reads: what the kernel allows").
Timing numbers on the shared 2-core VM are noisy; folio sizes and request sizes are not.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import platform
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.bench import page_cache_folios

WORKDIR = Path("/var/tmp/sociable-bench/folios")
BLOCK = 1 << 20
FILE_INODE = 2
FILE_NAME = b"file"

FUSE_DEV_IOC_BACKING_OPEN = (1 << 30) | (16 << 16) | (229 << 8) | 1
"""``_IOW(229, 1, struct fuse_backing_map)`` (include/uapi/linux/fuse.h, Linux 6.9+):
``{int32 fd; uint32 flags; uint64 padding}``."""


@dataclass(frozen=True)
class Variant:
    """One way of mounting the probe file."""

    name: str
    options: tuple[str, ...]
    read_ahead_kb: int  # 0: leave the kernel's value


VARIANTS = (
    Variant("defaults (read_ahead_kb 128)", (), 0),
    Variant("read_ahead_kb 1024 (the daemon's)", (), 1024),
    Variant("read_ahead_kb 8192", (), 8192),
    Variant("max_read=1048576, read_ahead_kb 1024", ("max_read=1048576",), 1024),
)
BASE_OPTIONS = ("fsname=folioprobe", "subtype=folioprobe", "ro", "default_permissions")


# ---------------------------------------------------------------------------------------------
# The server (child process)


def _serve(config: dict[str, Any]) -> None:
    import pyfuse3
    import trio

    backing = os.open(config["backing"], os.O_RDONLY)
    size = os.fstat(backing).st_size
    reads: dict[int, int] = {}

    def attrs(inode: int) -> Any:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        entry.entry_timeout = entry.attr_timeout = 3600
        if inode == pyfuse3.ROOT_INODE:
            entry.st_mode, entry.st_nlink, entry.st_size = 0o40755, 2, 0
        else:
            entry.st_mode, entry.st_nlink, entry.st_size = 0o100444, 1, size
        entry.st_blksize = 4096
        entry.st_blocks = -(-entry.st_size // 512)
        return entry

    class Ops(pyfuse3.Operations):  # type: ignore[misc]
        async def lookup(self, parent: int, name: bytes, ctx: Any = None) -> Any:
            if parent != pyfuse3.ROOT_INODE or name != FILE_NAME:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return attrs(FILE_INODE)

        async def getattr(self, inode: int, ctx: Any = None) -> Any:
            return attrs(inode)

        async def open(self, inode: int, flags: int, ctx: Any = None) -> Any:
            return pyfuse3.FileInfo(fh=inode, keep_cache=True)

        async def read(self, fh: int, off: int, size: int) -> bytes:
            reads[size] = reads.get(size, 0) + 1
            return os.pread(backing, size, off)

        async def release(self, fh: int) -> None:
            return None

        async def opendir(self, inode: int, ctx: Any = None) -> int:
            return inode

        async def readdir(self, fh: int, start_id: int, token: Any) -> None:
            if start_id == 0:
                pyfuse3.readdir_reply(token, FILE_NAME, attrs(FILE_INODE), 1)

        async def releasedir(self, fh: int) -> None:
            return None

    options = set(BASE_OPTIONS) | set(config["options"])
    pyfuse3.init(Ops(), config["mountpoint"], options)
    passthrough = _try_backing_open(config["backing"])
    Path(config["ready"]).write_text(json.dumps({"backing_open": passthrough}))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    finally:
        pyfuse3.close(unmount=True)
        Path(config["stats"]).write_text(json.dumps({"reads": reads}))


def _try_backing_open(backing: str) -> str:
    """``FUSE_DEV_IOC_BACKING_OPEN`` on this process's ``/dev/fuse`` descriptor: "ok (id N)"
    or the errno name it fails with."""
    fuse_fds = [
        int(fd)
        for fd in os.listdir("/proc/self/fd")
        if _readlink(f"/proc/self/fd/{fd}") == "/dev/fuse"
    ]
    if not fuse_fds:
        return "no /dev/fuse descriptor found"
    fd = os.open(backing, os.O_RDONLY)
    try:
        arg = bytearray(struct.pack("iIQ", fd, 0, 0))
        try:
            backing_id = fcntl.ioctl(fuse_fds[0], FUSE_DEV_IOC_BACKING_OPEN, arg)
        except OSError as e:
            return errno.errorcode.get(e.errno or 0, str(e.errno))
        return f"ok (id {backing_id})"
    finally:
        os.close(fd)


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------
# The measurements (parent)


@dataclass
class Result:
    name: str
    mb_s: list[float]
    folios: str
    reads: dict[int, int]
    backing_open: str = ""
    error: str = ""

    @property
    def warm_best(self) -> float:
        return max(self.mb_s[2:]) if len(self.mb_s) > 2 else 0.0


def backing_file(size_mb: int) -> Path:
    path = WORKDIR / f"backing-{size_mb}m.bin"
    if not path.exists() or path.stat().st_size != size_mb << 20:
        WORKDIR.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for _ in range(size_mb):
                f.write(os.urandom(BLOCK))
        os.rename(tmp, path)
    return path


def _drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def seq_pass(path: Path) -> float:
    """MB/s of one sequential read of the whole file in 1 MiB reads (opened per pass)."""
    total = 0
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(BLOCK):
            total += len(chunk)
    return total / 1e6 / (time.perf_counter() - t0)


def passes(path: Path, n: int) -> list[float]:
    _drop(path)
    return [seq_pass(path) for _ in range(n)]


@contextlib.contextmanager
def probe_mount(
    backing: Path, variant: Variant, *, debug: bool = False
) -> Iterator[tuple[Path, Path, dict[str, Any], Path]]:
    """Serves ``backing`` with ``variant``; yields (mountpoint, file, ready info, stats file).
    The server's stderr goes to ``<tmp>/server.err``, its READ sizes to ``<tmp>/stats``;
    stopped and unmounted on exit (the caller removes ``<tmp>``)."""
    from snapshotter.fs.fuse import set_read_ahead

    tmp = Path(tempfile.mkdtemp(prefix="folioprobe-"))
    mnt = tmp / "mnt"
    mnt.mkdir()
    config = {
        "backing": str(backing),
        "mountpoint": str(mnt),
        "options": [*variant.options, *(["debug"] if debug else [])],
        "ready": str(tmp / "ready"),
        "stats": str(tmp / "stats"),
    }
    (tmp / "config.json").write_text(json.dumps(config))
    with open(tmp / "server.err", "wb") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.bench.fuse_folios_probe",
                "--serve",
                str(tmp / "config.json"),
            ],
            stderr=err,
            stdout=err,
        )
    try:
        deadline = time.monotonic() + 20
        while not (tmp / "ready").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"probe server did not start: {(tmp / 'server.err').read_text()}"
                )
            time.sleep(0.05)
        try:
            os.stat(mnt / FILE_NAME.decode())  # INIT answered
        except OSError as e:
            e.probe_dir = tmp  # type: ignore[attr-defined]
            raise
        if variant.read_ahead_kb:
            set_read_ahead(mnt, variant.read_ahead_kb)
        yield mnt, mnt / FILE_NAME.decode(), json.loads((tmp / "ready").read_text()), tmp
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def init_lines(backing: Path) -> list[str]:
    """The INIT exchange as libfuse 3 prints it with ``-o debug``."""
    with probe_mount(backing, Variant("debug", (), 0), debug=True) as (_, _, _, tmp):
        time.sleep(0.2)
        text = (tmp / "server.err").read_text(errors="replace")
    shutil.rmtree(tmp, ignore_errors=True)
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(("INIT", "flags=", "max_", "congestion", "time_gran", "unique")):
            if stripped.startswith("unique") and "INIT" not in stripped:
                continue
            lines.append(line.rstrip())
        if stripped.startswith("time_gran"):
            break
    return lines


def measure_variant(backing: Path, variant: Variant, n: int) -> Result:
    """The passes through one mount; a mount that does not work gives a `Result` with
    `error` (the server's last line of stderr)."""
    try:
        with probe_mount(backing, variant) as (_, path, ready, tmp):
            mb_s = passes(path, n)
            folios = page_cache_folios.describe(str(path))
            backing_open = str(ready.get("backing_open", ""))
    except OSError as e:
        err = (tmp_of(e) / "server.err").read_text(errors="replace").strip().splitlines()
        shutil.rmtree(tmp_of(e), ignore_errors=True)
        return Result(
            variant.name, [], "", {}, error=f"{e.strerror}; libfuse: {err[-1] if err else '?'}"
        )
    stats = json.loads((tmp / "stats").read_text())
    shutil.rmtree(tmp, ignore_errors=True)
    reads = {int(k): int(v) for k, v in stats["reads"].items()}
    return Result(variant.name, mb_s, folios, reads, backing_open)


def tmp_of(e: OSError) -> Path:
    return Path(getattr(e, "probe_dir", "/nonexistent"))


def _reads_text(reads: dict[int, int]) -> str:
    if not reads:
        return "none"
    total = sum(reads.values())
    top = max(reads, key=lambda k: reads[k])
    return f"{total} ({reads[top]} x {top // 1024} KiB, largest {max(reads) // 1024} KiB)"


def report(
    results: Sequence[Result], local: Result, init: Sequence[str], size_mb: int, n: int
) -> str:
    load = os.getloadavg()[0]
    lines = [
        f"`python -m tests.bench.fuse_folios_probe --size-mb {size_mb} --passes {n}` on Linux "
        f"{platform.release()}: a {size_mb} MiB file served by a minimal pyfuse3 server from a "
        "local ext4 file (`keep_cache`), read in 1 MiB reads; pass 1 after "
        f"`POSIX_FADV_DONTNEED`, warm = best of passes 3 to {n}. Load average (1 min) at the "
        f"end: {load:.1f}.",
        "",
        "| mount | pass 1 MB/s | warm pass 2 MB/s | warm best MB/s | warm vs ext4 | READ requests "
        "| folios after the passes |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for r in [*results, local]:
        if r.error:
            lines.append(f"| {r.name} | mount fails: {r.error} | | | | | |")
            continue
        ratio = r.warm_best / local.warm_best if local.warm_best else 0.0
        lines.append(
            f"| {r.name} | {r.mb_s[0]:.0f} | {r.mb_s[1]:.0f} | {r.warm_best:.0f} | "
            f"{ratio:.2f}x | {_reads_text(r.reads) if r is not local else 'n/a'} | {r.folios} |"
        )
    lines += ["", "INIT as libfuse printed it (`-o debug`):", "", "```", *init, "```"]
    backing = {r.backing_open for r in results if not r.error}
    lines += [
        "",
        f"`FUSE_DEV_IOC_BACKING_OPEN` on the server's /dev/fuse descriptor: {', '.join(sorted(backing))}.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--passes", type=int, default=5)
    args = parser.parse_args(argv)
    if args.serve:
        _serve(json.loads(Path(args.serve).read_text()))
        return 0
    if os.geteuid() != 0:
        print("fuse_folios_probe needs root (mounts, /proc/kpageflags)", file=sys.stderr)
        return 2
    if args.passes < 3:
        print("fuse_folios_probe: --passes must be at least 3", file=sys.stderr)
        return 2
    backing = backing_file(args.size_mb)
    init = init_lines(backing)
    results = []
    for variant in VARIANTS:
        r = measure_variant(backing, variant, args.passes)
        print(
            f"{r.name}: {', '.join(f'{x:.0f}' for x in r.mb_s)} MB/s; {r.folios}; "
            f"reads {_reads_text(r.reads)} {r.error}",
            flush=True,
        )
        results.append(r)
    local = Result("ext4 (the backing file)", passes(backing, args.passes), "", {})
    local.folios = page_cache_folios.describe(str(backing))
    print()
    print(report(results, local, init, args.size_mb, args.passes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
