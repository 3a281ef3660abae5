"""SingleFlight: one run per key for concurrent callers; errors shared; cancelled leaders."""

from __future__ import annotations

import trio
import trio.testing

from snapshotter.singleflight import SingleFlight


async def test_concurrent_callers_share_one_run() -> None:
    sf: SingleFlight[str, int] = SingleFlight()
    runs = 0
    results: list[int] = []

    async def work() -> int:
        nonlocal runs
        runs += 1
        await trio.sleep(0.01)
        return 42

    async def call() -> None:
        results.append(await sf.do("k", work))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(call)
    assert runs == 1 and results == [42] * 5 and len(sf) == 0
    assert await sf.do("k", work) == 42 and runs == 2, "results are not cached"


async def test_an_error_reaches_every_waiter() -> None:
    sf: SingleFlight[str, int] = SingleFlight()
    errors: list[BaseException] = []

    async def work() -> int:
        await trio.sleep(0.01)
        raise ValueError("bad")

    async def call() -> None:
        try:
            await sf.do("k", work)
        except ValueError as e:
            errors.append(e)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(call)
    assert len(errors) == 3


async def test_a_cancelled_leader_hands_over_to_a_waiter() -> None:
    sf: SingleFlight[str, str] = SingleFlight()
    runs: list[str] = []
    got: list[str] = []

    async def work() -> str:
        runs.append("run")
        await trio.sleep(0.05)
        return "done"

    async with trio.open_nursery() as nursery:
        leader = trio.CancelScope()

        async def lead() -> None:
            with leader:
                await sf.do("k", work)

        async def wait() -> None:
            got.append(await sf.do("k", work))

        nursery.start_soon(lead)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        leader.cancel()
    assert runs == ["run", "run"] and got == ["done"]


async def test_keys_are_independent() -> None:
    sf: SingleFlight[int, int] = SingleFlight()

    async def work(n: int) -> int:
        await trio.sleep(0)
        return n * 2

    out: dict[int, int] = {}

    async def call(n: int) -> None:
        out[n] = await sf.do(n, lambda: work(n))

    async with trio.open_nursery() as nursery:
        for n in range(4):
            nursery.start_soon(call, n)
    assert out == {0: 0, 1: 2, 2: 4, 3: 6}
