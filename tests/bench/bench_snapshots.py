"""Snapshotter API latency: sociable against containerd's built-in overlayfs snapshotter.

Run as root: ``python -m tests.bench.bench_snapshots [--snapshots 1000] [--depth 10]``.

One private containerd (Debian 1.6) is started with ``[proxy_plugins.sociable]`` pointing at a
sociable daemon; the same workload is driven through containerd's snapshots service
(``containerd.services.snapshots.v1.Snapshots`` on containerd's socket, namespace ``bench``)
against ``overlayfs`` and against ``sociable``: both go through containerd's metadata layer, so
that is the fair comparison. The workload is also run straight against a second sociable daemon
(no containerd in between) to show where the time goes.

Workload per target, for i in 0..N-1 (chains of ``--depth`` snapshots, so overlay lowerdir
lists stay realistic):
``Prepare(a_i, parent=c_{i-1} or "")``, ``Mounts(a_i)``, ``Commit(c_i, a_i)``; then
``Stat(c_i)`` for every i; then ``--list-runs`` full ``List`` calls over all N snapshots.
Every call is timed on its own (wall clock, client side, sequential, one connection).
Prints a markdown table of p50/p99 in milliseconds and the sociable/overlayfs ratios.
The machine is shared and small: numbers are noisy; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.containerd import ContainerdSnapshots, capabilities, start_containerd
from tests.support.snapclient import SnapClient, run_daemon

OPS = ("Prepare", "Mounts", "Commit", "Stat", "List")
NAMESPACE = "bench"
GC_ROOT = {"containerd.io/gc.root": "sociable-bench"}
"""containerd's GC (run after every 100 mutations) would delete unreferenced snapshots."""


@dataclass
class Samples:
    """Latencies in seconds per operation name."""

    by_op: dict[str, list[float]] = field(default_factory=lambda: {op: [] for op in OPS})

    def timed(self, op: str, fn: Callable[..., object], *args: object) -> None:
        """Calls ``fn(*args)`` and records its wall-clock latency under ``op``."""
        t0 = time.perf_counter()
        fn(*args)
        self.by_op[op].append(time.perf_counter() - t0)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100) of ``values``; raises ValueError when empty."""
    if not values:
        raise ValueError("no samples")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def run_workload(client: SnapClient, n: int, depth: int, list_runs: int) -> Samples:
    """Drives the workload described in the module docstring; returns per-call latencies."""
    # Warm-up (connection, caches, first sqlite pages): not recorded.
    client.prepare("warm-a", "", GC_ROOT)
    client.mounts("warm-a")
    client.commit("warm-c", "warm-a", GC_ROOT)
    client.stat("warm-c")
    client.list()

    s = Samples()
    parent = ""
    for i in range(n):
        if i % depth == 0:
            parent = ""
        key, name = f"bench/{i}/active sha256:{i:064x}", f"sha256:{i:064x}"
        s.timed("Prepare", client.prepare, key, parent, GC_ROOT)
        s.timed("Mounts", client.mounts, key)
        s.timed("Commit", client.commit, name, key, GC_ROOT)
        parent = name
    for i in range(n):
        s.timed("Stat", client.stat, f"sha256:{i:064x}")
    for _ in range(list_runs):
        s.timed("List", client.list)
    listed = len(client.list())
    if listed < n:
        raise RuntimeError(f"{client.snapshotter}: List returned {listed} < {n} snapshots")
    return s


def _fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}"


def render_table(results: dict[str, Samples], baseline: str, subject: str) -> str:
    """A markdown table: p50/p99 (ms) per target and the subject/baseline ratios."""
    names = list(results)
    head = ["op"]
    for name in names:
        head += [f"{name} p50 ms", f"{name} p99 ms"]
    head += [f"ratio p50 ({subject} / {baseline})", "ratio p99"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for op in OPS:
        row = [op]
        for name in names:
            vals = results[name].by_op[op]
            row += [_fmt_ms(percentile(vals, 50)), _fmt_ms(percentile(vals, 99))]
        b, sub = results[baseline].by_op[op], results[subject].by_op[op]
        row.append(f"{percentile(sub, 50) / percentile(b, 50):.2f}")
        row.append(f"{percentile(sub, 99) / percentile(b, 99):.2f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--snapshots", type=int, default=1000, help="snapshots per target")
    parser.add_argument("--depth", type=int, default=10, help="length of each parent chain")
    parser.add_argument("--list-runs", type=int, default=50, help="number of timed List calls")
    parser.add_argument("--no-direct", action="store_true", help="skip the direct daemon run")
    args = parser.parse_args(argv)

    caps = capabilities()
    print(caps.describe(), file=sys.stderr)
    missing = caps.missing_for_containerd()
    if missing:
        print(f"bench_snapshots: cannot run, missing: {', '.join(missing)}", file=sys.stderr)
        return 2

    results: dict[str, Samples] = {}
    with tempfile.TemporaryDirectory(prefix="sociable-bench-") as tmp:
        base = Path(tmp)
        with (
            run_daemon(base / "proxied") as proxied,
            start_containerd(
                base / "containerd",
                proxy_address=proxied.address,
                cri_snapshotter="overlayfs",
            ) as ctd,
        ):
            for label, snapshotter in (
                ("overlayfs via containerd", "overlayfs"),
                ("sociable via containerd", "sociable"),
            ):
                print(f"running {label} ...", file=sys.stderr)
                client = ContainerdSnapshots(ctd.address, snapshotter, NAMESPACE)
                try:
                    results[label] = run_workload(
                        client, args.snapshots, args.depth, args.list_runs
                    )
                finally:
                    client.close()
        if not args.no_direct:
            with run_daemon(base / "direct") as direct:
                print("running sociable direct ...", file=sys.stderr)
                client = direct.client()
                try:
                    results["sociable direct"] = run_workload(
                        client, args.snapshots, args.depth, args.list_runs
                    )
                finally:
                    client.close()

    print(
        f"\nSnapshotter API latency, {args.snapshots} snapshots (chains of {args.depth}), "
        f"{args.list_runs} List calls; {os.cpu_count()} CPUs\n"
    )
    print(render_table(results, "overlayfs via containerd", "sociable via containerd"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
