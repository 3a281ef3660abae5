"""Unit tests of snapshotter.remote.preresolve: singleflight, failure fallback, bounds."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
import trio
import trio.testing

from index.digest import Digest
from snapshotter.remote.preresolve import Preresolver
from snapshotter.tasks import open_task_scope

IMAGE_A = Digest("sha256:" + "a" * 64)
IMAGE_B = Digest("sha256:" + "b" * 64)
Z = [Digest("sha256:" + str(i) * 64) for i in range(1, 6)]


class Loader:
    """A blocking load function that counts calls, can fail some keys once, and can hold
    every call until released."""

    def __init__(self, *, fail: set[Digest] | None = None, hold: bool = False) -> None:
        self.calls: Counter[Digest] = Counter()
        self.fail = set(fail or ())
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.lock = threading.Lock()
        self.running = 0
        self.max_running = 0

    def __call__(self, key: Digest) -> str:
        with self.lock:
            self.calls[key] += 1
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            assert self.release.wait(10)
            if key in self.fail:
                self.fail.discard(key)
                raise ValueError(f"cannot load {key}")
            return f"tree-{key[-4:]}-{self.calls[key]}"
        finally:
            with self.lock:
                self.running -= 1


async def settle(pre: Preresolver[str]) -> None:
    """Wait until no background resolution is queued or running."""
    with trio.fail_after(10):
        while True:
            await trio.testing.wait_all_tasks_blocked(0.01)
            if all(e.done.is_set() for e in pre._entries.values()):
                return


async def test_background_result_taken_without_reloading() -> None:
    load = Loader()
    async with open_task_scope("preresolve") as tasks:
        pre: Preresolver[str] = Preresolver(load, tasks)
        assert pre.start(IMAGE_A, [Z[0], Z[1], Z[0]])
        await settle(pre)
        assert load.calls == Counter({Z[0]: 1, Z[1]: 1})
        assert await pre.take(Z[0]) == f"tree-{Z[0][-4:]}-1"
        assert pre.pending() == [Z[1]]
        # the same image again (the next Prepare) queues nothing new
        assert not pre.start(IMAGE_A, [Z[0], Z[1]])
        assert await pre.take(Z[1]) == f"tree-{Z[1][-4:]}-1"
        assert load.calls == Counter({Z[0]: 1, Z[1]: 1})
        # every queued layer taken: the image is forgotten, the expiry timer is gone
        assert pre.image is None and pre.pending() == []
        # a result is handed out once: a later take loads again
        assert await pre.take(Z[0]) == f"tree-{Z[0][-4:]}-2"


async def test_take_waits_for_the_resolution_in_flight() -> None:
    load = Loader(hold=True)
    async with open_task_scope("preresolve") as tasks:
        pre: Preresolver[str] = Preresolver(load, tasks)
        pre.start(IMAGE_A, [Z[0]])
        await trio.testing.wait_all_tasks_blocked(0.01)
        assert load.calls[Z[0]] == 1  # running in its worker thread
        got: list[str] = []

        async def prepare() -> None:
            got.append(await pre.take(Z[0]))

        tasks.start_soon(prepare)
        await trio.testing.wait_all_tasks_blocked(0.01)
        assert got == []
        load.release.set()
        with trio.fail_after(10):
            while not got:
                await trio.sleep(0.01)
        assert got == [f"tree-{Z[0][-4:]}-1"]
        assert load.calls[Z[0]] == 1


async def test_background_failure_falls_back_to_loading_in_the_prepare() -> None:
    load = Loader(fail={Z[0]})
    async with open_task_scope("preresolve") as tasks:
        pre: Preresolver[str] = Preresolver(load, tasks)
        pre.start(IMAGE_A, [Z[0]])
        await settle(pre)
        assert load.calls[Z[0]] == 1
        assert await pre.take(Z[0]) == f"tree-{Z[0][-4:]}-2"
        assert load.calls[Z[0]] == 2


async def test_a_failure_in_the_prepare_is_raised_as_without_preresolution() -> None:
    load = Loader()
    async with open_task_scope("preresolve") as tasks:
        pre: Preresolver[str] = Preresolver(load, tasks)
        load.fail = {Z[2]}
        with pytest.raises(ValueError, match="cannot load"):
            await pre.take(Z[2])


async def test_parallelism_is_bounded() -> None:
    load = Loader(hold=True)
    async with open_task_scope("preresolve") as tasks:
        pre: Preresolver[str] = Preresolver(load, tasks, parallel=2)
        pre.start(IMAGE_A, Z)
        await trio.testing.wait_all_tasks_blocked(0.05)
        assert sum(load.calls.values()) == 2
        load.release.set()
        await settle(pre)
        assert load.max_running == 2
        assert set(load.calls) == set(Z)


async def test_only_one_image_is_kept() -> None:
    load = Loader(hold=True)
    async with open_task_scope("preresolve") as tasks:
        pre: Preresolver[str] = Preresolver(load, tasks, parallel=1)
        pre.start(IMAGE_A, [Z[0], Z[1], Z[2]])
        await trio.testing.wait_all_tasks_blocked(0.01)
        assert pre.start(IMAGE_B, [Z[3]])
        assert pre.image == IMAGE_B and pre.pending() == [Z[3]]
        load.release.set()
        await settle(pre)
        # A's queued resolutions were cancelled before they ran; its running one was discarded
        assert load.calls[Z[1]] == 0 and load.calls[Z[2]] == 0
        assert await pre.take(Z[3]) == f"tree-{Z[3][-4:]}-1"
        assert await pre.take(Z[0]) == f"tree-{Z[0][-4:]}-2"


async def test_untaken_results_expire(autojump_clock: trio.abc.Clock) -> None:
    load = Loader()
    async with open_task_scope("preresolve") as tasks:
        pre: Preresolver[str] = Preresolver(load, tasks, ttl_sec=30.0)
        pre.start(IMAGE_A, [Z[0], Z[1]])
        await settle(pre)
        await trio.sleep(29)
        assert pre.pending() == [Z[0], Z[1]]
        await trio.sleep(2)
        assert pre.pending() == [] and pre.image is None
        assert await pre.take(Z[0]) == f"tree-{Z[0][-4:]}-2"


async def test_keys_added_one_by_one_resolve_in_order_once() -> None:
    load = Loader()
    order: list[Digest] = []
    original = load.__call__

    def recording(key: Digest) -> str:
        order.append(key)
        return original(key)

    async with open_task_scope("preresolve") as tasks:
        pre: Preresolver[str] = Preresolver(recording, tasks, parallel=1)
        assert pre.add(IMAGE_A, Z[2])
        await settle(pre)  # the worker ran out of keys and ended
        assert pre.add(IMAGE_A, Z[0]) and pre.add(IMAGE_A, Z[1])
        assert not pre.add(IMAGE_A, Z[2])  # already queued for this image
        await settle(pre)
        assert order == [Z[2], Z[0], Z[1]]
        for key in (Z[0], Z[1], Z[2]):
            assert await pre.take(key) == f"tree-{key[-4:]}-1"
        assert pre.image is None


async def test_closed_scope_means_take_computes_itself() -> None:
    """Once the owner's scope is closed nothing runs in the background, and a key added
    then is not left waiting for a worker that never starts."""
    load = Loader()
    async with open_task_scope("preresolve") as tasks:
        pre: Preresolver[str] = Preresolver(load, tasks)
        await tasks.aclose()
        pre.add(IMAGE_A, Z[0])
        with trio.fail_after(5):
            assert await pre.take(Z[0]) == f"tree-{Z[0][-4:]}-1"
        assert pre.pending() == []
