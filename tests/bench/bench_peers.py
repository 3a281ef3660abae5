"""Peers: N nodes starting one image at once or one after another, peers off and on.

Run (root): ``python3 -m tests.bench.bench_peers [--nodes 4] [--rate 200mbit] [--image-mb 200]
[--workloads small,all] [--write-docs]``

Set-up (``tests.support.cluster``): ``--nodes`` network namespaces on a Linux bridge (node to
node links unlimited), each with its own containerd 1.6 (CRI, ``snapshotter = "sociable"``)
and ``sociable-snapshotter``; the registry (Debian's ``docker-registry``) in a namespace of its
own behind a ``tc`` tbf limit of ``--rate`` each way. The daemons run with the defaults plus
what the harness sets (root, socket, ``hosts_dir``, debug log) and, with peers on,
``[peers] enable`` with every node as a static member; ``[peers] chunk_bytes`` is
``--chunk-bytes`` (default: the daemon's default) and ``[remote] background_quiet_period_ms``
is ``--quiet-period-ms`` (default: the daemon's default, 10 s, so background fetch starts
during and after the workloads as it does in production).

The image: busybox, then one layer of real files from each of bench_lazy's sources
(``/usr/lib/x86_64-linux-gnu``, ``/usr/bin``, ``/usr/share``, the Python stdlib), each a
deterministic sample of its files (by a hash of the path, the same share of every source)
sized so the image is about ``--image-mb`` MB compressed (gzip -6). Built once under
``/var/tmp/sociable-bench/peers`` keyed by the inputs, indexed (``--span-bytes`` spans, every
layer) and pushed once with ``sociable convert`` into a registry storage directory that every
cluster's registry then serves.

Scenarios: for each workload (``small``: ``sha256sum`` of about 20 files spread over the
layers, checked against the host's files; ``all``: every regular file read, checked by the
total byte count), peers off and on, each as

- a simultaneous start: every node CRI ``PullImage`` and runs the workload container at the
  same moment (one thread per node); times from that moment;
- a rolling start: node 1 pulls and runs the workload and its background fetch completes
  (status shows every layer 100 % fetched), then nodes 2..N one after another, each waited
  for until it has every layer too; times from each node's own start.

Every scenario opens a fresh cluster (fresh daemon roots and caches, fresh containerd).
Reported per scenario: the time to the end of each node's workload (min, median, max, and
each node), the time until every layer was fetched, and what the registry sent from the
start until every node had every layer: the layers' blob body bytes from its access log and
everything its link carried (veth counter), as multiples of ONE node's full layer bytes (the
compressed layers). Also each node's ``bytesFrom`` (registry, peers) and its peer counters,
and the daemons' warnings, so a goal that is not met can be traced.

Prints a markdown section (machine, command, set-up, table, goal lines); ``--write-docs``
replaces the "Peers" section of ``docs/benchmarks.md`` with it. The per-node details go to
``/var/tmp/sociable-bench/peers/run/results.json`` and the cluster logs stay under
``/var/tmp/sociable-bench/peers/run/<scenario>/``.
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import hashlib
import json
import os
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from snapshotter.remote.status import status_report
from tests.bench.bench_lazy import (
    ALL_COMMAND,
    SHELL,
    SOURCES,
    BenchError,
    HostFile,
    check_small,
    choose_small_files,
    image_key,
    machine_facts,
    sha256_file,
    small_command,
    walk_files,
)
from tests.support import images
from tests.support.cluster import (
    K8S_NAMESPACE,
    Cluster,
    Node,
    PeerImage,
    RegistryMark,
    call_in_thread,
    missing_binaries,
    open_cluster,
)

REPO = Path(__file__).resolve().parents[2]
WORKDIR = Path("/var/tmp/sociable-bench/peers")
REPOSITORY = "bench/peers"
TAG = "v1"
DOCS = REPO / "docs" / "benchmarks.md"
SECTION = "## Peers"

DEFAULT_IMAGE_MB = 200
DEFAULT_SPAN_BYTES = 4 << 20
DEFAULT_CHUNK_BYTES = 16 << 20
"""``[peers] chunk_bytes``'s default."""
DEFAULT_QUIET_MS = 10000
"""``[remote] background_quiet_period_ms``'s default."""
RATIO_SAMPLE_BYTES = 16 << 20
"""Input bytes per source compressed to estimate its gzip ratio."""
WORKLOAD_TIMEOUT_S = 1800.0
FETCH_TIMEOUT_S = 900.0
POLL_S = 0.5
STATUS_SETTLE_S = 2.5
"""The daemon rewrites ``<root>/status.json`` (where ``bytesFrom`` and the peer counters are)
at most once a second: wait this long after the last fetch before reading them."""

SIMULTANEOUS_MAX = 1.3
"""Goal: a simultaneous start with peers costs the registry at most this many times the
layer bytes of one node."""
READ_ALL_MAX = 0.5
"""Goal: a simultaneous read-every-file start with peers takes at most this share of the time
without."""
ROLLING_MAX = 0.05
"""Goal: in a rolling start with peers, nodes 2..N cost the registry at most this share of
the layer bytes."""

STARTS = ("simultaneous", "rolling")


# ---------------------------------------------------------------------------------------------
# The image


@dataclass(frozen=True)
class BenchImage:
    """The benchmark image: its layout and, per source layer, the files it holds."""

    image: images.Image
    layers: list[list[HostFile]]
    busybox_bytes: int
    """Bytes of the busybox layer's regular files."""

    @property
    def layer_digests(self) -> list[str]:
        return [layer.digest for layer in self.image.layers]

    @property
    def layer_bytes(self) -> int:
        """Compressed bytes of all layers: what one node alone fetches to have every span."""
        return sum(layer.size for layer in self.image.layers)

    @property
    def file_bytes(self) -> int:
        """What reading every regular file of the image reads."""
        return self.busybox_bytes + sum(f.size for layer in self.layers for f in layer)

    @property
    def file_count(self) -> int:
        return sum(len(layer) for layer in self.layers)


def _unit(path: str) -> float:
    """A deterministic number in [0, 1) for ``path``: files below the sampling share are kept."""
    digest = hashlib.blake2b(path.encode(errors="surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def gzip_ratio(files: Sequence[HostFile]) -> float:
    """Compressed / uncompressed bytes of gzip -6 over a deterministic sample of ``files``
    (up to 1 MiB of each, in path-hash order, :data:`RATIO_SAMPLE_BYTES` in all)."""
    comp = zlib.compressobj(6)
    taken = out = 0
    for f in sorted(files, key=lambda f: _unit(f.image_path)):
        if taken >= RATIO_SAMPLE_BYTES:
            break
        try:
            with open(f.host_path, "rb") as fh:
                data = fh.read(1 << 20)
        except OSError:
            continue
        taken += len(data)
        out += len(comp.compress(data))
    out += len(comp.flush())
    return out / taken if taken else 1.0


def sample_share(files: Sequence[Sequence[HostFile]], target_bytes: int) -> float:
    """The share of every source's files (by :func:`_unit`) whose estimated compressed size
    adds up to ``target_bytes`` (1.0 when all of them do not reach it)."""
    weighted: list[tuple[float, float]] = []
    for layer in files:
        ratio = gzip_ratio(layer)
        weighted += [(_unit(f.image_path), f.size * ratio) for f in layer]
    weighted.sort()
    total = 0.0
    for unit, size in weighted:
        total += size
        if total >= target_bytes:
            return unit
    return 1.0


def _layer_entries(files: Sequence[HostFile], sizes: list[int]) -> Iterator[images.Entry]:
    """The layer's entries: parent directories, then each file read from the host (one at a
    time); appends each file's size to ``sizes``."""
    made: set[str] = set()
    for f in files:
        rel = f.image_path.lstrip("/")
        parts = rel.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in made:
                made.add(parent)
                yield images.Dir(path=parent)
        data = f.host_path.read_bytes()
        sizes.append(len(data))
        mode = stat.S_IMODE(f.host_path.stat().st_mode) | 0o444
        yield images.File(path=rel, data=data, mode=mode)


def _busybox_bytes() -> int:
    return sum(len(e.data) for e in images.busybox_layer() if isinstance(e, images.File))


FILES_JSON = "files.json"


def build_image(image_mb: int) -> BenchImage:
    """The benchmark image (see the module doc), cached under :data:`WORKDIR` by a key of
    every candidate file (path, size, mtime), busybox and ``image_mb``."""
    candidates = [walk_files(s) for s in SOURCES]
    key = hashlib.sha256(f"bench-peers-v1:{image_key(candidates)}:{image_mb}".encode())
    final = WORKDIR / f"image-{key.hexdigest()[:16]}"
    if not (final / "index.json").exists():
        WORKDIR.mkdir(parents=True, exist_ok=True)
        share = sample_share(candidates, image_mb * 1_000_000)
        chosen = [[f for f in layer if _unit(f.image_path) < share] for layer in candidates]
        print(
            f"building the image layout in {final} (once): {share:.1%} of each source's files, "
            f"{sum(len(c) for c in chosen)} files"
        )
        tmp = Path(tempfile.mkdtemp(dir=WORKDIR, prefix=".image-"))
        started = time.monotonic()
        try:
            blobs = tmp / "blobs" / "sha256"
            layers = [images.write_layer(images.busybox_layer(), blobs)]
            record: list[list[tuple[str, str, int]]] = []
            for files in chosen:
                sizes: list[int] = []
                layers.append(images.write_layer(_layer_entries(files, sizes), blobs))
                record.append(
                    [(f.image_path, str(f.host_path), n) for f, n in zip(files, sizes, strict=True)]
                )
            images.write_image_layout(tmp, layers, tag=TAG, cmd=("/bin/sh",))
            (tmp / FILES_JSON).write_text(json.dumps(record))
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        print(f"  built in {time.monotonic() - started:.0f} s")
    record = json.loads((final / FILES_JSON).read_text())
    layers_files = [[HostFile(p, Path(h), n) for p, h, n in layer] for layer in record]
    return BenchImage(images._image_from_layout(final, TAG), layers_files, _busybox_bytes())


# ---------------------------------------------------------------------------------------------
# Workloads


@dataclass(frozen=True)
class Workload:
    """A command the container runs and the check of its output (raises BenchError)."""

    name: str
    command: str
    check: Callable[[str], None]
    files: int
    """Files it reads (0: every file)."""


def make_workloads(image: BenchImage) -> dict[str, Workload]:
    small = choose_small_files(image.layers)
    expected = {f.image_path: sha256_file(f.host_path) for f in small}
    total = image.file_bytes

    def check_all(output: str) -> None:
        if output.strip() != str(total):
            raise BenchError(f"all workload: read {output.strip()} bytes, the image has {total}")

    return {
        "small": Workload(
            "small",
            small_command(small),
            functools.partial(check_small, expected=expected),
            len(small),
        ),
        "all": Workload("all", ALL_COMMAND, check_all, 0),
    }


# ---------------------------------------------------------------------------------------------
# Scenarios


@dataclass
class NodeResult:
    """One node in one scenario. Times in seconds from the scenario's start (simultaneous)
    or from the node's own start (rolling)."""

    index: int
    pull_s: float = 0.0
    end_s: float = 0.0
    fetched_s: float | None = None
    bytes_from: dict[str, int] = field(default_factory=dict)
    peer_fetch: dict[str, object] = field(default_factory=dict)
    peer_serve: dict[str, object] = field(default_factory=dict)
    members: list[dict[str, object]] = field(default_factory=list)
    events: dict[str, int] = field(default_factory=dict)
    registry_layer_bytes: int | None = None
    """Rolling: the registry's layer bytes during this node's turn."""


@dataclass
class Scenario:
    workload: str
    peers: bool
    start: str
    unlimited: bool = False
    """The control run: the registry's link without a limit (what the CPU alone allows)."""
    nodes: list[NodeResult] = field(default_factory=list)
    layer_bytes: int = 0
    wire_bytes: int = 0
    blob_gets: int = 0
    later_layer_bytes: int | None = None
    """Rolling: the registry's layer bytes while nodes 2..N started."""
    later_wire_bytes: int | None = None
    cpu_busy: float | None = None
    """The machine's CPU busy share while workloads ran (all CPUs, other processes too)."""
    cpu_seconds: float | None = None
    """CPU time the machine spent while workloads ran (all CPUs, other processes too)."""
    error: str = ""

    @property
    def start_label(self) -> str:
        return f"{self.start}{', registry link unlimited' if self.unlimited else ''}"

    @property
    def label(self) -> str:
        return f"{self.workload}, peers {'on' if self.peers else 'off'}, {self.start_label}"

    @property
    def dirname(self) -> str:
        tail = "-nolimit" if self.unlimited else ""
        return f"{self.workload}-{'on' if self.peers else 'off'}-{self.start[:3]}{tail}"

    @property
    def ends(self) -> list[float]:
        return [n.end_s for n in self.nodes]


def layer_records(node: Node) -> list[dict[str, object]]:
    """The node's lazily mounted layers as ``status`` reports them (in this process: no
    command per poll)."""
    out = []
    for line in status_report(node.daemon.root).lines:
        doc = json.loads(line)
        if isinstance(doc, dict) and "fuseDir" in doc and "restoreFailed" not in doc:
            out.append(doc)
    return out


def fully_fetched(node: Node, count: int) -> bool:
    layers = layer_records(node)
    return len(layers) >= count and all(r.get("fetchedPercent") == 100 for r in layers)


def wait_fetched(nodes: Sequence[Node], count: int, t0: float) -> dict[int, float]:
    """Waits until every node has ``count`` layers 100 % fetched; returns, per node index, the
    seconds from ``t0`` when it was first seen so. Raises BenchError after
    :data:`FETCH_TIMEOUT_S`."""
    done: dict[int, float] = {}
    deadline = time.monotonic() + FETCH_TIMEOUT_S
    while True:
        for n in nodes:
            if n.index not in done and fully_fetched(n, count):
                done[n.index] = time.monotonic() - t0
        if len(done) == len(nodes):
            return done
        if time.monotonic() > deadline:
            late = [n for n in nodes if n.index not in done]
            brief = {
                n.index: [
                    (r.get("fetchedPercent"), r.get("lastFetchError")) for r in layer_records(n)
                ]
                for n in late
            }
            raise BenchError(f"layers not fully fetched in {FETCH_TIMEOUT_S:.0f} s: {brief}")
        time.sleep(POLL_S)


NORMAL_OWNED = "this node owns the chunk"
NORMAL_SERVING = "serving a peer, upstream only"


def _event_key(doc: dict[str, object]) -> str | None:
    """What a daemon log record counts as: warnings and errors by message head, peer state
    changes, and sources that failed a fetch."""
    msg = str(doc.get("msg", ""))
    level = doc.get("level")
    if msg in ("peer down", "peer up"):
        return msg
    if msg.startswith("source ") and " failed for " in msg:
        if msg.endswith((NORMAL_OWNED, NORMAL_SERVING)):
            return None  # the chain's ordinary way to the registry (counted in `owned_here`)
        reasons = msg.partition("no owner served it (")[2].rstrip(")").split("; ")
        if reasons and all(r.endswith(": not held") for r in reasons):
            # this node fetches the chunk after asking the owners ranked after it
            return "peers: no later owner held the range"
        reason = msg.rsplit(": ", 1)[-1][:60]
        return msg.split(" failed for ")[0] + f" failed: {reason}"
    if level in ("warning", "error", "critical"):
        return f"{level}: {msg.split(':')[0][:80]}"
    return None


def collect(node: Node, result: NodeResult) -> None:
    """Fills ``result`` with the node's bytes by source, peer counters and log events."""
    result.bytes_from = {}
    for layer in layer_records(node):
        sources = layer.get("bytesFrom")
        if isinstance(sources, dict):
            for source, n in sources.items():
                result.bytes_from[str(source)] = result.bytes_from.get(str(source), 0) + int(n)
    peers = node.peer_status()
    fetch, serve, members = peers.get("fetch"), peers.get("serve"), peers.get("members")
    result.peer_fetch = dict(fetch) if isinstance(fetch, dict) else {}
    result.peer_serve = dict(serve) if isinstance(serve, dict) else {}
    result.members = (
        [m for m in members if isinstance(m, dict)] if isinstance(members, list) else []
    )
    counts: Counter[str] = Counter()
    for doc in node.daemon_events():
        k = _event_key(doc)
        if k:
            counts[k] += 1
    result.events = dict(counts)


def run_workload(node: Node, ref: str, workload: Workload, name: str) -> tuple[float, float]:
    """CRI PullImage, then the workload's container; returns the monotonic times the pull and
    the workload ended. Raises BenchError (or CtrError) when the output is wrong."""
    assert node.containerd is not None
    node.cri.pull_image(ref)
    pulled = time.monotonic()
    cid = f"bench-{node.tag}-n{node.index}-{name}"
    out = node.containerd.run(
        ref, cid, SHELL, "-c", workload.command, namespace=K8S_NAMESPACE, timeout=WORKLOAD_TIMEOUT_S
    )
    ended = time.monotonic()
    try:
        workload.check(out)
    except BenchError as e:
        raise BenchError(f"node {node.index}: {e}") from e
    return pulled, ended


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from ``/proc/stat`` (idle and iowait are not busy)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is in user)
    return total - fields[3] - fields[4], total


class CpuMeter:
    """The machine's CPU busy share over the windows between :meth:`start` and :meth:`stop`."""

    def __init__(self) -> None:
        self.busy = self.total = 0
        self._at = (0, 0)

    def start(self) -> None:
        self._at = cpu_times()

    def stop(self) -> None:
        busy, total = cpu_times()
        self.busy += busy - self._at[0]
        self.total += total - self._at[1]

    @property
    def share(self) -> float | None:
        return self.busy / self.total if self.total else None

    @property
    def seconds(self) -> float:
        """Busy CPU seconds (all CPUs)."""
        return self.busy / os.sysconf("SC_CLK_TCK")


def simultaneous(
    cluster: Cluster, ref: str, image: BenchImage, workload: Workload, sc: Scenario
) -> None:
    nodes = cluster.nodes
    for n in nodes:
        n.cri  # noqa: B018 - the CRI client is made before the start, not in the race
    barrier = threading.Barrier(len(nodes) + 1)

    def one(node: Node) -> tuple[float, float]:
        barrier.wait()
        return run_workload(node, ref, workload, "sim")

    mark = cluster.registry.mark()
    futures = [call_in_thread(functools.partial(one, n), f"node-{n.index}") for n in nodes]
    cpu = CpuMeter()
    barrier.wait()
    t0 = time.monotonic()
    cpu.start()
    for n, fut in zip(nodes, futures, strict=True):
        pulled, ended = fut.result(timeout=WORKLOAD_TIMEOUT_S)
        sc.nodes.append(NodeResult(n.index, pull_s=pulled - t0, end_s=ended - t0))
    cpu.stop()
    sc.cpu_busy, sc.cpu_seconds = cpu.share, cpu.seconds
    fetched = wait_fetched(nodes, len(image.layer_digests), t0)
    _traffic(cluster, image, mark, sc)
    for n, r in zip(nodes, sc.nodes, strict=True):
        r.fetched_s = fetched[n.index]


def rolling(
    cluster: Cluster, ref: str, image: BenchImage, workload: Workload, sc: Scenario
) -> None:
    first_mark = later_mark = cluster.registry.mark()
    cpu = CpuMeter()
    for i, n in enumerate(cluster.nodes):
        n.cri  # noqa: B018
        mark = cluster.registry.mark()
        if i == 1:
            later_mark = mark
        t0 = time.monotonic()
        cpu.start()
        pulled, ended = run_workload(n, ref, workload, "roll")
        cpu.stop()
        sc.cpu_busy, sc.cpu_seconds = cpu.share, cpu.seconds
        fetched = wait_fetched([n], len(image.layer_digests), t0)
        r = NodeResult(n.index, pull_s=pulled - t0, end_s=ended - t0, fetched_s=fetched[n.index])
        r.registry_layer_bytes = cluster.registry.since(mark).layer_bytes(image.layer_digests)
        sc.nodes.append(r)
        print(
            f"    node {n.index + 1}: workload end {r.end_s:.1f} s, fetched {r.fetched_s:.1f} s, "
            f"registry layer bytes {r.registry_layer_bytes / 1e6:.1f} MB"
        )
    _traffic(cluster, image, first_mark, sc)
    if len(cluster.nodes) > 1:
        later = cluster.registry.since(later_mark)
        sc.later_layer_bytes = later.layer_bytes(image.layer_digests)
        sc.later_wire_bytes = later.sent_bytes


def _traffic(cluster: Cluster, image: BenchImage, mark: RegistryMark, sc: Scenario) -> None:
    traffic = cluster.registry.since(mark)
    sc.layer_bytes = traffic.layer_bytes(image.layer_digests)
    sc.wire_bytes = traffic.sent_bytes
    sc.blob_gets = traffic.blob_requests


def node_config(chunk_bytes: int, quiet_ms: int, peers: bool) -> Callable[[int, list[str]], str]:
    text = f"[remote]\nbackground_quiet_period_ms = {quiet_ms}\n"
    if peers:
        text += f"[peers]\nchunk_bytes = {chunk_bytes}\n"
    return lambda i, addresses: text


def run_scenario(
    args: argparse.Namespace,
    image: BenchImage,
    workload: Workload,
    sc: Scenario,
    storage: Path,
    run_dir: Path,
) -> None:
    """One scenario on a fresh cluster; pushes the image into ``storage`` the first time."""
    base = run_dir / sc.dirname
    rate = None if sc.unlimited else args.rate
    with open_cluster(
        base,
        args.nodes,
        registry_rate=rate,
        peers=sc.peers,
        node_config=node_config(args.chunk_bytes, args.quiet_period_ms, sc.peers),
        registry_storage=storage,
    ) as cluster:
        marker = storage.parent / f"pushed-{image.image.manifest_digest.split(':')[1][:16]}"
        if marker.exists():
            ref = f"{cluster.registry.host}/{REPOSITORY}:{TAG}"
        else:
            print(f"  indexing and pushing the image ({args.span_bytes} byte spans, once)")
            ref = cluster.push(
                PeerImage(image.image, {}),
                repository=REPOSITORY,
                convert_root=WORKDIR / "index-root",
                rate=rate,
                span_bytes=args.span_bytes,
            )
            marker.write_text(ref)
        started = time.monotonic()
        try:
            (simultaneous if sc.start == "simultaneous" else rolling)(
                cluster, ref, image, workload, sc
            )
        finally:
            time.sleep(STATUS_SETTLE_S)
            for n, r in zip(cluster.nodes, _results_for(cluster, sc), strict=True):
                try:
                    collect(n, r)
                except Exception as e:  # diagnostics only: the numbers are already taken
                    print(f"    node {n.index + 1}: status not collected: {e}")
        print(
            f"  {sc.label}: ends {_fmt_list(sc.ends)} s, registry layer "
            f"{_x(sc.layer_bytes, image.layer_bytes)} wire {_x(sc.wire_bytes, image.layer_bytes)}"
            f" ({time.monotonic() - started:.0f} s)"
        )
        for r in sc.nodes:
            print(
                f"    node {r.index + 1}: bytesFrom {r.bytes_from}, peer fetch {r.peer_fetch}, "
                f"serve {r.peer_serve}, events {r.events}"
            )


def _results_for(cluster: Cluster, sc: Scenario) -> list[NodeResult]:
    """One result per node (nodes that did not get one, e.g. after a failure, get an empty
    one so their status is still collected)."""
    have = {r.index for r in sc.nodes}
    for n in cluster.nodes:
        if n.index not in have:
            sc.nodes.append(NodeResult(n.index))
    sc.nodes.sort(key=lambda r: r.index)
    return sc.nodes


# ---------------------------------------------------------------------------------------------
# Report


def _x(value: int, base: int) -> str:
    return f"{value / 1e6:.1f} MB ({value / base:.2f}x)" if base else f"{value / 1e6:.1f} MB"


def _fmt_list(values: Sequence[float]) -> str:
    return " / ".join(f"{v:.1f}" for v in values)


def _verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _find(scenarios: Sequence[Scenario], workload: str, peers: bool, start: str) -> Scenario | None:
    for sc in scenarios:
        key = (sc.workload, sc.peers, sc.start, sc.unlimited)
        if key == (workload, peers, start, False) and not sc.error:
            return sc
    return None


def _pct(share: float | None) -> str:
    return "n/a" if share is None else f"{share:.0%}"


RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}


def rate_bytes_per_s(rate: str) -> float | None:
    """Bytes per second of a tc rate written as ``<number><unit>bit`` (None otherwise)."""
    for unit in sorted(RATE_UNITS, key=len, reverse=True):
        if rate.endswith(unit):
            try:
                return float(rate[: -len(unit)]) * RATE_UNITS[unit] / 8
            except ValueError:
                return None
    return None


def goal_lines(scenarios: Sequence[Scenario], image: BenchImage, rate: str) -> list[str]:
    one = image.layer_bytes
    out = ["Goals:", ""]
    for w in ("small", "all"):
        sc = _find(scenarios, w, True, "simultaneous")
        if sc:
            ratio = sc.layer_bytes / one
            out.append(
                f"- simultaneous cold start ({w}), peers on: registry layer bytes at most "
                f"{SIMULTANEOUS_MAX}x one node's: {ratio:.2f}x, {_verdict(ratio <= SIMULTANEOUS_MAX)}"
            )
    on, off = (
        _find(scenarios, "all", True, "simultaneous"),
        _find(scenarios, "all", False, "simultaneous"),
    )
    if on and off:
        ratio = max(on.ends) / max(off.ends)
        med = statistics.median(on.ends) / statistics.median(off.ends)
        out.append(
            f"- simultaneous read-every-file, peers on at most {READ_ALL_MAX}x the time of peers "
            f"off (until the last node's workload ended): {max(on.ends):.1f} s / "
            f"{max(off.ends):.1f} s = {ratio:.2f}x, {_verdict(ratio <= READ_ALL_MAX)} "
            f"(medians: {med:.2f}x)"
        )
        per_s = rate_bytes_per_s(rate)
        if per_s:
            out.append(
                f"  - the registry link alone needs at least {off.layer_bytes / per_s:.1f} s "
                f"(peers off) and {on.layer_bytes / per_s:.1f} s (peers on) for the layer bytes "
                f"sent; CPU busy {_pct(off.cpu_busy)} and {_pct(on.cpu_busy)} while the "
                "workloads ran"
            )
        ncpu = os.cpu_count() or 1
        if on.cpu_seconds and off.cpu_seconds:
            floor = on.cpu_seconds / ncpu
            goal_s = READ_ALL_MAX * max(off.ends)
            out.append(
                f"  - CPU time while the workloads ran (every process on the VM): "
                f"{off.cpu_seconds:.0f} CPU-s peers off, {on.cpu_seconds:.0f} CPU-s peers on; "
                f"{on.cpu_seconds:.0f} CPU-s take at least {floor:.1f} s on {ncpu} vCPUs, "
                f"{'more' if floor > goal_s else 'less'} than the goal's {goal_s:.1f} s"
            )
        control = next(
            (c for c in scenarios if c.unlimited and not c.error and c.workload == "all"), None
        )
        if control:
            out.append(
                f"  - control, peers off with the registry link unlimited (no network bound): "
                f"{max(control.ends):.1f} s until the last node's workload ended, CPU busy "
                f"{_pct(control.cpu_busy)}"
                + (f", {control.cpu_seconds:.0f} CPU-s" if control.cpu_seconds else "")
            )
        alone = _find(scenarios, "all", False, "rolling")
        if alone:
            out.append(
                f"  - one node alone (rolling, peers off, node 1) read every file in "
                f"{alone.nodes[0].end_s:.1f} s (CPU busy {_pct(alone.cpu_busy)} over the "
                "rolling nodes' workloads)"
            )
    for w in ("small", "all"):
        sc = _find(scenarios, w, True, "rolling")
        if sc and sc.later_layer_bytes is not None:
            ratio = sc.later_layer_bytes / one
            out.append(
                f"- rolling start ({w}), peers on: registry layer bytes of nodes 2..N at most "
                f"{ROLLING_MAX:.0%} of the layer bytes: {ratio:.1%}, {_verdict(ratio <= ROLLING_MAX)}"
            )
    return out


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


def render(
    args: argparse.Namespace,
    command: str,
    image: BenchImage,
    workloads: dict[str, Workload],
    scenarios: Sequence[Scenario],
    load: tuple[float, float],
) -> str:
    one = image.layer_bytes
    commit = (
        subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        or "unknown"
    )
    small_files = workloads["small"].files
    lines = [
        SECTION,
        "",
        f"Command: `{command}` (root). Machine: {machine_facts()}. Cluster "
        f"(`tests.support.cluster`): {args.nodes} nodes, each a network namespace with its own "
        "containerd (CRI) and sociable-snapshotter, on a Linux bridge (node to node links "
        "unlimited); the registry (Debian docker-registry) in its own namespace behind a `tc` "
        f"tbf limit of {args.rate} each way. Daemons: defaults plus the harness's (root, socket, "
        f"hosts_dir, debug log), `[remote] background_quiet_period_ms = {args.quiet_period_ms}`"
        f"{' (the default: background fetch starts 10 s after a layer mount or a read, as in production)' if args.quiet_period_ms == DEFAULT_QUIET_MS else ''}"
        f"; peers on: `[peers] enable`, every node a static member, `chunk_bytes = "
        f"{args.chunk_bytes}`, `owners` and the rest default. Image: {len(image.image.layers)} "
        f"layers, {one / 1e6:.0f} MB compressed (gzip -6), {image.file_count} files of "
        f"{image.file_bytes / 1e6:.0f} MB: busybox, then a sample of the files of "
        "/usr/lib/x86_64-linux-gnu, /usr/bin, /usr/share and the Python stdlib (the same "
        "share of each, by a hash of the path), indexed with `sociable convert` "
        f"({args.span_bytes >> 20} MiB spans, every layer). Workloads: `small` = `sha256sum` of "
        f"{small_files} files spread over the layers, checked; `all` = `{ALL_COMMAND}`, byte "
        "count checked. Simultaneous = every node CRI PullImage + the workload container at the "
        "same moment (threads), times from that moment; rolling = node 1 starts and its "
        "background fetch completes (status: every layer 100 % fetched), then nodes 2..N one "
        "after another, each until it has every layer, times from each node's own start. "
        "Each scenario runs on a fresh cluster (fresh daemons, caches and containerds). "
        "Registry bytes from the start until every node has every layer: layer = blob body "
        "bytes from the registry's access log, sent = everything its link carried (veth "
        f"counter); x = multiples of one node's full layer bytes ({one / 1e6:.1f} MB). "
        f"**{args.nodes} nodes share {os.cpu_count()} vCPUs**: reading every file is CPU-bound "
        "per node (FUSE requests, span verification and inflation in each daemon, `cat` in each "
        "container), so when all nodes read every file at once they share the CPU; the control "
        "run (peers off, the registry link unlimited) shows what the CPU alone allows. The VM "
        f"is shared with other test runs (load average "
        f"{load[0]:.1f} at the start, {load[1]:.1f} at the end), so the numbers are noisy. "
        f"Code: the working tree at {commit}.",
        "",
        "| workload | peers | start | workload end s (min / median / max) | per node s | "
        "all layers fetched s (max) | CPU busy | registry layer MB | registry sent MB | nodes "
        "2..N registry layer MB | bytesFrom registry / peers MB (all nodes) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for sc in scenarios:
        peers = "on" if sc.peers else "off"
        if sc.error:
            lines.append(
                f"| {sc.workload} | {peers} | {sc.start_label} | failed: {sc.error} ||||||||"
            )
            continue
        ends = sc.ends
        fetched = [n.fetched_s for n in sc.nodes if n.fetched_s is not None]
        reg = sum(n.bytes_from.get("registry", 0) for n in sc.nodes)
        from_peers = sum(n.bytes_from.get("peers", 0) for n in sc.nodes)
        later = (
            _x(sc.later_layer_bytes, one).replace(" MB", "")
            if sc.later_layer_bytes is not None
            else "n/a"
        )
        lines.append(
            f"| {sc.workload} | {peers} | {sc.start_label} | {min(ends):.1f} / "
            f"{statistics.median(ends):.1f} / {max(ends):.1f} | {_fmt_list(ends)} | "
            f"{max(fetched):.1f} | {_pct(sc.cpu_busy)} | "
            f"{_x(sc.layer_bytes, one).replace(' MB', '')} | "
            f"{_x(sc.wire_bytes, one).replace(' MB', '')} | {later} | {_mb(reg)} / "
            f"{_mb(from_peers)} |"
        )
    lines.append(
        "\nCPU busy = the machine's CPU busy share while the workloads ran (both vCPUs, every "
        "process: daemons, containerd, containers, registry, and whatever else ran on the VM)."
    )
    lines += ["", *goal_lines(scenarios, image, args.rate)]
    lines += ["", *peer_lines(scenarios)]
    return "\n".join(lines) + "\n"


def peer_lines(scenarios: Sequence[Scenario]) -> list[str]:
    """Per peers-on scenario, the nodes' peer counters summed and the daemons' log events."""
    out = [
        "Peer counters, all nodes summed (`status`: fetch = requests to owners, failed, 503s, "
        "chunks this node owned itself; serve = answers with bytes, MB, fetched from the "
        "registry for a peer, 404s, 503s), and the daemons' warnings and peer events:",
        "",
        "| scenario | fetch requests / failed / 503 / owned here | served / MB / fetched for "
        "peers / 404 / 503 | log events |",
        "|---|---:|---:|---|",
    ]
    for sc in scenarios:
        if not sc.peers or not sc.nodes:
            continue

        def total(part: str, key: str, sc: Scenario = sc) -> int:
            return sum(int(getattr(n, part).get(key, 0) or 0) for n in sc.nodes)

        events: Counter[str] = Counter()
        for n in sc.nodes:
            events.update(n.events)
        fetch = " / ".join(
            str(total("peer_fetch", k)) for k in ("requests", "failures", "declined", "owned_here")
        )
        serve = (
            f"{total('peer_serve', 'served')} / {total('peer_serve', 'bytes_served') / 1e6:.1f} / "
            f"{total('peer_serve', 'fetched_for_peers')} / {total('peer_serve', 'not_found')} / "
            f"{total('peer_serve', 'unavailable')}"
        )
        ev = ", ".join(f"{k}: {v}" for k, v in sorted(events.items())) or "none"
        out.append(f"| {sc.label} | {fetch} | {serve} | {ev} |")
    return out


def write_docs(section: str, heading: str = SECTION) -> None:
    """Replaces (or appends) the section `heading` (default :data:`SECTION`) of
    docs/benchmarks.md with `section`, keeping the others."""
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    start = text.find("\n" + heading + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        start += 1
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section + ("\n" + text[end + 1 :] if end >= 0 else "")
    DOCS.write_text(text)


# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--nodes", type=int, default=4, help="nodes (2-9, default 4)")
    parser.add_argument("--rate", default="200mbit", help="tc rate of the registry's link")
    parser.add_argument(
        "--image-mb", type=int, default=DEFAULT_IMAGE_MB, help="about this many MB compressed"
    )
    parser.add_argument(
        "--workloads", default="small,all", help="comma-separated: small, all (default both)"
    )
    parser.add_argument(
        "--starts", default=",".join(STARTS), help="comma-separated: simultaneous, rolling"
    )
    parser.add_argument("--peers", default="off,on", help="comma-separated: off, on")
    parser.add_argument(
        "--span-bytes", type=int, default=DEFAULT_SPAN_BYTES, help="zTOC span size (4 MiB)"
    )
    parser.add_argument(
        "--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES, help="[peers] chunk_bytes"
    )
    parser.add_argument(
        "--quiet-period-ms",
        type=int,
        default=DEFAULT_QUIET_MS,
        help="[remote] background_quiet_period_ms (default: the daemon's, 10000)",
    )
    parser.add_argument(
        "--no-control",
        dest="control",
        action="store_false",
        help="skip the control run (read-every-file at once, peers off, registry link unlimited)",
    )
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args(argv)
    workload_names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    starts = [s.strip() for s in args.starts.split(",") if s.strip()]
    peer_modes = [p.strip() for p in args.peers.split(",") if p.strip()]
    bad = (
        [w for w in workload_names if w not in ("small", "all")]
        + [s for s in starts if s not in STARTS]
        + [p for p in peer_modes if p not in ("off", "on")]
    )
    if bad or not 2 <= args.nodes <= 9 or args.image_mb < 1 or args.span_bytes < 1:
        print(f"bench_peers: bad arguments {bad or vars(args)}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("bench_peers needs root (namespaces, tc, containerd, mounts)", file=sys.stderr)
        return 2
    missing = missing_binaries()
    if missing:
        print(f"bench_peers: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    command = "python3 -m tests.bench.bench_peers " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    WORKDIR.mkdir(parents=True, exist_ok=True)
    lock = (WORKDIR / ".lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"bench_peers: another run holds {WORKDIR / '.lock'}; wait for it", file=sys.stderr)
        return 2

    image = build_image(args.image_mb)
    print(
        f"image {image.image.layout}: {len(image.image.layers)} layers, "
        f"{image.layer_bytes / 1e6:.0f} MB compressed, {image.file_count} files, "
        f"{image.file_bytes / 1e6:.0f} MB"
    )
    workloads = make_workloads(image)
    storage = (
        WORKDIR / f"registry-{image.image.manifest_digest[7:23]}-{args.span_bytes}" / "storage"
    )
    storage.mkdir(parents=True, exist_ok=True)
    run_dir = WORKDIR / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)

    scenarios: list[Scenario] = []
    started = time.monotonic()
    load_start = os.getloadavg()[0]
    plan = [Scenario(w, p == "on", s) for w in workload_names for p in peer_modes for s in starts]
    if args.control and "all" in workload_names and "simultaneous" in starts:
        plan.append(Scenario("all", False, "simultaneous", unlimited=True))
    for sc in plan:
        scenarios.append(sc)
        print(f"scenario {sc.label} ({time.monotonic() - started:.0f} s into the run)")
        try:
            run_scenario(args, image, workloads[sc.workload], sc, storage, run_dir)
        except Exception as e:  # recorded in the table; the other scenarios still run
            sc.error = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            print(f"  {sc.label} FAILED: {e}", file=sys.stderr)
    print(f"all scenarios in {time.monotonic() - started:.0f} s")
    (run_dir / "results.json").write_text(
        json.dumps([{**asdict(sc), "label": sc.label} for sc in scenarios], indent=1)
    )
    load = (load_start, os.getloadavg()[0])
    section = render(args, command, image, workloads, scenarios, load)
    print()
    print(section)
    if args.write_docs:
        write_docs(section)
        print(f"wrote the {SECTION!r} section of {DOCS}")
    return 1 if any(sc.error for sc in scenarios) else 0


if __name__ == "__main__":
    sys.exit(main())
