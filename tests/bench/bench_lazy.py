"""Lazy pull vs containerd's overlayfs full pull, through a rate-limited link.

Run (root): ``python -m tests.bench.bench_lazy [--rate 200mbit] [--write-docs] [--skip-lazy]``

Set-up, all made by this script and removed at the end:

- a network namespace joined by a veth pair (``tests.support.netns``) with a ``tc`` tbf limit
  of ``--rate`` in both directions; Debian's ``docker-registry`` serves inside it on
  ``10.231.<subnet>.2:5000`` (access log on, to count blob requests);
- an image of real files, over 500 MB compressed (gzip -6): busybox, then one layer each of
  ``/usr/lib/x86_64-linux-gnu``, ``/usr/bin``, ``/usr/share`` and the Python stdlib. Built once
  under ``/var/tmp/sociable-bench/lazy`` keyed by the inputs (paths, sizes, mtimes), indexed and
  pushed with ``sociable convert`` (before the limit is set); the registry storage is kept for
  the next run with the same key.

Scenarios, each with a fresh containerd 1.6 (and, for lazy, a fresh sociable daemon):

- ``overlayfs``: ``ctr images pull --snapshotter overlayfs`` (full pull and unpack), then the
  workload in a container (``ctr run``);
- ``lazy``: CRI ``PullImage`` with ``snapshotter = "sociable"``, then the workload in a
  container of that image (``ctr -n k8s.io run``);
- ``lazy, warm cache``: the same daemon after the image was removed (RemoveImage + GC), so the
  span cache is kept, pulled and run again.

Workloads: ``small`` reads and checksums 20 files (10-20 MB) spread over the layers, checked
against the host's files; ``all`` reads every regular file (``find / -xdev -type f -exec cat``),
checked to read as many bytes as the overlayfs run. Measured: pull time, total time from the
start of the pull to the end of the workload, bytes received from the namespace (veth counter),
blob requests in the registry's access log.

Then read throughput of the largest file of the image (``--reads-only``: only this) in a fresh
daemon with background fetch off, through four paths: the lazy snapshot's overlayfs view, the
file directly on the FUSE layer, containerd's overlayfs snapshotter view of the same image
(imported from the image's OCI layout into the same containerd) and the plain local file.
Sequential (1 MiB reads) and random (4 KiB and 128 KiB ``pread``): cold (the lazy view's first
read from the registry; then from the daemon's local caches after the page cache is dropped
with ``POSIX_FADV_DONTNEED``) and warm (page cache: pass 2, and the best of passes 3-5), with the
bytes the daemon served per lazy measurement and the page-cache folio sizes of each path
(``tests.bench.page_cache_folios``). ``--inflated-cache-max-bytes 0`` runs it without the
inflated-span tier.

Each lazy run also reports what the daemon did for it: FUSE requests per handler divided by
the files the workload read (``fuseOps`` in the daemon's ``status.json``, sampled before the
pull and after the workload, so the pull and the container's start are in it) and the
daemon's CPU time (user + sys from ``/proc/<pid>/stat``, and the trio thread's time inside
the handlers). ``--counts-only`` measures only that, quickly: no ``tc`` limit, no overlayfs
baseline, no warm run, no read matrix, background fetch off (so the CPU time is the read
path's); the ``small`` workload and a reduced read-every-file workload over the Python stdlib
layer (``stdlib``). Request counts do not depend on timing,
so they are worth recording even on a busy machine; the CPU times are not.

Prints a markdown table with ratios against the overlayfs run of the same invocation;
``--write-docs`` replaces the "Lazy pull" section of ``docs/benchmarks.md`` (with
``--reads-only``: only its FUSE-read part and the warm-read goal line; with
``--counts-only``: only its request-count part), keeping the hand-written notes at its end.
The machine is a shared 2-core VM: numbers are noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import functools
import hashlib
import itertools
import json
import os
import platform
import random
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.bench import page_cache_folios
from tests.support import images
from tests.support.containerd import (
    PROXY_NAME,
    Containerd,
    ContainerdPaths,
    ContainerdSnapshots,
    start_containerd,
)
from tests.support.netns import NetNs, open_netns
from tests.support.snapclient import MountSpec, SnapDaemon, mounted, run_daemon

REPO = Path(__file__).resolve().parents[2]
WORKDIR = Path("/var/tmp/sociable-bench/lazy")
NS_NAME = "socbench"
NS_SUBNET = 231
REGISTRY_PORT = 5000
REPOSITORY = "bench/lazy"
TAG = "v1"
DOCS = REPO / "docs" / "benchmarks.md"
SECTION = "## Lazy pull"

SMALL_FILES = 20
SMALL_MIN_FILE, SMALL_MAX_FILE = 320 * 1024, 5 * 1024 * 1024 // 4
SMALL_BUDGET = 19 * 1024 * 1024
SEQ_BLOCK = 1 << 20
RANDOM_READS = {4096: 2000, 128 * 1024: 400}
PYTHON_STDLIB_EXCLUDE = frozenset({"site-packages", "dist-packages", "__pycache__"})


class BenchError(Exception):
    """A step of the benchmark failed; the message names the step and the cause."""


# ---------------------------------------------------------------------------------------------
# The image


@dataclass(frozen=True)
class Source:
    """One layer of real files: ``src`` copied to ``dest`` in the image."""

    src: Path
    dest: str
    exclude: frozenset[str] = frozenset()


SOURCES = (
    Source(Path("/usr/lib/x86_64-linux-gnu"), "usr/lib/x86_64-linux-gnu"),
    Source(Path("/usr/bin"), "usr/bin"),
    Source(Path("/usr/share"), "usr/share", frozenset({"package-lists"})),
    Source(images.python_stdlib_dir(), "usr/lib/python3.11", PYTHON_STDLIB_EXCLUDE),
)


@dataclass(frozen=True)
class HostFile:
    """A regular file of the image: its path in the image and on the host, and its size."""

    image_path: str
    host_path: Path
    size: int


def walk_files(source: Source) -> list[HostFile]:
    """The regular files a layer built from ``source`` contains, in walk order (first name
    of each hard-link group only counts once for choosing, but every name is a file)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(source.src):
        dirnames[:] = sorted(d for d in dirnames if d not in source.exclude)
        for name in sorted(filenames):
            if name in source.exclude:
                continue
            full = Path(dirpath) / name
            st = full.lstat()
            if stat.S_ISREG(st.st_mode):
                rel = full.relative_to(source.src).as_posix()
                out.append(HostFile(f"/{source.dest}/{rel}", full, st.st_size))
    return out


def image_key(files: Sequence[Sequence[HostFile]]) -> str:
    """A hash of the inputs: every path, size and mtime, and the busybox binary."""
    h = hashlib.sha256(b"bench-lazy-v1\0")
    bb = images.BUSYBOX.stat()
    h.update(f"{bb.st_size}:{bb.st_mtime_ns}\0".encode())
    for layer in files:
        for f in layer:
            st = f.host_path.stat()
            h.update(f"{f.image_path}:{st.st_size}:{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


def build_image(key: str) -> images.Image:
    """The benchmark image's OCI layout (cached under :data:`WORKDIR`)."""
    final = WORKDIR / f"image-{key}"
    if (final / "index.json").exists():
        return images._image_from_layout(final, TAG)
    WORKDIR.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=WORKDIR, prefix=".image-"))
    specs: list[images.LayerSpec] = [images.busybox_layer()]
    specs += [[images.TreeSource(s.src, s.dest, s.exclude)] for s in SOURCES]
    print(f"building the image layout in {tmp} (once; gzip -6 of ~2 GB takes minutes)")
    started = time.monotonic()
    try:
        images.write_oci_layout(tmp, specs, tag=TAG, cmd=("/bin/sh",))
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"  built in {time.monotonic() - started:.0f} s")
    return images._image_from_layout(final, TAG)


def choose_small_files(files: Sequence[Sequence[HostFile]], seed: int = 4) -> list[HostFile]:
    """:data:`SMALL_FILES` files between 320 KiB and 1.25 MiB, spread over the layers, at most
    :data:`SMALL_BUDGET` bytes in total (deterministic for a given image)."""
    rng = random.Random(seed)
    per_layer = [
        [f for f in layer if SMALL_MIN_FILE <= f.size <= SMALL_MAX_FILE and " " not in f.image_path]
        for layer in files
    ]
    chosen: list[HostFile] = []
    total = 0
    while len(chosen) < SMALL_FILES and any(per_layer):
        for candidates in per_layer:
            if not candidates or len(chosen) >= SMALL_FILES:
                continue
            f = candidates.pop(rng.randrange(len(candidates)))
            if total + f.size <= SMALL_BUDGET:
                chosen.append(f)
                total += f.size
    return chosen


def busybox_files() -> int:
    """Regular files in the busybox layer (``find -type f`` counts each name once)."""
    layer = images.busybox_layer()
    return sum(1 for f in layer if isinstance(f, images.File))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(SEQ_BLOCK):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# The registry in the namespace


@dataclass
class NsRegistry:
    """docker-registry serving inside a namespace; ``host`` is ``IP:PORT``."""

    ns: NetNs
    storage: Path
    log: Path
    proc: subprocess.Popen[bytes]

    @property
    def host(self) -> str:
        return f"{self.ns.ns_ip}:{REGISTRY_PORT}"

    def log_offset(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def blob_requests_since(self, offset: int) -> int:
        """GET requests for blobs logged after byte ``offset`` of the access log."""
        with open(self.log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        return sum(1 for line in text.splitlines() if '"GET /v2/' in line and "/blobs/" in line)


@contextlib.contextmanager
def start_ns_registry(ns: NetNs, base: Path) -> Iterator[NsRegistry]:
    """Runs docker-registry inside ``ns`` with storage ``base/storage`` (kept), until exit.
    Raises :class:`BenchError` if it does not answer within 20 s."""
    storage = base / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    config = {
        "version": 0.1,
        "log": {"level": "error", "accesslog": {"disabled": False}},
        "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True}},
        "http": {"addr": f"{ns.ns_ip}:{REGISTRY_PORT}", "secret": "sociable-bench"},
        "health": {"storagedriver": {"enabled": False}},
    }
    cfg = base / "config.yml"
    cfg.write_text(json.dumps(config))
    log = base / "registry.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            ns.exec_args("docker-registry", "serve", str(cfg)),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "OTEL_TRACES_EXPORTER": "none"},
        )
    reg = NsRegistry(ns, storage, log, proc)
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise BenchError(f"docker-registry in {ns.name} exited {proc.returncode}")
            try:
                if httpx.get(f"http://{reg.host}/v2/", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"docker-registry in {ns.name}: no answer on {reg.host}")
            time.sleep(0.1)
        yield reg
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def convert_and_push(image: images.Image, reg: NsRegistry, workdir: Path) -> str:
    """Indexes the image and pushes it (``sociable convert``) unless this registry storage
    already holds it. Returns the reference."""
    ref = f"{reg.host}/{REPOSITORY}:{TAG}"
    marker = reg.storage.parent / f"pushed-{image.manifest_digest.split(':')[1][:16]}"
    if marker.exists():
        return ref
    print(f"indexing and pushing {ref} (once per image)")
    started = time.monotonic()
    cmd = [
        sys.executable,
        "-m",
        "index.cli",
        "--root",
        str(workdir / "index-root"),
        "-q",
        "convert",
        "--plain-http",
        f"oci-layout:{image.layout}:{TAG}",
        ref,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
    if proc.returncode != 0:
        raise BenchError(f"sociable convert failed: {proc.stderr.strip()}")
    marker.write_text(ref)
    print(f"  done in {time.monotonic() - started:.0f} s")
    return ref


# ---------------------------------------------------------------------------------------------
# Scenarios


@dataclass
class Run:
    """One measured scenario."""

    name: str
    workload: str
    pull_s: float
    total_s: float
    rx_bytes: int
    pull_rx_bytes: int
    blob_requests: int
    output: str = field(repr=False, default="")
    daemon: DaemonWork | None = None


STATUS_SETTLE_SEC = 1.2
"""The daemon rewrites ``status.json`` at most once a second: two reads this far apart that
agree mean it caught up."""

OP_COLUMNS = (
    "lookup",
    "getattr",
    "open",
    "read",
    "flush",
    "release",
    "opendir",
    "readdir",
    "releasedir",
    "getxattr",
    "listxattr",
    "forget",
    "statfs",
    "access",
    "readlink",
)
"""The handlers of ``snapshotter.fs.fuse.FUSE_OPS`` in table order (``readdir`` answers
READDIRPLUS)."""
ALWAYS_SHOWN = frozenset(OP_COLUMNS) - {"releasedir", "access", "readlink"}
"""Columns shown even when no run had such a request (the others only when one had)."""


@dataclass(frozen=True)
class DaemonSample:
    """The daemon's FUSE counters (``op -> (requests, handler CPU s)``) and its process CPU
    time (user + sys, seconds) at one moment."""

    ops: dict[str, tuple[int, float]]
    cpu_s: float
    trio_cpu_s: float = 0.0


@dataclass(frozen=True)
class DaemonWork:
    """What the daemon did between two samples, for ``files`` files read by the workload."""

    files: int
    requests: dict[str, int]
    handler_cpu_s: dict[str, float]
    cpu_s: float
    pull_cpu_s: float = 0.0
    trio_cpu_s: float = 0.0
    pull_trio_cpu_s: float = 0.0

    @property
    def workload_cpu_s(self) -> float:
        return self.cpu_s - self.pull_cpu_s

    @property
    def workload_trio_cpu_s(self) -> float:
        return self.trio_cpu_s - self.pull_trio_cpu_s

    @property
    def total_requests(self) -> int:
        return sum(n for op, n in self.requests.items() if op != "push")

    @property
    def pushed_files(self) -> int:
        """Files pushed into the page cache (``snapshotter.fs.push``): not requests."""
        return self.requests.get("push", 0)


def _process_cpu_s(pid: int, tid: int | None = None) -> float:
    """user + sys CPU seconds of process ``pid`` (all its threads), or of its thread ``tid``
    (the daemon's main thread, ``tid == pid``, runs trio and serves FUSE requests)."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _fuse_ops(daemon: SnapDaemon) -> dict[str, tuple[int, float]]:
    try:
        doc = json.loads((daemon.root / "status.json").read_text())
    except (OSError, ValueError) as e:
        raise BenchError(f"reading the daemon's status.json: {e}") from e
    ops = doc.get("fuseOps", {})
    return {op: (int(v["count"]), float(v["cpuSec"])) for op, v in ops.items()}


def sample_daemon(daemon: SnapDaemon) -> DaemonSample:
    """The daemon's counters once its ``status.json`` has caught up (see
    :data:`STATUS_SETTLE_SEC`, at most 15 s)."""
    if daemon.proc is None:
        raise BenchError("the daemon is not running")
    ops = _fuse_ops(daemon)
    deadline = time.monotonic() + 15
    while True:
        time.sleep(STATUS_SETTLE_SEC)
        again = _fuse_ops(daemon)
        if again == ops or time.monotonic() > deadline:
            pid = daemon.proc.pid
            return DaemonSample(again, _process_cpu_s(pid), _process_cpu_s(pid, pid))
        ops = again


def daemon_work(
    before: DaemonSample,
    after: DaemonSample,
    files: int,
    pulled: tuple[float, float] | None = None,
) -> DaemonWork:
    """The difference of two samples; ``pulled``: the process's and its trio thread's CPU time
    read right after the pull (splits the CPU time into pull and workload)."""
    ops = set(before.ops) | set(after.ops)
    zero = (0, 0.0)
    return DaemonWork(
        files=files,
        requests={op: after.ops.get(op, zero)[0] - before.ops.get(op, zero)[0] for op in ops},
        handler_cpu_s={op: after.ops.get(op, zero)[1] - before.ops.get(op, zero)[1] for op in ops},
        cpu_s=after.cpu_s - before.cpu_s,
        pull_cpu_s=0.0 if pulled is None else pulled[0] - before.cpu_s,
        trio_cpu_s=after.trio_cpu_s - before.trio_cpu_s,
        pull_trio_cpu_s=0.0 if pulled is None else pulled[1] - before.trio_cpu_s,
    )


SHELL = "/bin/sh"
"""busybox's shell: the image's /usr/bin holds the host's dynamically linked tools, whose
loader (/lib64) is not in the image, so every command runs with PATH=/bin (busybox)."""


def small_command(files: Sequence[HostFile]) -> str:
    return "PATH=/bin; sha256sum " + " ".join(shlex.quote(f.image_path) for f in files)


ALL_COMMAND = "PATH=/bin; find / -xdev -type f -exec cat {} + | wc -c"
STDLIB = SOURCES[3]
STDLIB_COMMAND = f"PATH=/bin; find /{STDLIB.dest} -xdev -type f -exec cat {{}} + | wc -c"
"""The reduced read-every-file workload of ``--counts-only``: every file of one layer of many
small files (the Python stdlib)."""


def check_small(output: str, expected: dict[str, str]) -> None:
    got = {}
    for line in output.splitlines():
        digest, _, path = line.strip().partition("  ")
        got[path] = digest
    if got != expected:
        wrong = sorted(p for p in expected if got.get(p) != expected[p])
        raise BenchError(f"small workload: wrong or missing checksums for {wrong[:5]}")


TIMELINE = False
"""``--timeline``: print the link's received MB per second of every measured run."""


@contextlib.contextmanager
def link_timeline(interface: str, what: str) -> Iterator[None]:
    """With ``--timeline``, sample ``interface``'s received bytes every second in a thread and
    print MB per second once the block ends (where the link was idle during a run)."""
    if not TIMELINE:
        yield
        return
    counter = Path(f"/sys/class/net/{interface}/statistics/rx_bytes")
    samples: list[int] = [int(counter.read_text())]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(1.0):
            samples.append(int(counter.read_text()))

    thread = threading.Thread(target=sample, name="timeline", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        samples.append(int(counter.read_text()))
        rates = [f"{(b - a) / 1e6:.0f}" for a, b in itertools.pairwise(samples)]
        print(f"  link MB/s per second, {what}: {' '.join(rates)}")


def measure(
    name: str,
    workload: str,
    reg: NsRegistry,
    pull: Callable[[], None],
    run: Callable[[], str],
) -> Run:
    """Times ``pull`` then ``run``, counting the link's received bytes and blob requests."""
    c0, log0 = reg.ns.counters(), reg.log_offset()
    with link_timeline(reg.ns.host_if, f"{name}, {workload}"):
        t0 = time.monotonic()
        if TIMELINE:  # to line the daemon's log up with the run
            print(
                f"  {name}, {workload}: pull starts {datetime.datetime.now(datetime.UTC):%H:%M:%S.%f}"
            )
        pull()
        t1 = time.monotonic()
        pull_rx = reg.ns.counters().rx_bytes - c0.rx_bytes
        out = run()
        t2 = time.monotonic()
    rx = reg.ns.counters().rx_bytes - c0.rx_bytes
    r = Run(name, workload, t1 - t0, t2 - t0, rx, pull_rx, reg.blob_requests_since(log0), out)
    print(
        f"  {name:<22} {workload:<5} pull {r.pull_s:7.2f} s  total {r.total_s:7.2f} s  "
        f"rx {rx / 1e6:8.1f} MB (pull {pull_rx / 1e6:.1f} MB)  blob GETs {r.blob_requests}"
    )
    return r


def containerd_base(workdir: Path, name: str) -> Path:
    base = workdir / name
    shutil.rmtree(base, ignore_errors=True)
    return base


def overlay_run(workdir: Path, reg: NsRegistry, ref: str, workload: str, command: str) -> Run:
    base = containerd_base(workdir, f"ctd-ovl-{workload}")
    with start_containerd(
        base, proxy_address=None, cri_snapshotter="overlayfs", registry_hosts=[reg.host]
    ) as ctd:
        return measure(
            "overlayfs (full pull)",
            workload,
            reg,
            lambda: ctd.pull(ref, snapshotter="overlayfs"),
            lambda: ctd.run(
                ref, f"w-{workload}", SHELL, "-c", command, snapshotter="overlayfs", timeout=1800
            ),
        )


EXTRA_REMOTE_CONFIG: list[str] = []
"""`[remote]` lines every lazy daemon of the run gets (`--daemon-config`)."""


def daemon_config(
    path: Path, certs_d: Path, *, background_fetch: bool = True, inflated_bytes: int | None = None
) -> Path:
    """A daemon config file: registry hosts from containerd's ``certs.d``, defaults otherwise
    (``background_fetch`` off only for the read-throughput scenario)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f'[remote]\nhosts_dir = "{certs_d}"\n'
    if not background_fetch:
        text += "background_fetch = false\n"
    if inflated_bytes is not None:
        text += f"inflated_cache_max_bytes = {inflated_bytes}\n"
    text += "".join(f"{line}\n" for line in EXTRA_REMOTE_CONFIG)
    path.write_text(text)
    return path


@contextlib.contextmanager
def lazy_stack(
    base: Path, reg: NsRegistry, *, background_fetch: bool = True, inflated_bytes: int | None = None
) -> Iterator[tuple[SnapDaemon, Containerd]]:
    """A fresh sociable daemon and a containerd using it for CRI, under ``base``."""
    certs_d = ContainerdPaths(base / "containerd").certs_d
    config = daemon_config(
        base / "sociable.toml",
        certs_d,
        background_fetch=background_fetch,
        inflated_bytes=inflated_bytes,
    )
    with (
        run_daemon(base / "sociable", config=config) as daemon,
        start_containerd(
            base / "containerd",
            proxy_address=daemon.address,
            proxy_name=PROXY_NAME,
            cri_snapshotter=PROXY_NAME,
            registry_hosts=[reg.host],
        ) as ctd,
    ):
        yield daemon, ctd


def _remove_image(ctd: Containerd, ref: str) -> None:
    ctd.cri().remove_image(ref)
    ctd.gc("k8s.io")


def _remote_snapshots(daemon: SnapDaemon) -> int:
    client = daemon.client()
    try:
        return sum(1 for i in client.list() if "containerd.io/snapshot/remote" in i.labels)
    finally:
        client.close()


def lazy_runs(
    workdir: Path,
    reg: NsRegistry,
    ref: str,
    workload: str,
    command: str,
    files: int,
    *,
    warm: bool = True,
    background_fetch: bool = True,
) -> list[Run]:
    """A cold lazy run and (``warm``) a warm-cache one (image removed, cache kept) for
    ``workload``, which reads ``files`` files; each with the daemon's work (:class:`DaemonWork`)."""
    runs = []
    with lazy_stack(
        containerd_base(workdir, f"lazy-{workload}"), reg, background_fetch=background_fetch
    ) as (daemon, ctd):
        pulled_cpu: list[tuple[float, float]] = []

        def pull() -> None:
            ctd.cri().pull_image(ref)
            if daemon.proc is not None:
                pid = daemon.proc.pid
                pulled_cpu.append((_process_cpu_s(pid), _process_cpu_s(pid, pid)))

        for label, n in (("lazy, cold", 1), ("lazy, warm span cache", 2))[: 2 if warm else 1]:
            if n == 2:
                _remove_image(ctd, ref)

            def run(n: int = n) -> str:
                return ctd.run(
                    ref, f"w-{workload}-{n}", SHELL, "-c", command, namespace="k8s.io", timeout=1800
                )

            before = sample_daemon(daemon)
            r = measure(label, workload, reg, pull, run)
            r.daemon = daemon_work(
                before, sample_daemon(daemon), files, pulled_cpu[-1] if pulled_cpu else None
            )
            print(
                f"  daemon: {r.daemon.total_requests} FUSE requests for {files} files "
                f"({r.daemon.pushed_files} pushed), "
                f"CPU {r.daemon.pull_cpu_s:.1f} s in the pull, "
                f"{r.daemon.workload_cpu_s:.1f} s in the workload "
                f"({r.daemon.workload_trio_cpu_s:.1f} s on the trio thread, "
                f"{sum(r.daemon.handler_cpu_s.values()):.1f} s in handlers)"
            )
            runs.append(r)
            if n == 1:
                print(f"  ({_remote_snapshots(daemon)} layers mounted lazily)")
        # the last run's daemon log, for a look at its timing after the run directory is gone
        shutil.copyfile(daemon.log, WORKDIR / f"daemon-{workload}.log")
    return runs


# ---------------------------------------------------------------------------------------------
# FUSE read throughput


def _drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def seq_read(path: Path) -> float:
    """MB/s of one sequential read of the whole file in 1 MiB reads."""
    size = 0
    t0 = time.monotonic()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(SEQ_BLOCK):
            size += len(chunk)
    return size / 1e6 / (time.monotonic() - t0)


def random_read(path: Path, block: int, count: int, seed: int) -> float:
    """MB/s of ``count`` random ``pread``s of ``block`` bytes (aligned offsets)."""
    rng = random.Random(seed)
    size = path.stat().st_size
    offsets = [rng.randrange(0, max(1, size - block)) // block * block for _ in range(count)]
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        t0 = time.monotonic()
        for off in offsets:
            os.pread(fd, block, off)
        elapsed = time.monotonic() - t0
    finally:
        os.close(fd)
    return count * block / 1e6 / elapsed


READ_PATHS = ("lazy", "fuse", "ovl", "local")
"""The read matrix's columns: the lazy snapshot's overlayfs view (what a container of the lazy
image reads through), the same file directly on the FUSE layer, containerd's overlayfs
snapshotter view of the same image (a container of the fully pulled image: local-disk lowers),
and the file on plain local disk."""


@dataclass
class ReadResult:
    """One row of the read matrix: MB/s per :data:`READ_PATHS` key (None: not measured) and
    the bytes the daemon served during the measurement of the lazy view and of the FUSE path."""

    mode: str
    mb_s: dict[str, float | None]
    daemon_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def lazy_mb_s(self) -> float:
        return self.mb_s.get("lazy") or 0.0

    @property
    def local_mb_s(self) -> float:
        return self.mb_s.get("local") or 0.0


@dataclass
class ReadTargets:
    """The benchmark file through each of :data:`READ_PATHS`, and the FUSE layer's status
    file (``bytesServed`` counts bytes the daemon answered)."""

    paths: dict[str, Path]
    status: Path
    backing: Path | None = None
    """The daemon's passthrough directory: a cold read of the lazy view or the FUSE layer
    also drops the pages of the file's backing copy (the kernel reads it from there)."""

    def served(self) -> int:
        return int(json.loads(self.status.read_text())["bytesServed"])

    def copied(self, timeout_s: float = 30.0) -> bool:
        """Wait until the daemon has no passthrough copy in progress; whether it holds one
        (False at once when passthrough is off)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            doc = (
                json.loads((self.backing.parent / "status.json").read_text())
                if self.backing
                else {}
            )
            stats = doc.get("passthrough")
            if not stats:
                return False
            if not stats["copying"]:
                return bool(stats["copies"])
            time.sleep(0.2)
        return False

    def drop(self, key: str) -> None:
        """Drop the page cache of the file through path `key` (and of its backing copy)."""
        _drop(self.paths[key])
        if key in ("lazy", "fuse") and self.backing is not None and self.backing.is_dir():
            for copy in self.backing.iterdir():
                _drop(copy)


STEADY_SEQ = "sequential, warm (page cache, best of passes 3-5)"
COPIED_ROUNDS = 5
"""Rounds of the warm rows once copied: each round reads through every path in turn (the
order rotating), and each path's best round counts, so a slow spell of the shared VM hits all
paths alike instead of the one measured during it."""
COPIED_WARM = f"warm once copied (best of {COPIED_ROUNDS} rounds, paths interleaved)"
COPIED_SEQ = f"sequential, {COPIED_WARM}"


def _best_of(n: int, fn: Callable[[Path], float], path: Path) -> float:
    """The best of ``n`` runs of ``fn`` (steady-state warm reads; the VM is shared and noisy)."""
    return max(fn(path) for _ in range(n))


def _random(block: int, count: int, path: Path) -> float:
    return random_read(path, block, count, 1)


@dataclass
class ReadMatrix:
    """The read matrix and, per path, the page-cache folio sizes after its sequential passes."""

    rows: list[ReadResult]
    folios: dict[str, str]


def read_throughput(targets: ReadTargets) -> ReadMatrix:
    """The read matrix. The lazy view's first read is cold from the registry; later "cold"
    reads come from the daemon's local caches (span cache, inflated tier) after the page cache
    was dropped for the file. Each path runs its passes back to back: sequential cold, then
    warm pass 2 (which also moves the pages to the kernel's active list) and the best of
    passes 3-5 (steady state); random 4 KiB and 128 KiB ``pread`` likewise over the same
    offsets. Every pass opens and closes the file."""
    paths = targets.paths
    rows: dict[str, ReadResult] = {}

    def measure_row(mode: str, key: str, fn: Callable[[Path], float]) -> None:
        row = rows.setdefault(mode, ReadResult(mode, {k: None for k in READ_PATHS}))
        before = targets.served()
        row.mb_s[key] = fn(paths[key])
        if key in ("lazy", "fuse"):
            row.daemon_bytes[key] = targets.served() - before

    def measure_interleaved(mode: str, fn: Callable[[Path], float]) -> None:
        """`COPIED_ROUNDS` rounds over every path (rotating order); each path's best."""
        row = rows.setdefault(mode, ReadResult(mode, {k: None for k in READ_PATHS}))
        for r in range(COPIED_ROUNDS):
            shift = r % len(READ_PATHS)
            for key in READ_PATHS[shift:] + READ_PATHS[:shift]:
                before = targets.served()
                row.mb_s[key] = max(row.mb_s[key] or 0.0, fn(paths[key]))
                if key in ("lazy", "fuse"):
                    served = targets.served() - before
                    row.daemon_bytes[key] = row.daemon_bytes.get(key, 0) + served

    measure_row("sequential, first read (lazy: registry, others: disk)", "lazy", seq_read)
    for key in READ_PATHS:
        if key == "fuse":  # shares the lazy view's page cache and daemon: no first read
            continue
        if key != "lazy":
            targets.drop(key)
            measure_row("sequential, first read (lazy: registry, others: disk)", key, seq_read)
    folios: dict[str, str] = {}
    for key in READ_PATHS:
        targets.drop(key)
        measure_row("sequential, cold (local caches)", key, seq_read)
        measure_row("sequential, warm (page cache, pass 2)", key, seq_read)
        measure_row(STEADY_SEQ, key, functools.partial(_best_of, 3, seq_read))
        folios[key] = page_cache_folios.describe(str(paths[key]))
    for block, count in RANDOM_READS.items():
        label = f"{block // 1024} KiB"
        for key in READ_PATHS:
            targets.drop(key)
            one = functools.partial(_random, block, count)
            measure_row(f"random {label}, cold (local caches)", key, one)
            measure_row(f"random {label}, warm (page cache, pass 2)", key, one)
            measure_row(
                f"random {label}, warm (page cache, best of passes 3-5)",
                key,
                functools.partial(_best_of, 3, one),
            )
    # A file read again and again is passed through to its copy once the daemon made it
    # (FUSE passthrough: the copy is made after the file's second close, in the background,
    # so the passes above may still come from the FUSE page cache): the steady state.
    # Every path starts again from a dropped page cache (the random passes above left small
    # folios behind), then reads cold once; then the warm rounds, paths interleaved.
    if targets.copied():
        for key in READ_PATHS:
            targets.drop(key)
            measure_row("sequential, cold once copied", key, seq_read)
            if key == "lazy":
                folios["lazy, once copied"] = page_cache_folios.describe(str(paths[key]))
        measure_interleaved(COPIED_SEQ, seq_read)
        for block, count in RANDOM_READS.items():
            one = functools.partial(_random, block, count)
            for key in READ_PATHS:
                targets.drop(key)
                one(paths[key])
            measure_interleaved(f"random {block // 1024} KiB, {COPIED_WARM}", one)
    return ReadMatrix(list(rows.values()), folios)


def _lowerdirs(mounts: Sequence[MountSpec]) -> list[Path]:
    for m in mounts:
        for opt in m.options:
            if opt.startswith("lowerdir="):
                return [Path(d) for d in opt.removeprefix("lowerdir=").split(":")]
    return [Path(m.source) for m in mounts if m.type in ("bind", "rbind")]


def fuse_reads(
    workdir: Path,
    reg: NsRegistry,
    ref: str,
    image: images.Image,
    big: HostFile,
    inflated_bytes: int | None = None,
) -> ReadMatrix:
    """The read matrix on ``big`` (see :func:`read_throughput`) with a fresh daemon whose
    background fetch is off (so the first read is on demand only). The baseline image is
    imported from its OCI layout into the overlayfs snapshotter of the same containerd. ``inflated_bytes`` sets the daemon's
    ``inflated_cache_max_bytes`` (None: its default; 0 turns the inflated tier off)."""
    rel = big.image_path.lstrip("/")
    with lazy_stack(
        containerd_base(workdir, "lazy-reads"),
        reg,
        background_fetch=False,
        inflated_bytes=inflated_bytes,
    ) as (daemon, ctd):
        ctd.cri().pull_image(ref)
        # The baseline image comes from its OCI layout (`ctr images import`): pulling it here
        # failed in three of five runs (containerd 1.6 unpack: UtimesNanoAt ENOENT in the
        # /usr/share layer with the link limit lifted; a 300 s timeout through it).
        archive = workdir / "image.tar"
        subprocess.run(["tar", "-C", str(image.layout), "-cf", str(archive), "."], check=True)
        try:
            ctd.ctr(
                "images",
                "import",
                "--snapshotter",
                "overlayfs",
                "--base-name",
                f"{reg.host}/{REPOSITORY}",
                str(archive),
                timeout=900,
            )
        finally:
            archive.unlink(missing_ok=True)
        lazy = ContainerdSnapshots(ctd.address, PROXY_NAME, "k8s.io")
        ovl = ContainerdSnapshots(ctd.address, "overlayfs", "default")
        key = "bench-read-view"
        try:
            lazy_mounts = lazy.view(key, parent=image.chain_ids[-1])
            ovl_mounts = ovl.view(key, parent=image.chain_ids[-1])
            layer_dir = next(d for d in _lowerdirs(lazy_mounts) if (d / rel).exists())
            with (
                mounted(lazy_mounts, workdir / "lazy-view") as lazy_root,
                mounted(ovl_mounts, workdir / "ovl-view") as ovl_root,
            ):
                targets = ReadTargets(
                    {
                        "lazy": lazy_root / rel,
                        "fuse": layer_dir / rel,
                        "ovl": ovl_root / rel,
                        "local": big.host_path,
                    },
                    layer_dir / ".sociable" / "status.json",
                    daemon.root / "passthrough",
                )
                print(f"  read targets: {targets.paths}")
                matrix = read_throughput(targets)
                status = json.loads((daemon.root / "status.json").read_text())
                print(f"  passthrough: {status.get('passthrough')}")
                shutil.copyfile(daemon.log, WORKDIR / "daemon-reads.log")
                return matrix
        finally:
            for client in (lazy, ovl):
                with contextlib.suppress(Exception):
                    client.remove(key)
                client.close()


# ---------------------------------------------------------------------------------------------
# Report


def machine_facts() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    ctd = subprocess.run(["containerd", "--version"], capture_output=True, text=True).stdout.strip()
    return (
        f"{os.cpu_count()} vCPU ({cpu}), {mem:.0f} GiB RAM, Linux {platform.release()}, "
        f"Python {platform.python_version()}, {ctd}"
    )


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base > 0 else "n/a"


def _verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def goal_lines(runs: Sequence[Run], reads: Sequence[ReadResult]) -> list[str]:
    """The lazy-pull goals against this run's numbers."""
    by = {(r.name, r.workload): r for r in runs}
    out = ["Goals:", ""]
    for workload, goal, text in (
        ("small", 0.08, "small workload"),
        ("all", 0.7, "read-every-file"),
    ):
        base, lazy = by.get(("overlayfs (full pull)", workload)), by.get(("lazy, cold", workload))
        if base and lazy:
            ratio = lazy.total_s / base.total_s
            out.append(
                f"- {text} at most {goal}x of the full pull: {ratio:.3f}x, "
                f"{_verdict(ratio <= goal)}"
            )
    warm = warm_goal_line(reads)
    if warm:
        out.append(warm)
    return out


WARM_GOAL_PREFIX = "- warm reads at least 0.9x of local disk"


def warm_goal_line(reads: Sequence[ReadResult]) -> str:
    """The warm-read goal against the last warm pass of each read kind (empty when no
    reads were measured): vs the plain local file, and vs containerd's overlayfs view."""
    last: dict[str, ReadResult] = {}
    for rr in reads:
        if "warm" in rr.mode and rr.lazy_mb_s and rr.local_mb_s:
            last[rr.mode.split(",")[0]] = rr  # the last pass of each kind
    if not last:
        return ""
    worst = min(last.values(), key=lambda rr: rr.lazy_mb_s / rr.local_mb_s)
    ratio = worst.lazy_mb_s / worst.local_mb_s
    text = f"{WARM_GOAL_PREFIX}: worst {ratio:.2f}x ({worst.mode}), {_verdict(ratio >= 0.9)}"
    ovl = [rr for rr in last.values() if rr.mb_s.get("ovl")]
    if ovl:
        worst_ovl = min(ovl, key=lambda rr: rr.lazy_mb_s / (rr.mb_s["ovl"] or 1.0))
        ratio_ovl = worst_ovl.lazy_mb_s / (worst_ovl.mb_s["ovl"] or 1.0)
        text += (
            f"; against containerd's overlayfs view (what a container of the fully pulled "
            f"image reads through) worst {ratio_ovl:.2f}x ({worst_ovl.mode}), "
            f"{_verdict(ratio_ovl >= 0.9)}"
        )
    return text


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


READS_HEADING = "FUSE reads of "
READS_NOTES = "Reading the FUSE-read numbers"
"""Hand-written analysis after the generated read part; ``--reads-only --write-docs`` keeps it."""


def render_reads(
    reads: Sequence[ReadResult], big: HostFile, command: str, folios: dict[str, str] | None = None
) -> list[str]:
    """The FUSE-read part of the section (it starts with :data:`READS_HEADING`)."""
    if not reads:
        return []
    lines = [
        f"{READS_HEADING}`{big.image_path}` ({big.size / 1e6:.0f} MB). Command: `{command}` "
        "(root). Columns: **lazy view** = the lazy snapshot's read-only overlayfs view (what a "
        "container of the lazily pulled image reads through; the layer is a FUSE lower); "
        "**FUSE** = the same file directly on the FUSE layer; **overlayfs view** = containerd's "
        "overlayfs snapshotter view of the same image unpacked in full (imported from its OCI "
        "layout; local-disk lowers: what a container of a normal pull reads through, the fair "
        "baseline); **local** = the plain "
        "file on ext4. Cold = page cache dropped for the file (`POSIX_FADV_DONTNEED`, which "
        "reaches the FUSE pages through overlayfs too, and for the file's passthrough copy); "
        "lazy cold reads come from the daemon's local caches (compressed span cache and the "
        "inflated-span tier) after the first read fetched the spans, or, once the file was "
        "copied for FUSE passthrough after that read, from the copy on local disk (daemon MB "
        "0). Each path runs its passes back to back, every pass opens and closes "
        "the file. Warm steady state = the best of passes 3-5 (shared VM); once copied, the "
        f"warm rows are {COPIED_ROUNDS} rounds over every path in turn (the order rotating), "
        "each path's best round. Daemon MB = bytes "
        "the daemon answered while the lazy view and the FUSE path were measured (0: all from "
        "the page cache). This scenario runs a fresh daemon with "
        "`background_fetch = false`, so the first read is fetched on demand only. MB/s are of "
        "file bytes; the link carries gzip, so a first read can beat the link.",
        "",
        "| read | lazy view MB/s | FUSE MB/s | overlayfs view MB/s | local MB/s | daemon MB (lazy / FUSE) "
        "| lazy / overlayfs | lazy / local |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rr in reads:
        m = rr.mb_s
        daemon = " / ".join(
            f"{rr.daemon_bytes[k] / 1e6:.1f}" if k in rr.daemon_bytes else "n/a"
            for k in ("lazy", "fuse")
        )
        lines.append(
            f"| {rr.mode} | {_mb(m['lazy'])} | {_mb(m['fuse'])} | {_mb(m['ovl'])} | "
            f"{_mb(m['local'])} | {daemon} | {_ratio(rr.lazy_mb_s, m['ovl'] or 0.0)} | "
            f"{_ratio(rr.lazy_mb_s, rr.local_mb_s)} |"
        )
    if folios:
        lines += [
            "",
            "Page-cache folios holding the file after its sequential passes "
            "(`tests.bench.page_cache_folios`):",
            "",
            *(f"- {key}: {text}" for key, text in folios.items()),
        ]
    warm = warm_goal_line(reads)
    if warm:
        lines += ["", "Warm-read goal:", "", warm]
    return lines


COUNTS_HEADING = "FUSE requests per file read"
"""The request-count part of the section starts with this (``--counts-only --write-docs``
replaces only it)."""


def _per_file(n: int, files: int) -> str:
    return f"{n / files:.2f}" if files else "n/a"


def render_counts(
    runs: Sequence[Run],
    command: str,
    *,
    background_fetch: bool = True,
    load: tuple[float, float] | None = None,
) -> list[str]:
    """The request-count part of the section (it starts with :data:`COUNTS_HEADING`): per lazy
    run, FUSE requests per file read by handler, then the daemon's CPU time. ``load``: the
    1-minute load average at the start and the end of the runs."""
    rows = [r for r in runs if r.daemon is not None]
    if not rows:
        return []
    when = time.strftime("%Y-%m-%d", time.gmtime())
    load_text = (
        f" Load average (1 min) {load[0]:.1f} at the start and {load[1]:.1f} at the end: "
        + ("CPU times are inflated by other work on the machine." if max(load) >= 1.5 else "quiet.")
        if load
        else ""
    )
    ops = [
        op
        for op in OP_COLUMNS
        if op in ALWAYS_SHOWN or any(r.daemon and r.daemon.requests.get(op) for r in rows)
    ]
    lines = [
        f"{COUNTS_HEADING} in a container of the lazily pulled image (through its overlayfs "
        f"view; FUSE lowers), by handler. Command: `{command}` (root). Counted by the daemon "
        "(`fuseOps` in its `status.json`) from before the pull to after the workload, so the "
        "pull and the container's start are included; divided by the files the workload read "
        "(`stdlib` = every file of the Python stdlib layer, `small` = 20 files, `all` = every "
        "file). `readdir` answers the kernel's READDIRPLUS; `forget` counts FORGET and "
        "BATCH_FORGET requests. Background fetch "
        + ("on (the daemon's default)." if background_fetch else "off.")
        + " Request counts follow the workload (READs also the read-ahead window; FORGETs "
        "memory pressure), not the machine's load; CPU times follow the load too.",
        "",
        "| scenario | workload | files | " + " | ".join(ops) + " | all requests / file |",
        "|---|---|---:|" + "---:|" * (len(ops) + 1),
    ]
    for r in rows:
        d = r.daemon
        assert d is not None
        cells = " | ".join(_per_file(d.requests.get(op, 0), d.files) for op in ops)
        lines.append(
            f"| {r.name} | {r.workload} | {d.files} | {cells} | "
            f"{_per_file(d.total_requests, d.files)} |"
        )
    lines += [
        "",
        "Daemon CPU for the same runs: the process's user + sys seconds (`/proc/<pid>/stat`; "
        "every thread: the trio thread, inflation and cache threads, gRPC) during the pull "
        "(the index, and what of the zTOCs, layer trees and mounts was done before PullImage "
        "returned: the mounts are deferred, the rest counts in the workload) and during the "
        "workload (ms / file: of the "
        "workload); of the workload's, the trio thread's (the daemon's main thread: it serves "
        "the FUSE requests, the server's work around them included, and runs every other trio "
        "task) and, of that, the time inside the handlers; then the time inside each handler "
        "in microseconds per request (a read counts only its own steps, not the time it "
        "waited). Measured "
        f"{when} on {os.cpu_count()} vCPUs, Linux {platform.release()}.{load_text}",
        "",
        "| scenario | workload | pull CPU s | workload CPU s | ms / file | trio thread s "
        "| in handlers s | " + " | ".join(f"{op} µs" for op in ops) + " |",
        "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(ops),
    ]
    for r in rows:
        d = r.daemon
        assert d is not None
        per_req = " | ".join(
            f"{1e6 * d.handler_cpu_s.get(op, 0.0) / d.requests[op]:.0f}"
            if d.requests.get(op)
            else "n/a"
            for op in ops
        )
        lines.append(
            f"| {r.name} | {r.workload} | {d.pull_cpu_s:.2f} | {d.workload_cpu_s:.2f} | "
            f"{1e3 * d.workload_cpu_s / d.files if d.files else 0.0:.2f} | "
            f"{d.workload_trio_cpu_s:.2f} | "
            f"{sum(d.handler_cpu_s.values()):.2f} | {per_req} |"
        )
    return lines


def render(
    args: argparse.Namespace,
    image: images.Image,
    small: Sequence[HostFile],
    runs: Sequence[Run],
    reads: Sequence[ReadResult],
    big: HostFile,
    command: str,
    folios: dict[str, str] | None = None,
    load: tuple[float, float] | None = None,
) -> str:
    compressed = sum(layer.size for layer in image.layers)
    base = {r.workload: r for r in runs if r.name.startswith("overlayfs")}
    lines = [
        SECTION,
        "",
        f"Command: `{command}` (root). Machine: {machine_facts()}. Registry: Debian "
        f"docker-registry in a network namespace behind a veth pair with a `tc` tbf limit of "
        f"{args.rate} each way. Image: {len(image.layers)} layers, "
        f"{compressed / 1e6:.0f} MB compressed (gzip -6; busybox, /usr/lib/x86_64-linux-gnu, "
        "/usr/bin, /usr/share, Python stdlib), indexed with `sociable convert` (4 MiB spans). "
        f"Small workload: `sha256sum` of {len(small)} files, "
        f"{sum(f.size for f in small) / 1e6:.1f} MB, checked. Read-all workload: "
        f"`{ALL_COMMAND}`, byte count checked against the overlayfs run. Time = from the start "
        "of the pull to the end of the workload. Bytes = received on the host end of the veth "
        "(TCP/IP overhead included). Blob GETs = from the registry access log (Range requests "
        "for lazy). Each scenario starts a fresh containerd; the warm run reuses the daemon "
        "(span cache) after RemoveImage and GC. Shared 2-core VM: numbers are noisy.",
        "",
        "| scenario | workload | pull s | workload s | total s | vs overlayfs | MB during pull "
        "| MB total | blob GETs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        ref = base.get(r.workload)
        lines.append(
            f"| {r.name} | {r.workload} | {r.pull_s:.1f} | {r.total_s - r.pull_s:.1f} | "
            f"{r.total_s:.1f} | {_ratio(r.total_s, ref.total_s) if ref else 'n/a'} | "
            f"{r.pull_rx_bytes / 1e6:.1f} | {r.rx_bytes / 1e6:.1f} | {r.blob_requests} |"
        )
    lines += ["", *goal_lines(runs, reads)]
    counts_part = render_counts(runs, command, load=load)
    if counts_part:
        lines += ["", *counts_part]
    reads_part = render_reads(reads, big, command, folios)
    if reads_part:
        lines += ["", *reads_part]
    return "\n".join(lines) + "\n"


HAND_WRITTEN = ("Re-measured", READS_NOTES, "### ")
"""Lines of the section from which on it is hand-written (earlier measurements, analysis,
findings): every ``--write-docs`` keeps them."""


def _notes(section: str) -> str:
    """The hand-written tail of a section (see :data:`HAND_WRITTEN`), or ""."""
    starts = [i for m in HAND_WRITTEN if (i := section.find("\n" + m)) >= 0]
    return section[min(starts) + 1 :].rstrip("\n") if starts else ""


def write_docs(section: str) -> None:
    """Replaces (or appends) the :data:`SECTION` of docs/benchmarks.md, keeping the others
    and the section's hand-written tail."""
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    start = text.find(SECTION + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(SECTION))
        old = text[start : end + 1 if end >= 0 else len(text)]
        notes = _notes(old)
        if notes:
            section = section.rstrip("\n") + "\n\n" + notes + "\n"
        if end >= 0:
            section += "\n"
        text = text[:start] + section + (text[end + 1 :] if end >= 0 else "")
    DOCS.write_text(text)


def write_docs_counts(counts_part: Sequence[str]) -> None:
    """Replaces only the request-count part of the :data:`SECTION` (from the paragraph
    starting with :data:`COUNTS_HEADING` to the FUSE-read part or the hand-written notes),
    or puts it before them. Raises :class:`BenchError` when the section is missing."""
    text = DOCS.read_text()
    start = text.find(SECTION + "\n")
    if start < 0:
        raise BenchError(f"{DOCS} has no {SECTION!r} section to update")
    end = text.find("\n## ", start + len(SECTION))
    end = len(text) if end < 0 else end + 1
    section = text[start:end]
    stops = [i for m in (READS_HEADING, *HAND_WRITTEN) if (i := section.find("\n" + m)) >= 0]
    stop = min(stops) + 1 if stops else len(section)
    cut = section.find("\n" + COUNTS_HEADING)
    cut = stop if cut < 0 or cut + 1 > stop else cut + 1
    head = section[:cut].rstrip("\n")
    tail = section[stop:].rstrip("\n")
    new_section = head + "\n\n" + "\n".join(counts_part) + "\n"
    if tail:
        new_section += "\n" + tail + "\n"
    if end < len(text):
        new_section += "\n"
    DOCS.write_text(text[:start] + new_section + text[end:])


def write_docs_reads(reads_part: Sequence[str], warm_goal: str) -> None:
    """Replaces only the FUSE-read part of the :data:`SECTION` (from the paragraph starting
    with :data:`READS_HEADING` to the end of the section, keeping a hand-written block that
    starts with :data:`READS_NOTES`) and the warm-read goal line of the pull part, keeping the
    pull table. Raises :class:`BenchError` when the section is missing.
    """
    text = DOCS.read_text()
    start = text.find(SECTION + "\n")
    if start < 0:
        raise BenchError(f"{DOCS} has no {SECTION!r} section to update")
    end = text.find("\n## ", start + len(SECTION))
    end = len(text) if end < 0 else end + 1
    section = text[start:end]
    cut = section.find("\n" + READS_HEADING)
    head = section if cut < 0 else section[: cut + 1]
    notes = _notes(section[max(cut, 0) :])
    if warm_goal:
        kept = [
            (warm_goal if line.startswith(WARM_GOAL_PREFIX) else line) for line in head.split("\n")
        ]
        head = "\n".join(kept)
    new_section = head.rstrip("\n") + "\n\n" + "\n".join(reads_part) + "\n"
    if notes:
        new_section += "\n" + notes + "\n"
    if end < len(text):
        new_section += "\n"
    DOCS.write_text(text[:start] + new_section + text[end:])


# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rate", default="200mbit", help="tc rate of the link (default 200mbit)")
    parser.add_argument("--skip-lazy", action="store_true", help="overlayfs baseline only")
    parser.add_argument("--skip-reads", action="store_true", help="no FUSE read throughput")
    parser.add_argument(
        "--skip-baseline",
        action="store_true",
        help="lazy runs only, no overlayfs full pull (no ratios; not with --write-docs)",
    )
    parser.add_argument(
        "--inflated-cache-max-bytes",
        type=int,
        default=None,
        help="the read daemon's inflated_cache_max_bytes (0 = tier off; default: its default)",
    )
    parser.add_argument(
        "--reads-only",
        action="store_true",
        help="only the FUSE read matrix (with --write-docs: only its part of the section)",
    )
    parser.add_argument(
        "--counts-only",
        action="store_true",
        help="only FUSE request counts and daemon CPU of lazy cold runs (of the small and "
        "stdlib workloads unless --workloads says), no tc limit (with --write-docs: only their "
        "part of the section)",
    )
    parser.add_argument(
        "--workloads",
        default="small,all",
        help="comma-separated: small, all, stdlib (default small,all)",
    )
    parser.add_argument(
        "--timeline", action="store_true", help="print the link's MB per second of each run"
    )
    parser.add_argument(
        "--daemon-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a [remote] setting (TOML) for every lazy daemon, e.g. passthrough=false",
    )
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args(argv)
    EXTRA_REMOTE_CONFIG.extend(args.daemon_config)
    if args.skip_baseline and args.write_docs:
        parser.error("--skip-baseline has no ratios to write: drop --write-docs")
    global TIMELINE
    TIMELINE = args.timeline
    if os.geteuid() != 0:
        print("bench_lazy needs root (namespaces, tc, containerd, mounts)", file=sys.stderr)
        return 2
    command = "python -m tests.bench.bench_lazy " + " ".join(argv or sys.argv[1:])
    # One run at a time: runs share WORKDIR and the network namespace, and a second run would
    # delete the first one's directories and namespace under it.
    WORKDIR.mkdir(parents=True, exist_ok=True)
    lock = (WORKDIR / ".lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"bench_lazy: another run holds {WORKDIR / '.lock'}; wait for it", file=sys.stderr)
        return 2

    files = [walk_files(s) for s in SOURCES]
    key = image_key(files)
    image = build_image(key)
    compressed = sum(layer.size for layer in image.layers)
    print(f"image {image.layout}: {len(image.layers)} layers, {compressed / 1e6:.0f} MB compressed")
    small = choose_small_files(files)
    expected = {f.image_path: sha256_file(f.host_path) for f in small}
    big = max((f for layer in files for f in layer), key=lambda f: f.size)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    commands = {"small": small_command(small), "all": ALL_COMMAND, "stdlib": STDLIB_COMMAND}
    n_files = {
        "small": len(small),
        "all": sum(len(layer) for layer in files) + busybox_files(),
        "stdlib": len(files[SOURCES.index(STDLIB)]),
    }
    if args.counts_only and "--workloads" not in (argv or sys.argv[1:]):
        workloads = ["small", "stdlib"]

    load_start = os.getloadavg()[0]
    runs: list[Run] = []
    reads: list[ReadResult] = []
    folios: dict[str, str] = {}
    run_dir = WORKDIR / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    with (
        open_netns(NS_NAME, NS_SUBNET) as ns,
        start_ns_registry(ns, WORKDIR / f"registry-{key}") as reg,
    ):
        ref = convert_and_push(image, reg, WORKDIR)
        if args.counts_only:
            for w in workloads:
                # Background fetch off: the daemon's CPU is then the read path's alone.
                runs += lazy_runs(
                    run_dir,
                    reg,
                    ref,
                    w,
                    commands[w],
                    n_files[w],
                    warm=False,
                    background_fetch=False,
                )
            workloads = []
        else:
            ns.limit(args.rate)
            print(f"link limited: {args.rate}\n{ns.qdiscs().strip()}")
        if args.reads_only:
            workloads = []
        for w in [] if args.skip_baseline else workloads:
            r = overlay_run(run_dir, reg, ref, w, commands[w])
            runs.append(r)
            if w == "small":
                check_small(r.output, expected)
        all_bytes = next((r.output.strip() for r in runs if r.workload == "all"), None)
        if not args.skip_lazy:
            for w in workloads:
                for r in lazy_runs(run_dir, reg, ref, w, commands[w], n_files[w]):
                    runs.append(r)
                    if w == "small":
                        check_small(r.output, expected)
                    elif all_bytes is not None and r.output.strip() != all_bytes:
                        raise BenchError(
                            f"{r.name}: read {r.output.strip()} bytes, overlayfs {all_bytes}"
                        )
            if not args.skip_reads and not args.counts_only:
                matrix = fuse_reads(run_dir, reg, ref, image, big, args.inflated_cache_max_bytes)
                reads, folios = matrix.rows, matrix.folios
    # The daemons' span caches and containerd roots (hundreds of MB); image and registry stay.
    shutil.rmtree(run_dir, ignore_errors=True)
    if args.counts_only:
        counts_part = render_counts(
            runs, command, background_fetch=False, load=(load_start, os.getloadavg()[0])
        )
        print()
        print("\n".join(counts_part))
        if args.write_docs:
            write_docs_counts(counts_part)
            print(f"wrote the request-count part of the {SECTION!r} section of {DOCS}")
        return 0
    if args.reads_only:
        reads_part = render_reads(reads, big, command, folios)
        print()
        print("\n".join(reads_part))
        if args.write_docs:
            write_docs_reads(reads_part, warm_goal_line(reads))
            print(f"wrote the FUSE-read part of the {SECTION!r} section of {DOCS}")
        return 0
    section = render(
        args, image, small, runs, reads, big, command, folios, (load_start, os.getloadavg()[0])
    )
    print()
    print(section)
    if args.write_docs:
        write_docs(section)
        print(f"wrote the {SECTION!r} section of {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
