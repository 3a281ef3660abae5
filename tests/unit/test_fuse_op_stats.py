"""FUSE request counters (`snapshotter.fs.fuse.FuseOpStats`): per handler counts and the trio
thread's CPU time of the handler's own task steps, not of tasks that ran while it waited."""

from __future__ import annotations

import time

import trio

from snapshotter.fs.fuse import COUNTED_OPS, FuseOperations, FuseOpStats


def burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


async def other_task() -> None:
    await trio.sleep(0.01)
    burn(0.1)


async def handler(stats: FuseOpStats, op: str, before: float, after: float) -> None:
    task = stats.enter(op)
    try:
        burn(before)
        await trio.sleep(0.05)  # other tasks run here
        burn(after)
    finally:
        stats.exit(op, task)


async def test_counts_and_cpu_of_own_steps_only() -> None:
    stats = FuseOpStats()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handler, stats, "read", 0.02, 0.02)
        nursery.start_soon(handler, stats, "read", 0.0, 0.0)
        nursery.start_soon(other_task)  # not a request: never counted
        await trio.sleep(0.01)
        task = stats.enter("getattr")
        stats.exit("getattr", task)
    s = stats.statistics()
    assert s.counts == {"read": 2, "getattr": 1}
    # The two reads spent ~40 ms of their own; the 100 ms burn ran while they slept.
    assert 0.035 <= s.cpu_sec["read"] < 0.09
    assert s.cpu_sec["getattr"] < 0.01
    assert s.to_status()["read"]["count"] == 2
    assert list(s.to_status()) == ["getattr", "read"]


async def test_instrument_added_once_per_run() -> None:
    stats = FuseOpStats()
    for _ in range(3):
        stats.exit("lookup", stats.enter("lookup"))
    await trio.sleep(0)
    assert stats.statistics().counts == {"lookup": 3}
    trio.lowlevel.remove_instrument(stats)  # raises KeyError if it had not been added


def test_every_counted_handler_is_wrapped() -> None:
    for op in COUNTED_OPS:
        assert getattr(FuseOperations, op).__name__ == op
        assert getattr(FuseOperations, op).__wrapped__ is not None
