"""The FUSE fd keeper and the FUSE wire layouts of restart survival.

The keeper runs as the real detached process (`keeper.spawn`) and keeps real fds (pipes):
store/fetch/drop, data kept with the fd, replacing, refusals, dropping an fd whose other end
is gone, exiting once it holds nothing. The layouts are checked against `<linux/fuse.h>`'s
sizes and offsets; the INIT swap is checked on trio's epoll: an fd number waited on, then
replaced under it by `dup2`, is waited on again and wakes for the new file.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from snapshotter.fs import connection, keeper, protocol


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


def _wait_gone(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # our child when spawned from here: reap it
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return True
        except ChildProcessError:
            pass
        time.sleep(0.05)
    return False


def test_keeper_stores_fetches_and_drops_fds(root: Path) -> None:
    pid = keeper.spawn(root)
    try:
        assert keeper.ping(root) == pid
        assert keeper.spawn(root) == pid, "a second spawn finds the running keeper"
        assert os.stat(keeper.socket_path(root)).st_mode & 0o777 == 0o600
        r, w = os.pipe()
        keeper.store(root, "fuse", r, b"data \x00\xff kept")
        os.close(r)  # the keeper's duplicate keeps the pipe's read end open
        fetched = keeper.fetch(root, "fuse")
        assert fetched is not None
        fd, data = fetched
        assert data == b"data \x00\xff kept"
        os.write(w, b"through the kept fd")
        assert os.read(fd, 100) == b"through the kept fd"
        assert not os.get_inheritable(fd)
        os.close(fd)
        assert keeper.fetch(root, "other") is None
        assert keeper.has(root, "fuse") and not keeper.has(root, "other")
        # Storing again under the name replaces (and closes) the earlier fd.
        r2, w2 = os.pipe()
        keeper.store(root, "fuse", r2, b"second")
        os.close(r2)
        fetched = keeper.fetch(root, "fuse")
        assert fetched is not None and fetched[1] == b"second"
        os.close(fetched[0])
        with pytest.raises(ValueError):
            keeper.store(root, "bad name", w2)
        with pytest.raises(ValueError):
            keeper.store(root, "big", w2, bytes(keeper.MAX_DATA_BYTES + 1))
        with pytest.raises(ValueError):
            keeper.fetch(root, "../x")
        assert keeper.drop(root, "fuse") is True
        assert keeper.drop(root, "fuse") is False
        os.close(w)
        os.close(w2)
        # It held something and holds nothing now: it exits and removes its socket.
        assert _wait_gone(pid), "the keeper did not exit once empty"
        assert not keeper.socket_path(root).exists()
        assert keeper.ping(root) is None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)


def test_keeper_drops_an_fd_whose_other_end_is_gone(root: Path) -> None:
    """A kept fd reporting POLLERR/POLLHUP (an aborted FUSE connection; here: a pipe whose
    writer closed) is dropped by the keeper itself, which then exits."""
    pid = keeper.spawn(root)
    try:
        r, w = os.pipe()
        keeper.store(root, "fuse", r)
        os.close(r)
        assert keeper.fetch(root, "fuse") is not None
        os.close(w)
        assert _wait_gone(pid), "the keeper kept a dead fd"
        log = (root / keeper.LOG_NAME).read_text()
        assert "dropped fuse (its connection is gone)" in log, log
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)


def test_keeper_refuses_malformed_requests(root: Path) -> None:
    pid = keeper.spawn(root)
    try:
        r, w = os.pipe()
        keeper.store(root, "fuse", r)  # keep it alive through the test
        for message in (b"fetch\n", b"what fuse\n", b"store fuse\n", b"drop a/b\n"):
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                s.settimeout(5)
                s.connect(str(keeper.socket_path(root)))
                s.send(message)
                assert s.recv(4096).startswith(b"error "), message
        with pytest.raises(keeper.KeeperError, match="refused"):
            keeper._request(root, b"drop fuse\n", r)  # an fd where none belongs
        assert keeper.ping(root) == pid
        os.close(r)
        os.close(w)
    finally:
        os.kill(pid, 9)
        _wait_gone(pid)


def test_a_second_keeper_for_the_root_exits(root: Path) -> None:
    pid = keeper.spawn(root)
    try:
        second = subprocess.run(
            [sys.executable, "-I", keeper.__file__, "--root", str(root)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert second.returncode == 1
        assert "another fd keeper runs" in second.stderr
        assert keeper.ping(root) == pid, "the first keeper still answers on its socket"
    finally:
        os.kill(pid, 9)
        _wait_gone(pid)


def test_a_lone_keeper_exits_and_no_keeper_is_an_error(root: Path) -> None:
    assert keeper.ping(root) is None
    with pytest.raises(keeper.KeeperError):
        keeper.fetch(root, "fuse")
    assert keeper.drop(root, "fuse") is False


# -- mounting --------------------------------------------------------------------------


def test_mount_data_is_what_libfuse_passes_as_root() -> None:
    data = connection.mount_data(
        9, frozenset({"fsname=x", "subtype=y", "ro", "allow_other", "default_permissions"})
    )
    assert data == "fd=9,rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions"


def test_read_init_takes_the_first_request_or_times_out() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(OSError, match="no FUSE_INIT"):
            connection.read_init(r, timeout_sec=0.05)
        request = protocol.init_request(unique=2, major=7, minor=45, flags=1)
        os.write(w, request)
        assert connection.read_init(r) == request
        os.write(w, protocol.resend_notification() + bytes(40))
        with pytest.raises(ValueError):
            connection.read_init(r)
    finally:
        os.close(r)
        os.close(w)
