"""What waking another process costs on this machine: the floor under every synchronous FUSE
request (the reader sleeps until the daemon answers, the daemon until the next request).

    python -m tests.bench.bench_wakeup

Two processes pass one byte back and forth over two pipes, first free to run on any CPU (the
kernel puts a woken process on an idle CPU: on a VM that can cost an interrupt to a halted
vCPU), then both pinned to one CPU (a context switch, no interrupt). Prints the round trip
of each, in microseconds, and their ratio.
"""

from __future__ import annotations

import os
import time

ROUNDS = 20000


def round_trip_us(cpu: int | None) -> float:
    """Mean round trip in microseconds; both processes pinned to `cpu` unless None."""
    to_child, from_parent = os.pipe()
    to_parent, from_child = os.pipe()
    pid = os.fork()
    if pid == 0:  # the echo
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        for _ in range(ROUNDS):
            os.read(to_child, 1)
            os.write(from_child, b"x")
        os._exit(0)
    try:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        started = time.perf_counter()
        for _ in range(ROUNDS):
            os.write(from_parent, b"x")
            os.read(to_parent, 1)
        return (time.perf_counter() - started) / ROUNDS * 1e6
    finally:
        os.waitpid(pid, 0)
        for fd in (to_child, from_parent, to_parent, from_child):
            os.close(fd)


def main() -> int:
    cpus = sorted(os.sched_getaffinity(0))
    free = round_trip_us(None)
    pinned = round_trip_us(cpus[0])
    print(f"{len(cpus)} CPUs, {ROUNDS} round trips each")
    print("| processes | round trip us |")
    print("|---|---:|")
    print(f"| free (any CPU) | {free:.1f} |")
    print(f"| both on CPU {cpus[0]} | {pinned:.1f} |")
    print(f"free / pinned: {free / pinned:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
