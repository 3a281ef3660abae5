"""Memory of the daemon: many lazy layers of many small files, concurrent readers, and
mount/unmount cycles.

Run (root): ``python3 -m tests.bench.bench_memory [--quick] [--layers 10] [--files 100000]
[--readers 50] [--read-sec 60] [--cycles 1000] [--write-docs]``

The image: ``--layers`` gzip layers of ``--files`` small files each (64 to 575 bytes, in
directories of 100), converted with ``sociable convert`` (SOCI v2, our own zTOC builder) and
pushed to a docker-registry on loopback; one more image of one ``--cycle-files`` layer for the
cycles. Both are built once and kept, with the registry's storage, under
``/var/tmp/sociable-bench/memory/<parameters>`` (a rerun with the same parameters starts the
registry on that storage and skips the build; the build time is printed when it happens).

The daemon is the real ``sociable-snapshotter`` (default config, no hosts.toml) as a child
process, started through this module (``--daemon``) so that it also reports what only the
process itself can count: a trio instrument counts live trio tasks and a thread writes them,
with the open sqlite connections (`sqlite3.Connection` objects not closed), to a stats file
twice a second. RSS, peak RSS (``VmHWM``), threads and open fds come from ``/proc/<pid>``.

1. Every layer is mounted lazily through the Snapshots API as containerd's unpacker does
   (Prepare with CRI's labels, each layer on the one below); each layer is a directory of the
   daemon's one FUSE host (``<root>/fuse/snap-<id>``).
2. ``--readers`` threads read whole files (page cache dropped first) picked at random over
   every layer for ``--read-sec`` seconds. Reported: RSS after the mounts, the peak, and the
   steady RSS (median of the samples of the last half of the reads), against the goal of
   ``GOAL_MB``.
3. ``--cycles`` mount/unmount cycles of the cycle image's layer (Prepare, Remove, Cleanup,
   which unmounts it). Reported at the start, middle and end: RSS, fds, threads, trio tasks,
   sqlite connections; growth should be about 0.

Prints a markdown section; ``--write-docs`` replaces the "Memory" section of
``docs/benchmarks.md`` with it (``bench_peers.write_docs``). ``--quick`` is a short run (3
layers of 5000 files, 10 readers for 8 s, 40 cycles) to check the machinery.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from index.builder import build_ztoc
from index.ztoc_codec import decode_ztoc, encode_ztoc
from snapshotter.config import RemoteConfig
from snapshotter.fs.tree import build_tree
from tests.bench.bench_lazy import machine_facts
from tests.bench.bench_peers import write_docs
from tests.support import images
from tests.support.chaos import (
    ChaosImage,
    ChaosLayer,
    _indexed_manifest,
    _read_uncached,
    fuse_dirs,
    prepare_remote,
)
from tests.support.cli import sociable
from tests.support.registry import start_registry
from tests.support.snapclient import REPO, SnapClient, sweep_mounts

WORKDIR = Path("/var/tmp/sociable-bench/memory")
SECTION = "## Memory"
GOAL_MB = 300
SPAN_BYTES = 1 << 20
FILES_PER_DIR = 100
STATS_INTERVAL_SEC = 0.5
SAMPLE_SEC = 0.25
START_TIMEOUT_SEC = 120.0


# --- the daemon, with its own counters -----------------------------------------------------------


class _TaskCounter:
    """A trio instrument: live tasks (spawned minus exited)."""

    def __init__(self) -> None:
        self.live = 0

    def task_spawned(self, task: object) -> None:
        self.live += 1

    def task_exited(self, task: object) -> None:
        self.live -= 1


def _open_sqlite_connections() -> int:
    count = 0
    for obj in gc.get_objects():
        if isinstance(obj, sqlite3.Connection):
            with contextlib.suppress(sqlite3.ProgrammingError):
                obj.total_changes  # noqa: B018 (raises once closed)
                count += 1
    return count


def run_daemon_with_stats(stats_path: Path, argv: Sequence[str]) -> None:
    """`sociable-snapshotter ARGV` in this process, with the task instrument installed and a
    thread writing `{"trio_tasks", "sqlite_connections"}` to `stats_path`."""
    import trio

    from snapshotter import cli

    counter = _TaskCounter()
    real_run = trio.run

    def run(*args: Any, **kwargs: Any) -> Any:
        kwargs["instruments"] = [*kwargs.get("instruments", ()), counter]
        return real_run(*args, **kwargs)

    trio.run = run  # the daemon's one trio.run gets the instrument

    def write_stats() -> None:
        tmp = stats_path.with_suffix(".tmp")
        while True:
            doc = {"trio_tasks": counter.live, "sqlite_connections": _open_sqlite_connections()}
            tmp.write_text(json.dumps(doc))
            tmp.replace(stats_path)
            time.sleep(STATS_INTERVAL_SEC)

    threading.Thread(target=write_stats, name="bench-stats", daemon=True).start()
    cli.main(list(argv))


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    root: Path
    address: Path
    stats_path: Path
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def client(self) -> SnapClient:
        return SnapClient(self.address)

    def log_tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def open_daemon(base: Path, config: Path) -> Iterator[Daemon]:
    """The daemon under `base` (fresh root); stopped and its mounts swept on exit."""
    sweep_mounts(base)
    with contextlib.suppress(FileNotFoundError):
        subprocess.run(["rm", "-rf", str(base / "root")], check=True)
    base.mkdir(parents=True, exist_ok=True)
    address, stats, log = base / "snap.sock", base / "stats.json", base / "daemon.log"
    stats.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [
        sys.executable,
        "-m",
        "tests.bench.bench_memory",
        "--daemon",
        str(stats),
        "--address",
        str(address),
        "--root",
        str(base / "root"),
        "--config",
        str(config),
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    daemon = Daemon(proc, base / "root", address, stats, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_SEC
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {proc.returncode}:\n{daemon.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"daemon not serving after {START_TIMEOUT_SEC} s")
            if address.exists() and stats.exists():
                client = daemon.client()
                try:
                    client.list()
                    break
                except grpc.RpcError:
                    pass
                finally:
                    client.close()
            time.sleep(0.2)
        yield daemon
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        sweep_mounts(base)


# --- what /proc and the daemon say ------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    rss_mb: float
    hwm_mb: float
    threads: int
    fds: int
    trio_tasks: int
    sqlite_connections: int


def sample(daemon: Daemon) -> Sample:
    status: dict[str, str] = {}
    for line in Path(f"/proc/{daemon.pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        status[key] = value.strip()
    stats = json.loads(daemon.stats_path.read_text())
    return Sample(
        rss_mb=int(status["VmRSS"].split()[0]) / 1024,
        hwm_mb=int(status["VmHWM"].split()[0]) / 1024,
        threads=int(status["Threads"]),
        fds=len(os.listdir(f"/proc/{daemon.pid}/fd")),
        trio_tasks=int(stats["trio_tasks"]),
        sqlite_connections=int(stats["sqlite_connections"]),
    )


def tree_workers(daemon: Daemon) -> tuple[int, float]:
    """(count, summed peak RSS in MB) of the daemon's tree worker processes now."""
    count, hwm_kb = 0, 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != daemon.pid or b"treeprocs" not in (proc / "cmdline").read_bytes():
                continue
            status = (proc / "status").read_text()
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                count += 1
                hwm_kb += int(line.split()[1])
    return count, hwm_kb / 1024


def settled(daemon: Daemon, seconds: float = 2.0) -> Sample:
    """A sample after `seconds` of quiet and a fresh stats file."""
    time.sleep(max(seconds, 2 * STATS_INTERVAL_SEC))
    return sample(daemon)


# --- the images --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Params:
    layers: int
    files: int
    cycle_files: int

    @property
    def key(self) -> str:
        return f"l{self.layers}-f{self.files}-c{self.cycle_files}-s{SPAN_BYTES}"


def _file(layer: int, i: int) -> images.File:
    size = 64 + (i * 7919 + layer * 104729) % 512
    line = f"layer {layer} file {i}\n".encode()
    data = (line * (size // len(line) + 1))[:size]
    return images.File(path=f"l{layer}/d{i // FILES_PER_DIR:05d}/f{i:06d}.txt", data=data)


def file_paths(layer: int, files: int) -> list[str]:
    return [_file(layer, i).path for i in range(files)]


def _write_layer(blobs: Path, layer: int, files: int) -> images.Layer:
    """One layer of `files` small files (a worker process builds it; the files are made as
    the tar is written, never all in memory)."""
    return images.write_layer((_file(layer, i) for i in range(files)), blobs)


def _push(
    base: Path, host: str, registry_url: str, repo: str, layers: Sequence[tuple[int, int]]
) -> dict[str, Any]:
    """An image of `layers` ((layer number, files) each) converted and pushed as `repo`."""
    tag = "v1"
    layout = base / f"layout-{repo.replace('/', '-')}"
    blobs = layout / "blobs" / "sha256"
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        built = list(pool.map(_write_layer, [blobs] * len(layers), *zip(*layers, strict=True)))
    image = images.write_image_layout(layout, built, tag=tag)
    sociable(
        "convert",
        "--min-layer-size",
        "0",
        "--span-size",
        str(SPAN_BYTES),
        f"oci-layout:{image.layout}:{tag}",
        f"{host}/{repo}:{tag}-soci",
        root=base / "convert-root",
        timeout=7200,
    )
    return {
        "repository": repo,
        "tag": f"{tag}-soci",
        "manifest": _indexed_manifest(registry_url, repo, f"{tag}-soci"),
        "layers": [[layer.digest, str(layer.path)] for layer in image.layers],
    }


def build_images(base: Path, host: str, registry_url: str, params: Params) -> dict[str, Any]:
    """The bench and cycle images, pushed to the registry at `host` (whose storage is under
    `base`) unless `base/images.json` says they already are."""
    record = base / "images.json"
    if record.exists():
        return dict(json.loads(record.read_text()))
    started = time.monotonic()
    bench_layers = [(n, params.files) for n in range(params.layers)]
    doc: dict[str, Any] = {
        "bench": _push(base, host, registry_url, "bench/memory", bench_layers),
        "cycle": _push(base, host, registry_url, "bench/memory-cycle", [(99, params.cycle_files)]),
    }
    doc["build_sec"] = round(time.monotonic() - started, 1)
    record.write_text(json.dumps(doc, indent=1))
    return doc


def chaos_image(doc: dict[str, Any]) -> ChaosImage:
    layers = tuple(ChaosLayer(d, {}, Path(p), SPAN_BYTES) for d, p in doc["layers"])
    return ChaosImage(doc["repository"], doc["tag"], doc["manifest"], layers)


# --- where the memory goes --------------------------------------------------------------------


@dataclass(frozen=True)
class LayerCost:
    """What one bench layer costs in memory, measured in this process with tracemalloc."""

    entries: int
    spans: int
    span_mb: float
    """Average inflated span size."""
    decode_peak_mb: float
    """Peak while its zTOC bytes are decoded into a `Ztoc`."""
    tree_mb: float
    """Held by its layer tree once the `Ztoc` is dropped."""


def layer_cost(blob: Path) -> LayerCost:
    data = encode_ztoc(build_ztoc(blob, images.MEDIA_LAYER_GZIP, SPAN_BYTES))
    gc.collect()
    tracemalloc.start()
    try:
        ztoc = decode_ztoc(data)
        _, decode_peak = tracemalloc.get_traced_memory()
        tree = build_tree(ztoc.files)
        spans = ztoc.compression.max_span_id + 1
        entries, size = len(ztoc.files), ztoc.uncompressed_archive_size
        del ztoc
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del tree
    return LayerCost(entries, spans, size / spans / 1e6, decode_peak / 1e6, held / 1e6)


# --- the phases --------------------------------------------------------------------------------


@dataclass
class ReadPhase:
    at_start: Sample
    after_mount: Sample
    workers: tuple[int, float] = (0, 0.0)
    """Tree worker processes after the mounts: count, summed peak RSS (MB)."""
    peak_mb: float = 0.0
    steady_mb: float = 0.0
    reads: int = 0
    errors: int = 0
    read_mb: float = 0.0
    mount_sec: float = 0.0
    samples: list[float] = field(default_factory=list)


def mount_all(snap: SnapClient, host: str, image: ChaosImage) -> list[str]:
    parent = ""
    targets = []
    for layer in image.layers:
        parent = prepare_remote(snap, host, image, layer, parent)
        targets.append(parent)
    return targets


def read_phase(
    daemon: Daemon,
    host: str,
    image: ChaosImage,
    params: Params,
    readers: int,
    seconds: float,
) -> ReadPhase:
    snap = daemon.client()
    at_start = settled(daemon)
    started = time.monotonic()
    mount_all(snap, host, image)
    mount_sec = time.monotonic() - started
    dirs = fuse_dirs(daemon.root)
    layer_dirs = [dirs[layer.digest][0] for layer in image.layers]
    phase = ReadPhase(at_start, settled(daemon), tree_workers(daemon), mount_sec=mount_sec)
    paths = [file_paths(n, params.files) for n in range(params.layers)]
    stop = time.monotonic() + seconds
    lock = threading.Lock()

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        reads = errors = nbytes = 0
        while time.monotonic() < stop:
            n = rng.randrange(len(layer_dirs))
            try:
                nbytes += len(_read_uncached(layer_dirs[n] / rng.choice(paths[n])))
                reads += 1
            except OSError:
                errors += 1
        with lock:
            phase.reads += reads
            phase.errors += errors
            phase.read_mb += nbytes / 1e6

    threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(readers)]
    read_started = time.monotonic()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        phase.samples.append(sample(daemon).rss_mb)
        time.sleep(SAMPLE_SEC)
    for t in threads:
        t.join()
    last_half = phase.samples[len(phase.samples) // 2 :] or [sample(daemon).rss_mb]
    phase.steady_mb = statistics.median(last_half)
    phase.peak_mb = sample(daemon).hwm_mb
    print(
        f"  {phase.reads} reads ({phase.errors} errors) by {readers} readers in "
        f"{time.monotonic() - read_started:.0f} s"
    )
    snap.close()
    return phase


def cycle_phase(
    daemon: Daemon, host: str, image: ChaosImage, cycles: int
) -> tuple[list[Sample], float]:
    """Samples at the start, middle and end of `cycles` mount/unmount cycles, and the
    seconds the cycles took."""
    snap = daemon.client()
    layer = image.layers[0]
    out = [settled(daemon)]
    started = time.monotonic()
    for i in range(1, cycles + 1):
        target = prepare_remote(snap, host, image, layer)
        snap.remove(target)
        snap.cleanup()
        if i == cycles // 2 or i == cycles:
            out.append(settled(daemon))
        if i % 100 == 0:
            print(f"  {i} cycles, {time.monotonic() - started:.0f} s")
    snap.close()
    return out, time.monotonic() - started


# --- the report --------------------------------------------------------------------------------


def render(
    args: argparse.Namespace,
    command: str,
    params: Params,
    build: dict[str, Any],
    phase: ReadPhase,
    cycled: tuple[list[Sample], float],
    load: tuple[float, float],
    cost: LayerCost,
) -> str:
    cycles, cycle_sec = cycled
    goal_ok = phase.peak_mb <= GOAL_MB
    lru_spans = RemoteConfig().memory_cache_spans
    budget_mb = RemoteConfig().memory_cache_bytes / (1 << 20)
    lines = [
        SECTION,
        "",
        f"Machine: {machine_facts()}. Load average {load[0]:.1f} at the start, {load[1]:.1f} at"
        " the end (the machine is shared; RSS does not depend much on it, times do).",
        "",
        f"Command: `{command}`"
        + (" (the short run: the full one is `--layers 10 --files 100000`)" if args.quick else ""),
        "",
        f"Image: {params.layers} layers of {params.files} files each (64-575 bytes, directories of "
        f"{FILES_PER_DIR}), {SPAN_BYTES >> 20} MiB spans, indexed with `sociable convert`; built "
        f"and pushed once in {build.get('build_sec', '?')} s (cached under {WORKDIR}). The "
        f"daemon: default config, the registry on loopback. {params.layers} lazy mounts (Prepare "
        f"with CRI's labels, each on the one below) took {phase.mount_sec:.1f} s.",
        "",
        "| daemon RSS | MB |",
        "|---|---|",
        f"| after start | {phase.at_start.rss_mb:.0f} |",
        f"| after mounting {params.layers} layers | {phase.after_mount.rss_mb:.0f} |",
        f"| peak (VmHWM), {args.readers} readers for {args.read_sec:.0f} s | {phase.peak_mb:.0f} |",
        f"| steady (median of the last half of the reads) | {phase.steady_mb:.0f} |",
        f"| tree worker processes after the mounts: {phase.workers[0]}, peak RSS summed "
        f"(they stop after a minute without a build) | {phase.workers[1]:.0f} |",
        "",
        f"Reads: {phase.reads} whole files ({phase.read_mb:.1f} MB) read through FUSE with the "
        f"page cache dropped first, {phase.errors} errors. Goal: peak RSS at most {GOAL_MB} MB: "
        + ("met." if goal_ok else "**not met**."),
        "",
        f"Where it goes, per layer of {cost.entries} entries (measured with tracemalloc in the "
        f"bench process): its layer tree holds {cost.tree_mb:.1f} MB while mounted "
        f"({params.layers} layers: {cost.tree_mb * params.layers:.0f} MB); decoding its zTOC "
        f"peaks at {cost.decode_peak_mb:.1f} MB while the mount runs; its {cost.spans} spans "
        f"inflate to {cost.span_mb:.2f} MB each; the memory LRU keeps at most "
        f"`memory_cache_spans` = {lru_spans} of them per mounted layer and "
        f"`memory_cache_bytes` = {budget_mb:.0f} MiB for all layers together.",
        "",
        f"{args.cycles} mount/unmount cycles of a {params.cycle_files}-file layer (Prepare, "
        f"Remove, Cleanup), {cycle_sec:.0f} s in all ({cycle_sec / max(args.cycles, 1):.2f} s "
        "each; the samples after 2 s of quiet):",
        "",
        "| when | RSS MB | open fds | threads | trio tasks | sqlite connections |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in zip(("start", "middle", "end"), cycles, strict=False):
        lines.append(
            f"| {name} | {s.rss_mb:.0f} | {s.fds} | {s.threads} | {s.trio_tasks} | "
            f"{s.sqlite_connections} |"
        )
    first, last = cycles[0], cycles[-1]
    lines += [
        "",
        f"Growth start → end: RSS {last.rss_mb - first.rss_mb:+.0f} MB, fds "
        f"{last.fds - first.fds:+d}, threads {last.threads - first.threads:+d}, trio tasks "
        f"{last.trio_tasks - first.trio_tasks:+d}, sqlite connections "
        f"{last.sqlite_connections - first.sqlite_connections:+d}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--daemon"]:
        run_daemon_with_stats(Path(argv[1]), argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a short run (see the module doc)")
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--files", type=int, default=100_000, help="files per layer")
    parser.add_argument("--cycle-files", type=int, default=10_000, help="files of the cycle layer")
    parser.add_argument("--readers", type=int, default=50)
    parser.add_argument("--read-sec", type=float, default=60.0)
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument(
        "--build-only", action="store_true", help="build and push the images (cached), then stop"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.files, args.cycle_files = 3, 5000, 2000
        args.readers, args.read_sec, args.cycles = 10, 8.0, 40
    if os.geteuid() != 0:
        print("bench_memory needs root (FUSE and bind mounts)", file=sys.stderr)
        return 2
    params = Params(args.layers, args.files, args.cycle_files)
    command = "python3 -m tests.bench.bench_memory " + " ".join(argv)
    base = WORKDIR / params.key
    base.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    with start_registry(base / "registry") as registry:
        build = build_images(base, registry.host, registry.url, params)
        print(f"images ready ({build.get('build_sec', '?')} s to build and push)")
        if args.build_only:
            return 0
        config = base / "sociable.toml"
        config.write_text('[remote]\nhosts_dir = ""\n')
        bench, cycle = chaos_image(build["bench"]), chaos_image(build["cycle"])
        with open_daemon(base / "run", config) as daemon:
            print(f"daemon pid {daemon.pid}: {sample(daemon)}")
            phase = read_phase(daemon, registry.host, bench, params, args.readers, args.read_sec)
            print(f"  peak {phase.peak_mb:.0f} MB, steady {phase.steady_mb:.0f} MB")
            cycles, cycle_sec = cycle_phase(daemon, registry.host, cycle, args.cycles)
    load = (load_start, os.getloadavg()[0])
    cost = layer_cost(bench.layers[0].path)
    section = render(args, command, params, build, phase, (cycles, cycle_sec), load, cost)
    print()
    print(section)
    if args.write_docs:
        write_docs(section, SECTION)
        print(f"wrote the {SECTION!r} section of docs/benchmarks.md")
    return 0 if phase.peak_mb <= GOAL_MB and phase.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
