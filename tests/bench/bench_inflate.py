"""Span inflation: every span of a gzip layer inflated from its checkpoint alone, with the
system libz and with zlib-ng (`index.zlib_ctypes`), the same spans in the same run.

    python -m tests.bench.bench_inflate [--blob PATH] [--span-size BYTES] [--rounds N]

The layer is `--blob` (a gzip layer blob), or by default the host's Python standard library
as a tar compressed with gzip level 6 (built in memory). Its checkpoints are built once (with
the system libz, as always); then each library inflates every span `--rounds` times, the
libraries taking turns. Prints, per library, the best round's CPU seconds and MB/s of
inflated bytes, and the ratio to the system libz; the spans' bytes are checked equal.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import sys
import sysconfig
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path

from index import zinfo
from index import zlib_ctypes as zc
from index.model import DEFAULT_SPAN_SIZE


def stdlib_layer() -> bytes:
    """The standard library as a gzip-compressed tar (level 6, what image builders use)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        tf.add(sysconfig.get_paths()["stdlib"], arcname="usr/lib/python3")
    return gzip.compress(raw.getvalue(), compresslevel=6, mtime=0)


def inflate_all(blob: bytes, built: zinfo.GzipBuildResult) -> tuple[float, int, str]:
    """CPU seconds, inflated bytes and a digest of every span inflated alone."""
    cps = built.zinfo.checkpoints
    digest = hashlib.sha256()
    total = 0
    started = time.process_time()
    for i, cp in enumerate(cps):
        lo = cp.in_ - (1 if cp.bits else 0)
        hi = cps[i + 1].in_ if i + 1 < len(cps) else len(blob)
        data = zinfo.inflate_span(built.zinfo, i, blob[lo:hi], built.uncompressed_size)
        total += len(data)
        digest.update(data)
    return time.process_time() - started, total, digest.hexdigest()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--blob", type=Path, default=None, help="a gzip layer blob")
    parser.add_argument("--span-size", type=int, default=DEFAULT_SPAN_SIZE)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    blob = args.blob.read_bytes() if args.blob else stdlib_layer()
    built = zinfo.build_gzip_checkpoints(io.BytesIO(blob), args.span_size, lambda _: None)
    system, fast = zc.system_backend(), zc.backend()
    if fast is system:
        print("zlib-ng is not available here: only the system libz", file=sys.stderr)
    libraries = {system.name: system, fast.name: fast}
    best: dict[str, float] = {}
    sums: dict[str, str] = {}
    size = 0
    for _ in range(args.rounds):
        for name, library in libraries.items():
            zc._backend = library
            cpu, size, sums[name] = inflate_all(blob, built)
            best[name] = min(best.get(name, cpu), cpu)
    zc._backend = fast
    if len(set(sums.values())) != 1:
        print(f"the libraries inflated different bytes: {sums}", file=sys.stderr)
        return 1
    spans = len(built.zinfo.checkpoints)
    print(
        f"{len(blob) / 1e6:.1f} MB compressed, {size / 1e6:.1f} MB inflated, {spans} spans of "
        f"{args.span_size} bytes; best of {args.rounds} rounds, libraries taking turns\n"
    )
    print("| library | CPU s | MB/s inflated | vs system libz |")
    print("|---|---:|---:|---:|")
    for name in libraries:
        ratio = best[system.name] / best[name]
        print(f"| {name} | {best[name]:.2f} | {size / 1e6 / best[name]:.0f} | {ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
