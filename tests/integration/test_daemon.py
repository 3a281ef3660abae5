"""The daemon as a process: sockets, socket activation, sd_notify, signals, logs."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.containerd import mounts_under
from tests.support.snapclient import REPO, SnapClient, SnapDaemon, run_daemon


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for k in ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS"):
        env.pop(k, None)
    env.update(extra)
    return env


def _cmd(root: Path, address: str) -> list[str]:
    return [sys.executable, "-m", "snapshotter.cli", "--root", str(root), "--address", address]


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, Path]]:
    path = tmp_path / "notify.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(30)
    try:
        yield s, path
    finally:
        s.close()


def _wait_state(s: socket.socket, state: bytes) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if state in s.recv(4096).split(b"\n"):
            return
    raise AssertionError(f"no {state!r} from the daemon")


def test_socket_modes_notify_and_sigint(
    tmp_path: Path, notify_socket: tuple[socket.socket, Path]
) -> None:
    sock, npath = notify_socket
    address = tmp_path / "run" / "sub" / "snap.sock"
    log = tmp_path / "log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            _cmd(tmp_path / "root", str(address)),
            env=_env(NOTIFY_SOCKET=str(npath)),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    try:
        _wait_state(sock, b"READY=1")
        assert stat.S_IMODE(address.stat().st_mode) == 0o660
        assert stat.S_ISSOCK(address.stat().st_mode)
        assert stat.S_IMODE(address.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE((tmp_path / "root").stat().st_mode) == 0o700
        c = SnapClient(address)
        c.prepare("k", "", {})
        c.close()
        proc.send_signal(signal.SIGINT)
        _wait_state(sock, b"STOPPING=1")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not address.exists(), "socket left behind after a clean shutdown"
    records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert records, log.read_text()
    for r in records:
        assert {"time", "level", "logger", "msg"} <= r.keys()
    msgs = [r["msg"] for r in records]
    assert "serving" in msgs and "shutting down" in msgs and "stopped" in msgs
    serving = next(r for r in records if r["msg"] == "serving")
    assert serving["address"] == str(address) and serving["activated"] is False
    assert next(r for r in records if r["msg"] == "shutting down")["signal"] == "SIGINT"


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    address = tmp_path / "d" / "snap.sock"
    address.parent.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(address))
    stale.close()  # the file stays, nobody listens
    d = SnapDaemon(root=tmp_path / "d" / "root", address=address, log=tmp_path / "log")
    d.start()
    try:
        c = d.client()
        c.prepare("k", "", {})
        assert c.stat("k").kind == "active"
        c.close()
    finally:
        d.stop()


def test_live_socket_is_not_stolen_and_daemons_run_side_by_side(tmp_path: Path) -> None:
    with run_daemon(tmp_path / "a") as a, run_daemon(tmp_path / "b") as b:
        ca, cb = a.client(), b.client()
        ca.prepare("only-in-a", "", {})
        assert [i.name for i in cb.list()] == []
        r = subprocess.run(
            _cmd(tmp_path / "other-root", str(a.address)),
            env=_env(),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert r.returncode == 3
        [line] = r.stderr.splitlines()
        assert a.proc is not None
        assert line == (
            f"sociable-snapshotter: error: address {str(a.address)!r} is in use by pid {a.proc.pid}"
        )
        assert ca.stat("only-in-a").kind == "active"  # the first daemon is untouched
        other = str(tmp_path / "other-root")  # and the one that gave up left no mount behind
        mountinfo = Path("/proc/self/mountinfo").read_text()
        assert not [m for m in mountinfo.splitlines() if other in m], mountinfo
        ca.close()
        cb.close()


def test_fd_address_without_activation_is_an_error(tmp_path: Path) -> None:
    r = subprocess.run(
        _cmd(tmp_path / "root", "fd://"),
        env=_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 2
    [line] = r.stderr.splitlines()
    assert "LISTEN_FDS" in line


def test_missing_explicit_config_is_an_error(tmp_path: Path) -> None:
    r = subprocess.run(
        [*_cmd(tmp_path / "root", str(tmp_path / "s.sock")), "--config", str(tmp_path / "no.toml")],
        env=_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 2
    [line] = r.stderr.splitlines()
    assert "no.toml" in line and "does not exist" in line


def test_second_daemon_on_the_same_root_is_refused(tmp_path: Path) -> None:
    """The root lock: a second daemon with the same root and another socket exits at once
    naming the first one's pid, and leaves the first one's FUSE mount and state alone."""
    with run_daemon(tmp_path / "a") as a:
        assert a.proc is not None
        c = a.client()
        c.prepare("k", "", {})
        mounts = mounts_under(a.root)
        other = tmp_path / "b.sock"
        r = subprocess.run(
            _cmd(a.root, str(other)),
            env=_env(),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,  # without the lock the second daemon serves until killed
            check=False,
        )
        assert r.returncode == 3
        [line] = r.stderr.splitlines()
        assert line == (
            f"sociable-snapshotter: error: root {a.root} is in use by another "
            f"sociable-snapshotter (pid {a.proc.pid}; lock {a.root / 'daemon.lock'})"
        )
        assert not other.exists()
        assert mounts_under(a.root) == mounts
        assert c.stat("k").kind == "active"
        c.prepare("k2", "", {})
        assert sorted(i.name for i in c.list()) == ["k", "k2"]
        c.close()
    # The lock dies with its holder: the same root starts again.
    with run_daemon(tmp_path / "a") as again:
        c = again.client()
        assert sorted(i.name for i in c.list()) == ["k", "k2"]
        c.close()


def test_socket_activation(tmp_path: Path, notify_socket: tuple[socket.socket, Path]) -> None:
    nsock, npath = notify_socket
    address = tmp_path / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(address))
    listener.listen(16)
    lfd = listener.fileno()

    def as_fd3() -> None:
        os.dup2(lfd, 3)

    # LISTEN_PID must be the daemon's own pid: set it in a shell that then execs.
    proc = subprocess.Popen(
        [
            "sh",
            "-c",
            'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"',
            "sh",
            *_cmd(tmp_path / "root", "fd://"),
        ],
        env=_env(NOTIFY_SOCKET=str(npath)),
        cwd=REPO,
        preexec_fn=as_fd3,
        pass_fds=(3,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    listener.close()
    try:
        # A client may connect before the daemon is ready: the kernel queues it.
        c = SnapClient(address)
        c.prepare("k", "", {"via": "activation"})
        _wait_state(nsock, b"READY=1")
        assert c.stat("k").labels == {"via": "activation"}
        assert [i.name for i in c.list()] == ["k"]
        c.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
        proc.stderr.close()
    assert '"activated": true' in err
    assert address.exists(), "the activation socket belongs to systemd and must stay"
