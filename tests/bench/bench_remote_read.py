"""Remote read throughput: a ~100 MB layer through `RemoteLayerReader` from a local registry.

Run: ``python -m tests.bench.bench_remote_read [--parallel N] [--span-size BYTES]``

The layer is the host's Python stdlib plus eight 16 MB files of half-random data (about 100 MB
compressed), built once under /var/tmp/sociable-bench/remote-read. It is pushed to a fresh
docker-registry on loopback. Every regular file is then read in tar order, in 128 KiB reads
(the FUSE request size), by N concurrent workers, in these modes:

- ``cold``: empty span cache, every span fetched from the registry (Range requests);
- ``warm``: a new reader over the cache the cold run filled (disk, verify, inflate);
- ``local``: `LocalBlobReader` over the blob file on disk (read, verify, inflate);
- ``zlib``: one-thread `zlib` stream decompression of the whole blob (the floor of a full pull).

Prints MB/s of uncompressed file bytes, request counts and the ratio to ``local``. The machine
is shared (2 cores); numbers are noisy.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import trio

from index.builder import build_ztoc
from index.digest import Digest
from index.model import DEFAULT_SPAN_SIZE, UncompressedOffset, Ztoc
from index.oci.client import AsyncRegistryClient
from index.oci.reference import Reference
from index.oci.registry import RegistryClient
from snapshotter.fs.readers import LayerReader, LocalBlobReader
from snapshotter.lazy import RemoteLayerReader
from snapshotter.lazy.cache import SpanCache
from snapshotter.lazy.sources import RegistrySource
from snapshotter.tasks import TaskScope, open_task_scope
from tests.support.images import (
    MEDIA_LAYER_GZIP,
    Entry,
    File,
    TreeSource,
    python_stdlib_dir,
    write_layer,
)
from tests.support.registry import start_registry

CACHE = Path("/var/tmp/sociable-bench/remote-read")
READ = 128 * 1024
PAD_FILES = 8
PAD_SIZE = 16 * 1000 * 1000


def bench_layer() -> Path:
    """The benchmark layer blob (built once, reused while it exists)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    done = CACHE / "layer.path"
    if done.exists():
        path = Path(done.read_text())
        if path.exists():
            return path
    spec: list[Entry | TreeSource] = [
        TreeSource(
            src=python_stdlib_dir(),
            dest="usr/lib/python3.11",
            exclude=frozenset({"site-packages", "dist-packages", "__pycache__"}),
        ),
        *[File(path=f"data/blob{i}.bin", size=PAD_SIZE) for i in range(PAD_FILES)],
    ]
    layer = write_layer(spec, CACHE / "blobs")
    done.write_text(str(layer.path))
    return layer.path


def regular_files(path: Path) -> list[tuple[int, int]]:
    with tarfile.open(path) as tf:
        return [(m.offset_data, m.size) for m in tf if m.isreg()]


MakeReader = Callable[[TaskScope], LayerReader]


async def read_everything(
    make: MakeReader, files: Sequence[tuple[int, int]], workers: int
) -> tuple[int, LayerReader]:
    queue = list(files)
    total = 0

    async def worker(reader: LayerReader) -> None:
        nonlocal total
        while queue:
            offset, size = queue.pop(0)
            for pos in range(0, size, READ):
                data = await reader.read(UncompressedOffset(offset + pos), min(READ, size - pos))
                total += len(data)

    async with open_task_scope("bench") as root:
        layer_scope = await root.open_child("layer")  # as the mounter: one scope per layer
        reader = make(layer_scope)
        async with trio.open_nursery() as nursery:
            for _ in range(workers):
                nursery.start_soon(worker, reader)
    return total, reader


def timed(
    make: MakeReader, files: Sequence[tuple[int, int]], workers: int
) -> tuple[float, int, LayerReader]:
    start = time.perf_counter()
    total, reader = trio.run(read_everything, make, files, workers)
    return time.perf_counter() - start, total, reader


def zlib_floor(path: Path) -> tuple[float, int]:
    start = time.perf_counter()
    d = zlib.decompressobj(wbits=31)
    total = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            total += len(d.decompress(chunk))
    return time.perf_counter() - start, total


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--parallel", type=int, default=4, help="concurrent readers (default 4)")
    ap.add_argument("--span-size", type=int, default=DEFAULT_SPAN_SIZE)
    ap.add_argument(
        "--no-pipeline",
        action="store_true",
        help="read-ahead rides along in the read's request (no layer task scope)",
    )
    args = ap.parse_args(argv)

    blob = bench_layer()
    size = blob.stat().st_size
    digest = Digest("sha256:" + blob.name)
    t0 = time.perf_counter()
    ztoc: Ztoc = build_ztoc(blob, MEDIA_LAYER_GZIP, args.span_size)
    print(
        f"layer {size / 1e6:.1f} MB compressed, {ztoc.uncompressed_archive_size / 1e6:.1f} MB "
        f"tar, zTOC built in {time.perf_counter() - t0:.1f} s"
    )
    files = regular_files(blob)
    rows: list[tuple[str, float, int, str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-remote-") as tmp:
        work = Path(tmp)
        with start_registry(work / "registry") as registry:
            repo = "bench/remote-read"
            with RegistryClient() as client:
                client.push_blob(Reference.parse(f"{registry.host}/{repo}"), blob, MEDIA_LAYER_GZIP)
                pipelined = not args.no_pipeline

                def remote(cache_dir: Path) -> MakeReader:
                    def make(tasks: TaskScope) -> LayerReader:
                        # One async client per trio.run (its connections belong to that run);
                        # the process ends soon after, so it is not closed explicitly.
                        source = RegistrySource(
                            AsyncRegistryClient(), Reference.parse(f"{registry.host}/{repo}")
                        )
                        return RemoteLayerReader(
                            digest,
                            ztoc,
                            source,
                            SpanCache(cache_dir),
                            tasks=tasks if pipelined else None,
                        )

                    return make

                secs, total, cold = timed(remote(work / "cache"), files, args.parallel)
                assert isinstance(cold, RemoteLayerReader)
                rows.append(
                    (
                        "cold (registry)",
                        secs,
                        total,
                        f"{cold.counters.requests} requests, {cold.span_map.span_count} spans",
                    )
                )
                secs, total, warm = timed(remote(work / "cache"), files, args.parallel)
                assert isinstance(warm, RemoteLayerReader)
                rows.append(
                    ("warm (span cache)", secs, total, f"{warm.counters.requests} requests")
                )
        secs, total, _ = timed(lambda _: LocalBlobReader(blob, ztoc), files, args.parallel)
        rows.append(("local blob", secs, total, "LocalBlobReader"))
        local_rate = total / secs
        secs, total = zlib_floor(blob)
        rows.append(("zlib stream", secs, total, "whole blob, one thread"))
    print("\n| mode | seconds | MB/s | vs local | notes |\n|---|---|---|---|---|")
    for name, secs, total, notes in rows:
        rate = total / secs
        print(f"| {name} | {secs:.2f} | {rate / 1e6:.0f} | {rate / local_rate:.2f}x | {notes} |")
    print(
        f"\n{os.cpu_count()} CPUs, {args.parallel} concurrent readers, "
        f"{len(files)} files, span size {args.span_size}"
    )
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
