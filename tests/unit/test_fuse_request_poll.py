"""The FUSE request loop's poll for the next request (`snapshotter.fs.fuse._read_request`),
on a non-blocking pipe: what `/dev/fuse` looks like to the loop (a whole message per `readv`,
`BlockingIOError` when none is queued)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest

from snapshotter.fs.fuse import POLL_SEC, _read_request


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    os.set_blocking(r, False)
    yield r, w
    os.close(r)
    os.close(w)


def test_a_queued_request_is_read_at_once(pipe: tuple[int, int]) -> None:
    r, w = pipe
    os.write(w, b"request")
    buffer = bytearray(64)
    assert _read_request(r, buffer, 0.0) == 7
    assert bytes(buffer[:7]) == b"request"


def test_without_polling_an_empty_queue_raises_at_once(pipe: tuple[int, int]) -> None:
    start = time.perf_counter()
    with pytest.raises(BlockingIOError):
        _read_request(pipe[0], bytearray(64), 0.0)
    assert time.perf_counter() - start < 0.05


def test_polling_catches_a_request_that_comes_within_the_window(pipe: tuple[int, int]) -> None:
    r, w = pipe
    timer = threading.Timer(0.05, os.write, (w, b"next"))
    timer.start()
    buffer = bytearray(64)
    try:
        assert _read_request(r, buffer, 2.0) == 4  # a long window: the timer thread's turn
    finally:
        timer.join()
    assert bytes(buffer[:4]) == b"next"


def test_polling_gives_up_after_its_window(pipe: tuple[int, int]) -> None:
    start = time.perf_counter()
    with pytest.raises(BlockingIOError):
        _read_request(pipe[0], bytearray(64), 0.02)
    elapsed = time.perf_counter() - start
    assert 0.02 <= elapsed < 1.0


def test_the_poll_window_is_short() -> None:
    """Polling is for requests that come back to back: it must stay far below a scheduler
    tick, so that a daemon whose requests stop wastes next to nothing."""
    assert 0 < POLL_SEC <= 0.001
