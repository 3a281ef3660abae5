"""Reading every file of the lazy-pull benchmark's image, several times over, through one
lazy snapshot view: the read path alone, in minutes rather than the half hour of
`tests.bench.bench_lazy`.

    python -m tests.bench.bench_readall [--passes N] [--rate RATE] [--daemon-config K=V]
                                        [--pin CPU]

A fresh daemon and containerd (the benchmark's registry, image and namespace; no link limit
unless `--rate`), the image pulled lazily (CRI), a read-only view of its top snapshot
mounted; then `find -type f -exec cat` over the view `--passes` times, the page cache dropped
before each pass after the first (the daemon's caches stay: later passes read from its span
cache and inflated tier). `--pin CPU` runs the daemon and the readers on one CPU (no
cross-CPU wakeups; see `tests.bench.bench_wakeup`). Prints, per pass: seconds, FUSE requests
by handler and per file, the daemon's CPU and its trio thread's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tests.bench import bench_lazy as lazy
from tests.support.snapclient import mounted


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--passes", type=int, default=2, help="passes over every file")
    parser.add_argument("--rate", default=None, help="tc rate of the link (default: none)")
    parser.add_argument("--pin", type=int, default=None, help="run daemon and readers on CPU")
    parser.add_argument(
        "--daemon-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a [remote] setting (TOML) for the daemon, e.g. passthrough=false",
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_readall needs root (namespaces, containerd, mounts)", file=sys.stderr)
        return 2
    lazy.EXTRA_REMOTE_CONFIG.extend(args.daemon_config)
    files = [lazy.walk_files(s) for s in lazy.SOURCES]
    key = lazy.image_key(files)
    image = lazy.build_image(key)
    n_files = sum(len(layer) for layer in files) + lazy.busybox_files()
    run_dir = lazy.WORKDIR / "readall"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    pin = [] if args.pin is None else ["taskset", "-c", str(args.pin)]
    with (
        lazy.open_netns(lazy.NS_NAME, lazy.NS_SUBNET) as ns,
        lazy.start_ns_registry(ns, lazy.WORKDIR / f"registry-{key}") as reg,
    ):
        ref = lazy.convert_and_push(image, reg, lazy.WORKDIR)
        if args.rate:
            ns.limit(args.rate)
        base = lazy.containerd_base(run_dir, "readall")
        with lazy.lazy_stack(base, reg) as (daemon, ctd):
            started = time.perf_counter()
            ctd.cri().pull_image(ref)
            print(f"pull {time.perf_counter() - started:.2f} s ({n_files} files)", flush=True)
            assert daemon.proc is not None
            if args.pin is not None:
                subprocess.run(
                    ["taskset", "-a", "-p", "-c", str(args.pin), str(daemon.proc.pid)],
                    check=True,
                    capture_output=True,
                )
            snapshots = lazy.ContainerdSnapshots(ctd.address, lazy.PROXY_NAME, "k8s.io")
            try:
                mounts = snapshots.view("readall", parent=image.chain_ids[-1])
                with mounted(mounts, run_dir / "view") as root:
                    for i in range(args.passes):
                        if i:
                            Path("/proc/sys/vm/drop_caches").write_text("3\n")
                        before = lazy.sample_daemon(daemon)
                        t0 = time.perf_counter()
                        out = subprocess.run(
                            [*pin, "sh", "-c", f"{lazy.ALL_COMMAND.replace(' / ', f' {root} ')}"],
                            capture_output=True,
                            text=True,
                            check=True,
                        ).stdout.strip()
                        seconds = time.perf_counter() - t0
                        after = lazy.sample_daemon(daemon)
                        ops = {
                            op: n - before.ops.get(op, (0, 0.0))[0]
                            for op, (n, _) in sorted(after.ops.items())
                        }
                        ops = {op: n for op, n in ops.items() if n}
                        pushed = ops.pop("push", 0)  # files pushed: not requests
                        print(
                            f"pass {i}: {seconds:.2f} s, {out} bytes; "
                            f"{sum(ops.values()) / n_files:.2f} requests / file {ops}; "
                            f"{pushed} files pushed; "
                            f"daemon CPU {after.cpu_s - before.cpu_s:.1f} s, "
                            f"trio thread {after.trio_cpu_s - before.trio_cpu_s:.1f} s",
                            flush=True,
                        )
            finally:
                snapshots.remove("readall")
                snapshots.close()
    shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
