"""zstd layers: zstd:chunked served lazily vs the same content as gzip, and plain zstd unpack.

Run (root): ``python -m tests.bench.bench_zstd [--rate 200mbit] [--quick] [--write-docs]``

The image content is real files: busybox, the Python stdlib and ``/usr/bin`` (``--quick``:
busybox and the stdlib). The layer tars are made once without record padding
(``tests.support.zstdimages.unpadded_tar``) and written three ways, cached under
``/var/tmp/sociable-bench/zstd`` keyed by the inputs:

- ``gzip``: gzip -6, indexed with ``sociable convert``;
- ``zstd:chunked``: compressed by Debian's ``skopeo copy --dest-compress-format zstd:chunked``,
  indexed with ``sociable convert --zstd``;
- ``plain zstd``: ``--dest-compress-format zstd`` (one frame per layer: never indexed).

The registry serves inside a network namespace (``bench_lazy``'s: ``docker-registry``, veth,
``tc`` tbf at ``--rate``). For gzip and zstd:chunked, ``bench_lazy``'s scenarios and
workloads: containerd's overlayfs full pull, then a lazy cold pull through CRI with a fresh
sociable daemon; ``small`` (checksums of 20 files spread over the layers, checked) and
``all`` (every regular file read, the byte count checked against the overlayfs run).

Plain zstd unpack, before the link is limited: every layer of the plain zstd image unpacked
by the daemon's local-unpack path (``snapshotter.remote.unpack.unpack_layer``: download,
decode, apply in one streaming pass, diffID checked), one after the other, against
``ctr images pull --snapshotter overlayfs`` of the same image (containerd downloads the
layers, then unpacks them). Throughput is uncompressed MB per second of wall time.

``--write-docs`` replaces the "zstd" section of ``docs/benchmarks.md``. The machine is a
shared 2-core VM: numbers are noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from index.digest import Digest
from index.oci.client import AsyncRegistryClient
from index.oci.reference import Reference
from snapshotter.remote.unpack import unpack_layer
from tests.bench import bench_lazy as lazy
from tests.bench.bench_peers import write_docs
from tests.support import images, zstdimages
from tests.support.containerd import start_containerd
from tests.support.netns import open_netns

WORKDIR = Path("/var/tmp/sociable-bench/zstd")
NS_NAME = "soczstd"
NS_SUBNET = 233
TAG = "v1"
SECTION = "## zstd"
KINDS = ("gzip", "zstd:chunked", "zstd")


@dataclass(frozen=True)
class BenchImages:
    """The same layers three ways (keys of :data:`KINDS`), and the tar sizes."""

    layouts: dict[str, images.Image]
    tar_bytes: int


def _sources(quick: bool) -> list[lazy.Source]:
    stdlib = lazy.SOURCES[3]
    return [stdlib] if quick else [stdlib, lazy.SOURCES[1]]


def build_images(sources: Sequence[lazy.Source]) -> BenchImages:
    files = [lazy.walk_files(s) for s in sources]
    key = "zstd-" + lazy.image_key(files)
    base = WORKDIR / f"images-{key}"
    done = base / "done.json"
    if not done.exists():
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        print(f"building the images in {base} (once)")
        started = time.monotonic()
        specs: list[list[images.Entry | images.TreeSource]] = [list(images.busybox_layer())]
        specs += [[images.TreeSource(s.src, s.dest, s.exclude)] for s in sources]
        tars = [zstdimages.unpadded_tar(spec, base / "scratch") for spec in specs]
        gz_layers = []
        for tar in tars:
            blob = gzip.compress(tar, compresslevel=6, mtime=0)
            path = base / "gz-blobs" / hashlib.sha256(blob).hexdigest()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(blob)
            gz_layers.append(
                zstdimages.ZstdLayer(
                    path,
                    "sha256:" + path.name,
                    "sha256:" + hashlib.sha256(tar).hexdigest(),
                    len(blob),
                    images.MEDIA_LAYER_GZIP,
                )
            )
        zstdimages.write_zstd_image(base / "gzip", gz_layers, tag=TAG)
        for kind in ("zstd:chunked", "zstd"):
            work = base / f"work-{kind.replace(':', '-')}"
            work.mkdir()
            layers = zstdimages.chunked_layers(tars, work, kind)
            zstdimages.write_zstd_image(base / kind.replace(":", "-"), layers, tag=TAG)
            shutil.rmtree(work)
        shutil.rmtree(base / "gz-blobs")
        done.write_text(json.dumps({"tar_bytes": sum(len(t) for t in tars)}))
        print(f"  built in {time.monotonic() - started:.0f} s")
    layouts = {k: images._image_from_layout(base / k.replace(":", "-"), TAG) for k in KINDS}
    return BenchImages(layouts, int(json.loads(done.read_text())["tar_bytes"]))


def convert(image: images.Image, reg: lazy.NsRegistry, repo: str, *flags: str) -> str:
    """Push `image` to `repo`, indexed with ``sociable convert`` (nothing for plain zstd)."""
    ref = f"{reg.host}/{repo}:{TAG}"
    if repo.endswith("plain"):
        images.push(image, reg.host, repo, TAG)
        return ref
    cmd = [sys.executable, "-m", "index.cli", "--root", str(WORKDIR / "index-root"), "convert"]
    cmd += [*flags, "--plain-http", f"oci-layout:{image.layout}:{TAG}", ref]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=lazy.REPO, check=False)
    if proc.returncode != 0:
        raise lazy.BenchError(f"sociable convert {repo}: {proc.stderr.strip()}")
    print(proc.stderr.strip())
    return ref


async def _unpack_all(host: str, repo: str, image: images.Image, dest: Path) -> float:
    ref = Reference.parse(f"{host}/{repo}:{TAG}")
    started = time.monotonic()
    async with AsyncRegistryClient(plain_http=True) as client:
        for i, layer in enumerate(image.layers):
            out = dest / f"layer-{i}"
            out.mkdir(parents=True)
            await unpack_layer(
                client,
                ref,
                Digest(image.manifest_digest),
                Digest(layer.digest),
                out,
                dest / "tmp",
            )
    return time.monotonic() - started


@dataclass(frozen=True)
class UnpackResult:
    sociable_s: float
    containerd_s: float
    compressed: int
    uncompressed: int


def unpack_bench(
    reg: lazy.NsRegistry, ref: str, image: images.Image, tar_bytes: int
) -> UnpackResult:
    run_dir = WORKDIR / "run" / "unpack"
    shutil.rmtree(run_dir, ignore_errors=True)
    repo = ref.split("/", 1)[1].rsplit(":", 1)[0]
    ours = trio.run(_unpack_all, reg.host, repo, image, run_dir / "sociable")
    shutil.rmtree(run_dir / "sociable")
    with start_containerd(
        run_dir / "containerd",
        proxy_address=None,
        cri_snapshotter="overlayfs",
        registry_hosts=[reg.host],
    ) as ctd:
        started = time.monotonic()
        ctd.pull(ref, snapshotter="overlayfs")
        theirs = time.monotonic() - started
    shutil.rmtree(run_dir, ignore_errors=True)
    compressed = sum(layer.size for layer in image.layers)
    r = UnpackResult(ours, theirs, compressed, tar_bytes)
    print(
        f"  plain zstd unpack: sociable {ours:.2f} s ({tar_bytes / ours / 1e6:.0f} MB/s), "
        f"containerd pull+unpack {theirs:.2f} s ({tar_bytes / theirs / 1e6:.0f} MB/s)"
    )
    return r


def render(
    command: str,
    bench: BenchImages,
    runs: dict[str, list[lazy.Run]],
    unpack: UnpackResult | None,
    rate: str,
    load: float,
) -> str:
    sizes = {k: sum(lyr.size for lyr in img.layers) for k, img in bench.layouts.items()}
    lines = [
        SECTION,
        "",
        f"`{command}` on {lazy.machine_facts()}; load average {load:.1f} at the start; "
        f"link {rate}. The same "
        f"{len(bench.layouts['gzip'].layers)} layers ({bench.tar_bytes / 1e6:.0f} MB of tar): "
        + ", ".join(f"{k} {sizes[k] / 1e6:.1f} MB" for k in KINDS)
        + ". Lazy runs are cold (fresh daemon, empty caches); the ratio is against the "
        "overlayfs full pull of the same compression.",
        "",
        "| image | scenario | workload | pull s | total s | received MB | blob GETs | total vs full |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, rs in runs.items():
        base = {r.workload: r.total_s for r in rs if r.name.startswith("overlayfs")}
        for r in rs:
            ratio = f"{r.total_s / base[r.workload]:.2f}x" if r.workload in base else ""
            lines.append(
                f"| {kind} | {r.name} | {r.workload} | {r.pull_s:.2f} | {r.total_s:.2f} | "
                f"{r.rx_bytes / 1e6:.1f} | {r.blob_requests} | {ratio} |"
            )
    if unpack is not None:
        lines += [
            "",
            "Plain (one-frame) zstd, unpacked at pull time, no link limit: "
            f"sociable's local unpack of every layer {unpack.sociable_s:.2f} s "
            f"({unpack.uncompressed / unpack.sociable_s / 1e6:.0f} MB/s of tar), containerd's "
            f"overlayfs pull of the same image {unpack.containerd_s:.2f} s "
            f"({unpack.uncompressed / unpack.containerd_s / 1e6:.0f} MB/s); "
            f"{unpack.compressed / 1e6:.1f} MB compressed.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--rate", default="200mbit", help="tc rate of the link (default 200mbit)")
    parser.add_argument("--quick", action="store_true", help="busybox and the stdlib only")
    parser.add_argument("--workloads", default="small,all", help="comma-separated: small, all")
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_zstd needs root (namespaces, tc, containerd, mounts)", file=sys.stderr)
        return 2
    command = "python -m tests.bench.bench_zstd " + " ".join(argv or sys.argv[1:])
    WORKDIR.mkdir(parents=True, exist_ok=True)
    lock = (WORKDIR / ".lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"bench_zstd: another run holds {WORKDIR / '.lock'}", file=sys.stderr)
        return 2
    load = os.getloadavg()[0]
    sources = _sources(args.quick)
    bench = build_images(sources)
    files = [lazy.walk_files(s) for s in sources]
    small = lazy.choose_small_files(files)
    expected = {f.image_path: lazy.sha256_file(f.host_path) for f in small}
    commands = {"small": lazy.small_command(small), "all": lazy.ALL_COMMAND}
    n_files = {"small": len(small), "all": sum(len(f) for f in files) + lazy.busybox_files()}
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    runs: dict[str, list[lazy.Run]] = {}
    run_dir = WORKDIR / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    with (
        open_netns(NS_NAME, NS_SUBNET) as ns,
        tempfile.TemporaryDirectory(dir=WORKDIR) as regdir,
        lazy.start_ns_registry(ns, Path(regdir)) as reg,
    ):
        refs = {
            "gzip": convert(bench.layouts["gzip"], reg, "bench/zstd-gzip"),
            "zstd:chunked": convert(
                bench.layouts["zstd:chunked"], reg, "bench/zstd-chunked", "--zstd"
            ),
            "zstd": convert(bench.layouts["zstd"], reg, "bench/zstd-plain"),
        }
        unpack = unpack_bench(reg, refs["zstd"], bench.layouts["zstd"], bench.tar_bytes)
        ns.limit(args.rate)
        for kind in ("gzip", "zstd:chunked"):
            print(f"{kind}:")
            rs: list[lazy.Run] = []
            for w in workloads:
                r = lazy.overlay_run(run_dir, reg, refs[kind], w, commands[w])
                rs.append(r)
                all_bytes = r.output.strip() if w == "all" else None
                for lr in lazy.lazy_runs(
                    run_dir, reg, refs[kind], w, commands[w], n_files[w], warm=False
                ):
                    rs.append(lr)
                    if w == "small":
                        lazy.check_small(lr.output, expected)
                    elif lr.output.strip() != all_bytes:
                        raise lazy.BenchError(
                            f"{kind} lazy read {lr.output.strip()} bytes, not {all_bytes}"
                        )
                if w == "small":
                    lazy.check_small(r.output, expected)
            runs[kind] = rs
    shutil.rmtree(run_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        shutil.rmtree(WORKDIR / "index-root")
    section = render(command, bench, runs, unpack, args.rate, load)
    print()
    print(section)
    if args.write_docs:
        write_docs(section, SECTION)
        print(f"wrote the {SECTION!r} section of {lazy.DOCS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
