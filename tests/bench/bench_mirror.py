"""Registry mirror: a rolling start of an image without an index, the mirror off and on.

Run (root): ``python3 -m tests.bench.bench_mirror [--nodes 4] [--rate 200mbit]
[--image-mb 600] [--write-docs]``

Set-up (``tests.support.cluster``, ``open_cluster(..., peers=True, mirror=True)``):
``--nodes`` network namespaces on a Linux bridge (node to node links unlimited), each with its
own containerd 1.6 (CRI, ``snapshotter = "sociable"``) and ``sociable-snapshotter`` with peers
on (every node a static member) and the registry mirror reading that node's containerd; the
registry (Debian's ``docker-registry``) in a namespace of its own behind a ``tc`` tbf limit of
``--rate`` each way. The daemons are the same in both runs; only the nodes' ``hosts.toml``
differs.

The image: bench_peers' image (busybox, then a deterministic sample of the host's files from
bench_lazy's sources, about ``--image-mb`` MB compressed with gzip -6), pushed once with skopeo
and NO SOCI index (``Cluster.push_unindexed``) into a registry storage directory kept under
``/var/tmp/sociable-bench/mirror`` that every cluster's registry then serves. Without an index
every node's snapshotter declines the image and containerd pulls it the ordinary way, keeping
the layers in its content store.

One rolling start per run, each on a fresh cluster: node 1 CRI ``PullImage`` and runs a short
container (``sha256sum`` of about 20 files spread over the layers, checked against the host's
files), then node 2, 3, ... one after another, each once the one before has run its container.

- ``off``: the nodes' ``hosts.toml`` name the registry only;
- ``on``: before node 1 starts, every node's ``hosts.toml`` names its own mirror first
  (``sociable-snapshotter mirror configure``, ``Node.configure_mirror``), then the registry.

Reported per node: the pull time (CRI PullImage) and the container's time, the registry's
layer bytes during its turn, and its mirror counters at the end (``status.json``
``peers.mirror``: ``from_content`` = bytes this node's mirror served from its own containerd's
content store, to its own containerd or to another member; ``from_peers`` = bytes it served
its containerd from another member's store; ``not_found`` = its 404 answers, to its own
containerd and to other members' lookups). Per run: the registry's layer
bytes for the whole rollout (blob body bytes of the image's layers in its access log) as a
multiple of one pull (the image's compressed layer bytes), and what its link carried. The goal
line: with the mirror, the whole rollout costs the registry at most :data:`ROLLOUT_MAX` x
the layer bytes of one pull.

Prints a markdown section (machine, command, set-up, table, goal line); ``--write-docs``
replaces the "Registry mirror" section of ``docs/benchmarks.md`` with it (the other sections
are kept). The per-node details go to ``/var/tmp/sociable-bench/mirror/run/results.json`` and
the cluster logs stay under ``/var/tmp/sociable-bench/mirror/run/<run>/``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tests.bench.bench_lazy import SHELL, BenchError, machine_facts
from tests.bench.bench_peers import (
    DOCS,
    STATUS_SETTLE_S,
    BenchImage,
    Workload,
    build_image,
    make_workloads,
    rate_bytes_per_s,
    sample_share,
    write_docs,
)
from tests.support.cluster import (
    K8S_NAMESPACE,
    Cluster,
    Node,
    PeerImage,
    missing_binaries,
    open_cluster,
)
from tests.support.containerd import CriImageClient

REPO = Path(__file__).resolve().parents[2]
WORKDIR = Path("/var/tmp/sociable-bench/mirror")
REPOSITORY = "bench/mirror"
SECTION = "## Registry mirror"

DEFAULT_IMAGE_MB = 600
PULL_TIMEOUT_S = 900.0
"""CRI PullImage bound (the harness's default, 120 s, is too short for a large image on a
shared VM)."""
RUN_TIMEOUT_S = 300.0
ROLLOUT_MAX = 1.2
"""Goal: with the mirror, a rolling start of every node costs the registry at most this many
times the layer bytes of one pull."""
MIRROR_KEYS = ("from_content", "from_peers", "not_found")


# ---------------------------------------------------------------------------------------------
# Runs


@dataclass
class NodeRun:
    """One node's turn in a rolling start; times in seconds from its own start."""

    index: int
    pull_s: float = 0.0
    run_s: float = 0.0
    registry_layer_bytes: int = 0
    registry_blob_gets: int = 0
    mirror: dict[str, int] = field(default_factory=dict)
    """``status.json`` ``peers.mirror`` at the end of the rollout."""
    events: dict[str, int] = field(default_factory=dict)
    """The daemon's warnings and errors by message head."""


@dataclass
class Rollout:
    mirror: bool
    nodes: list[NodeRun] = field(default_factory=list)
    layer_bytes: int = 0
    """Registry layer bytes for the whole rollout."""
    wire_bytes: int = 0
    """Everything the registry's link carried during the rollout (veth counter)."""
    blob_gets: int = 0
    error: str = ""

    @property
    def label(self) -> str:
        return f"mirror {'on' if self.mirror else 'off'}"

    @property
    def dirname(self) -> str:
        return f"rolling-mirror-{'on' if self.mirror else 'off'}"


def mirror_counters(node: Node) -> dict[str, int]:
    """``peers.mirror`` of the node's status.json ({} before the mirror has one)."""
    stats = node.peer_status().get("mirror")
    return {str(k): int(v) for k, v in stats.items()} if isinstance(stats, dict) else {}


def log_events(node: Node) -> dict[str, int]:
    """The daemon's warning and error records, counted by the head of their message."""
    counts: Counter[str] = Counter()
    for doc in node.daemon_events():
        if doc.get("level") in ("warning", "error", "critical"):
            counts[f"{doc['level']}: {str(doc.get('msg', '')).split(':')[0][:80]}"] += 1
    return dict(counts)


def push_once(cluster: Cluster, image: BenchImage, storage: Path, rate: str) -> str:
    """The reference of the image in the cluster's registry; pushes it (no index, the link
    limit lifted meanwhile) the first time ``storage`` sees it."""
    marker = storage.parent / f"pushed-{image.image.manifest_digest.split(':')[1][:16]}"
    if not marker.exists():
        print("  pushing the image without an index (skopeo, once)")
        cluster.registry.unlimit()
        try:
            started = time.monotonic()
            cluster.push_unindexed(PeerImage(image.image, {}), repository=REPOSITORY)
            print(f"  pushed in {time.monotonic() - started:.0f} s")
        finally:
            cluster.registry.limit(rate)
        marker.write_text(REPOSITORY)
    return f"{cluster.registry.host}/{REPOSITORY}:{image.image.tag}"


def rolling(cluster: Cluster, ref: str, image: BenchImage, workload: Workload, ro: Rollout) -> None:
    """Node 1, then 2, ...: CRI PullImage and the workload container, one node at a time."""
    digests = [layer.digest for layer in image.image.layers]
    first = cluster.registry.mark()
    for n in cluster.nodes:
        assert n.containerd is not None
        cri = CriImageClient(n.containerd.channel(), timeout_s=PULL_TIMEOUT_S)
        mark = cluster.registry.mark()
        t0 = time.monotonic()
        cri.pull_image(ref)
        pulled = time.monotonic()
        out = n.containerd.run(
            ref,
            f"bench-{n.tag}-n{n.index}-mirror",
            SHELL,
            "-c",
            workload.command,
            namespace=K8S_NAMESPACE,
            timeout=RUN_TIMEOUT_S,
        )
        ended = time.monotonic()
        try:
            workload.check(out)
        except BenchError as e:
            raise BenchError(f"node {n.index + 1}: {e}") from e
        traffic = cluster.registry.since(mark)
        r = NodeRun(n.index, pull_s=pulled - t0, run_s=ended - pulled)
        r.registry_layer_bytes = traffic.layer_bytes(digests)
        r.registry_blob_gets = traffic.blob_requests
        ro.nodes.append(r)
        print(
            f"    node {n.index + 1}: pull {r.pull_s:.1f} s, container {r.run_s:.1f} s, "
            f"registry layer bytes {r.registry_layer_bytes / 1e6:.1f} MB "
            f"({r.registry_blob_gets} blob GETs)"
        )
    total = cluster.registry.since(first)
    ro.layer_bytes = total.layer_bytes(digests)
    ro.wire_bytes = total.sent_bytes
    ro.blob_gets = total.blob_requests


def run_rollout(
    args: argparse.Namespace,
    image: BenchImage,
    workload: Workload,
    ro: Rollout,
    storage: Path,
    run_dir: Path,
) -> None:
    """One rolling start on a fresh cluster."""
    with open_cluster(
        run_dir / ro.dirname,
        args.nodes,
        registry_rate=args.rate,
        peers=True,
        mirror=True,
        registry_storage=storage,
    ) as cluster:
        ref = push_once(cluster, image, storage, args.rate)
        if ro.mirror:
            for n in cluster.nodes:
                n.configure_mirror(cluster.registry.host)
        started = time.monotonic()
        try:
            rolling(cluster, ref, image, workload, ro)
        finally:
            time.sleep(STATUS_SETTLE_S)  # status.json is rewritten at most once a second
            have = {r.index: r for r in ro.nodes}
            for n in cluster.nodes:
                r = have.get(n.index)
                if r is None:
                    r = NodeRun(n.index)
                    ro.nodes.append(r)
                try:
                    r.mirror = mirror_counters(n)
                    r.events = log_events(n)
                except Exception as e:  # diagnostics only: the numbers are already taken
                    print(f"    node {n.index + 1}: status not collected: {e}")
            ro.nodes.sort(key=lambda r: r.index)
        print(
            f"  {ro.label}: registry layer {ro.layer_bytes / 1e6:.1f} MB "
            f"({ro.layer_bytes / image.layer_bytes:.2f}x one pull), "
            f"wire {ro.wire_bytes / 1e6:.1f} MB ({time.monotonic() - started:.0f} s)"
        )
        for r in ro.nodes:
            print(f"    node {r.index + 1}: mirror {r.mirror}, events {r.events}")


# ---------------------------------------------------------------------------------------------
# Report


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


def _times(ro: Rollout | None, attr: str) -> str:
    if ro is None or ro.error:
        return "n/a"
    return " / ".join(f"{getattr(r, attr):.1f}" for r in ro.nodes)


def goal_lines(runs: Sequence[Rollout], image: BenchImage, rate: str) -> list[str]:
    one = image.layer_bytes
    off = next((ro for ro in runs if not ro.mirror and not ro.error), None)
    on = next((ro for ro in runs if ro.mirror and not ro.error), None)
    out = ["Goal:", ""]
    if on is None:
        out.append("- registry layer bytes with the mirror: no run with the mirror completed")
    else:
        ratio = on.layer_bytes / one
        met = ratio <= ROLLOUT_MAX
        out.append(
            f"- rolling start of {len(on.nodes)} nodes with the mirror: registry layer bytes for "
            f"the whole rollout at most {ROLLOUT_MAX}x one pull: {_mb(on.layer_bytes)} MB = "
            f"{ratio:.2f}x, {'met' if met else '**not met**'}"
            + (f" (without the mirror {off.layer_bytes / one:.2f}x)" if off else "")
        )
        if not met:
            heavy = [
                f"node {r.index + 1}: {r.registry_layer_bytes / one:.2f}x"
                for r in on.nodes[1:]
                if r.registry_layer_bytes > 0.01 * one
            ]
            out.append(
                "  - nodes after the first that took layer bytes from the registry: "
                + (", ".join(heavy) or "none")
            )
    out.append(
        f"- pull time per node (node 1 .. {len(runs[0].nodes) if runs else 0}), without the "
        f"mirror: {_times(off, 'pull_s')} s; with it: {_times(on, 'pull_s')} s"
    )
    out.append(
        f"- container time per node, without the mirror: {_times(off, 'run_s')} s; with it: "
        f"{_times(on, 'run_s')} s"
    )
    per_s = rate_bytes_per_s(rate)
    if per_s:
        out.append(
            f"- the registry link alone needs at least {one / per_s:.1f} s for one pull's layer "
            f"bytes at {rate}"
        )
    return out


def render(
    args: argparse.Namespace,
    command: str,
    image: BenchImage,
    workload: Workload,
    runs: Sequence[Rollout],
    load: tuple[float, float],
    size_note: str,
) -> str:
    one = image.layer_bytes
    commit = (
        subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        or "unknown"
    )
    lines = [
        SECTION,
        "",
        f"Command: `{command}` (root). Machine: {machine_facts()}. Cluster "
        f"(`tests.support.cluster`): {args.nodes} nodes, each a network namespace with its own "
        "containerd 1.6 (CRI) and sociable-snapshotter (peers on, every node a static member; "
        "the registry mirror reading the node's containerd, `[mirror]` defaults), on a Linux "
        "bridge (node to node links unlimited); the registry (Debian docker-registry) in its "
        f"own namespace behind a `tc` tbf limit of {args.rate} each way. Image: "
        f"{len(image.image.layers)} layers, {one / 1e6:.0f} MB compressed (gzip -6), "
        f"{image.file_count} files of {image.file_bytes / 1e6:.0f} MB (bench_peers' image: "
        "busybox, then a sample of the files of /usr/lib/x86_64-linux-gnu, /usr/bin, "
        f"/usr/share and the Python stdlib){size_note}, pushed with skopeo and no SOCI index, "
        "so containerd pulls it the ordinary way and keeps the layers in its content store. "
        "Rolling start: node 1 CRI PullImage and a short container (`sha256sum` of "
        f"{workload.files} files spread over the layers, checked), then node 2, 3, ... one "
        "after another; each run on a fresh cluster (fresh daemons and containerds, empty "
        "content stores). Mirror off: the nodes' `hosts.toml` name the registry only; mirror "
        "on: each node's `hosts.toml` names its own mirror first (`sociable-snapshotter mirror "
        "configure`), then the registry; the daemons are the same. Registry layer bytes = "
        "blob body bytes of the image's layers in the registry's access log; x = multiples of "
        f"one pull's layer bytes ({one / 1e6:.1f} MB). Mirror counters (`status`, `peers` "
        "line, `mirror`) at the end of the rollout: from content = bytes the node's mirror "
        "served from its own containerd's content store (to its containerd or to another "
        "member), from peers = bytes it served its containerd from another member's store, "
        "not found = its 404 answers (to its own containerd, which then asks the registry, "
        "and to other members' lookups of blobs it does not hold). The VM is shared with "
        f"other test runs (load average {load[0]:.1f} at the start, {load[1]:.1f} at the end), "
        f"so the times are noisy. Code: the working tree at {commit}.",
        "",
        "| mirror | node | pull s | container s | registry layer MB | mirror from content MB "
        "| mirror from peers MB | mirror not found |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for ro in runs:
        mirror = "on" if ro.mirror else "off"
        if ro.error:
            lines.append(f"| {mirror} | | failed: {ro.error} ||||||")
        for r in ro.nodes:
            m = r.mirror
            lines.append(
                f"| {mirror} | {r.index + 1} | {r.pull_s:.1f} | {r.run_s:.1f} | "
                f"{_mb(r.registry_layer_bytes)} ({r.registry_layer_bytes / one:.2f}x) | "
                f"{_mb(m.get('from_content', 0))} | {_mb(m.get('from_peers', 0))} | "
                f"{m.get('not_found', 0)} |"
            )
        if not ro.error:
            lines.append(
                f"| {mirror} | **rollout** | {sum(r.pull_s for r in ro.nodes):.1f} | "
                f"{sum(r.run_s for r in ro.nodes):.1f} | **{_mb(ro.layer_bytes)} "
                f"({ro.layer_bytes / one:.2f}x)**, link {_mb(ro.wire_bytes)} | "
                f"{_mb(sum(r.mirror.get('from_content', 0) for r in ro.nodes))} | "
                f"{_mb(sum(r.mirror.get('from_peers', 0) for r in ro.nodes))} | "
                f"{sum(r.mirror.get('not_found', 0) for r in ro.nodes)} |"
            )
    lines += ["", *goal_lines(runs, image, args.rate)]
    events: Counter[str] = Counter()
    for ro in runs:
        for r in ro.nodes:
            events.update(
                {f"mirror {'on' if ro.mirror else 'off'}, {k}": v for k, v in r.events.items()}
            )
    lines += [
        "",
        "Daemon warnings and errors (all nodes): "
        + (", ".join(f"{k}: {v}" for k, v in sorted(events.items())) or "none")
        + ".",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--nodes", type=int, default=4, help="nodes (2-9, default 4)")
    parser.add_argument("--rate", default="200mbit", help="tc rate of the registry's link")
    parser.add_argument(
        "--image-mb", type=int, default=DEFAULT_IMAGE_MB, help="about this many MB compressed"
    )
    parser.add_argument("--mirror", default="off,on", help="comma-separated: off, on")
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.mirror.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("off", "on")]
    if bad or not modes or not 2 <= args.nodes <= 9 or args.image_mb < 1:
        print(f"bench_mirror: bad arguments {bad or vars(args)}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("bench_mirror needs root (namespaces, tc, containerd, mounts)", file=sys.stderr)
        return 2
    missing = missing_binaries() + ([] if shutil.which("skopeo") else ["skopeo"])
    if missing:
        print(f"bench_mirror: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    command = "python3 -m tests.bench.bench_mirror " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    WORKDIR.mkdir(parents=True, exist_ok=True)
    lock = (WORKDIR / ".lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"bench_mirror: another run holds {WORKDIR / '.lock'}; wait for it", file=sys.stderr)
        return 2

    image = build_image(args.image_mb)
    size_note = ""
    if image.layer_bytes < 0.9 * args.image_mb * 1e6:
        from tests.bench.bench_lazy import SOURCES, walk_files

        if sample_share([walk_files(s) for s in SOURCES], args.image_mb * 1_000_000) >= 1.0:
            size_note = (
                f" (every file of the sources: the biggest image this host's files make, "
                f"short of the {args.image_mb} MB asked)"
            )
    print(
        f"image {image.image.layout}: {len(image.image.layers)} layers, "
        f"{image.layer_bytes / 1e6:.0f} MB compressed, {image.file_count} files, "
        f"{image.file_bytes / 1e6:.0f} MB{size_note}"
    )
    workload = make_workloads(image)["small"]
    storage = WORKDIR / f"registry-{image.image.manifest_digest[7:23]}" / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    run_dir = WORKDIR / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)

    runs: list[Rollout] = []
    started = time.monotonic()
    load_start = os.getloadavg()[0]
    for mode in modes:
        ro = Rollout(mirror=mode == "on")
        runs.append(ro)
        print(f"rolling start, {ro.label} ({time.monotonic() - started:.0f} s into the run)")
        try:
            run_rollout(args, image, workload, ro, storage, run_dir)
        except Exception as e:  # recorded in the table; the other run still runs
            ro.error = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            print(f"  {ro.label} FAILED: {e}", file=sys.stderr)
    print(f"both runs in {time.monotonic() - started:.0f} s")
    (run_dir / "results.json").write_text(
        json.dumps([{**asdict(ro), "label": ro.label} for ro in runs], indent=1)
    )
    load = (load_start, os.getloadavg()[0])
    section = render(args, command, image, workload, runs, load, size_note)
    print()
    print(section)
    if args.write_docs:
        write_docs(section, SECTION)
        print(f"wrote the {SECTION!r} section of {DOCS}")
    return 1 if any(ro.error for ro in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
