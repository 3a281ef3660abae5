"""Task scopes: tasks die with their owner, unexpected errors stay inside the boundary."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from snapshotter.tasks import TaskScope, open_task_scope


async def test_failing_task_is_counted_and_siblings_go_on(caplog: pytest.LogCaptureFixture) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await trio.sleep(0.01)
            ticks += 1

    async def boom() -> None:
        await trio.sleep(0.02)
        raise FileNotFoundError("ca.pem")

    async with open_task_scope("daemon") as root:
        layer = await root.open_child("layer snap-1")
        assert layer.start_soon(ticker)
        assert layer.start_soon(boom, name="read-ahead")
        with caplog.at_level(logging.ERROR, logger="snapshotter.tasks"):
            await trio.sleep(0.1)
        before = ticks
        await trio.sleep(0.05)
        assert ticks > before, "the sibling task stopped"
        stats = layer.statistics()
        assert stats.errors == 1 and stats.running == 1
        assert stats.last_error == "read-ahead: FileNotFoundError: ca.pem"
        assert any(getattr(r, "scope", None) == "layer snap-1" for r in caplog.records)
        assert not root.closed


async def test_closing_a_child_cancels_its_tasks_only() -> None:
    cancelled: list[str] = []

    async def forever(tag: str) -> None:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.append(tag)

    async with open_task_scope("daemon") as root:
        a = await root.open_child("a")
        b = await root.open_child("b")
        a.start_soon(forever, "a")
        b.start_soon(forever, "b")
        await trio.testing.wait_all_tasks_blocked()
        await a.aclose()
        assert cancelled == ["a"] and a.closed and not b.closed
        assert not a.start_soon(forever, "late"), "a closed scope must not start tasks"
        with pytest.raises(RuntimeError):
            await a.open_child("grandchild")
    assert sorted(cancelled) == ["a", "b"]


async def test_fatal_errors_propagate_to_the_root_owner() -> None:
    class Fatal(Exception):
        pass

    async def die() -> None:
        raise Fatal("store gone")

    with pytest.RaisesGroup(Fatal, flatten_subgroups=True):
        async with open_task_scope("daemon", fatal=(Fatal,)) as root:
            child = await root.open_child("layer")
            child.start_soon(die)
            await trio.sleep_forever()


async def test_closing_the_parent_closes_children() -> None:
    async with open_task_scope("daemon") as root:
        child = await root.open_child("layer")
        grandchild = await child.open_child("read-ahead")
    assert root.closed and child.closed and grandchild.closed
    assert isinstance(child, TaskScope) and "closed" in repr(child)
