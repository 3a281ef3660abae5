"""The FUSE fd keeper: a tiny process that holds file descriptors across daemon restarts.

    python3 -I snapshotter/fs/keeper.py --root ROOT      (or: python3 -m snapshotter.fs.keeper)

A FUSE connection lives as long as one `/dev/fuse` file descriptor of it is open. The daemon
stores a duplicate of its connection's fd here, so the connection (and every container
reading through it) outlives the daemon: a restarted daemon fetches the fd and serves the
same connection again.

Stopping the keeper (SIGTERM, SIGKILL) closes what it keeps: a FUSE connection no daemon
serves then dies (readers get ENOTCONN). The keeper only stores, hands out and forgets fds; it never reads from them. It imports
nothing beyond the standard library (it is started as a plain script and keeps running the
code it started with across upgrades of the daemon, so its protocol must stay stable).

Protocol: one `SOCK_SEQPACKET` unix socket at `<root>/fuse-keeper.sock` (mode 0600), one
message per request and per answer; fds travel as `SCM_RIGHTS`:

    store NAME\\n<data>   + one fd  ->  ok\\n
    fetch NAME\\n                   ->  ok\\n<data> + the fd, or none\\n
    drop NAME\\n                    ->  ok\\n, or none\\n
    has NAME\\n                     ->  ok\\n, or none\\n
    ping\\n                         ->  ok\\n<pid>

`<data>` is at most `MAX_DATA_BYTES` opaque bytes kept with the fd. Anything else is answered
`error <reason>\\n`. The keeper drops an fd on its own when the kernel reports it dead
(`POLLERR`/`POLLHUP`: the FUSE connection was aborted or unmounted), and exits when it held
something and holds nothing any more (or after `IDLE_EXIT_SEC` holding nothing at all), so
a torn-down root leaves no process behind; with `--stay` (its systemd unit) it never exits on
its own. One line per event on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

SOCKET_NAME: Final = "fuse-keeper.sock"
LOCK_NAME: Final = "fuse-keeper.lock"
"""flock'ed by the running keeper: a second one for the same root exits at once."""
LOG_NAME: Final = "fuse-keeper.log"
MAX_DATA_BYTES: Final = 4096
MAX_MESSAGE_BYTES: Final = MAX_DATA_BYTES + 512
MAX_NAME_BYTES: Final = 128
IDLE_EXIT_SEC: Final = 60.0
"""A keeper that never held anything exits after this many seconds."""
CLIENT_TIMEOUT_SEC: Final = 5.0


class KeeperError(Exception):
    """The keeper cannot be reached, refused a request or answered something unexpected."""


def socket_path(root: Path) -> Path:
    """The keeper's socket for daemon root `root`."""
    return root / SOCKET_NAME


# -- client ----------------------------------------------------------------------------------


def _request(
    root: Path, message: bytes, fd: int | None = None, timeout_sec: float = CLIENT_TIMEOUT_SEC
) -> tuple[bytes, list[int]]:
    """Send one request, return (answer, received fds). Raises KeeperError."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as s:
            s.settimeout(timeout_sec)
            s.connect(os.fspath(socket_path(root)))
            if fd is None:
                s.send(message)
            else:
                socket.send_fds(s, [message], [fd])
            data, fds, _flags, _addr = socket.recv_fds(s, MAX_MESSAGE_BYTES, 1)
    except OSError as e:
        raise KeeperError(f"fd keeper at {socket_path(root)}: {e}") from e
    for received in fds:
        os.set_inheritable(received, False)
    if data.startswith(b"error "):
        for received in fds:
            os.close(received)
        raise KeeperError(f"fd keeper refused {message.split(b' ')[0].decode()}: {data[6:]!r}")
    return data, fds


def ping(root: Path) -> int | None:
    """The keeper's pid, or None when no keeper answers at `root`."""
    try:
        data, _ = _request(root, b"ping\n", timeout_sec=2.0)
    except KeeperError:
        return None
    head, _, pid = data.partition(b"\n")
    return int(pid) if head == b"ok" and pid.isdigit() else None


def store(root: Path, name: str, fd: int, data: bytes = b"") -> None:
    """Give the keeper a duplicate of `fd` under `name` (replacing an earlier one), with
    `data`. Raises KeeperError, ValueError (name or data too long)."""
    answer, _ = _request(root, _header(b"store", name) + _check_data(data), fd)
    if answer != b"ok\n":
        raise KeeperError(f"fd keeper: unexpected answer to store: {answer[:64]!r}")


def fetch(root: Path, name: str) -> tuple[int, bytes] | None:
    """A new fd for what is kept under `name` and its data (the caller closes the fd), or
    None when nothing is kept under it. Raises KeeperError."""
    answer, fds = _request(root, _header(b"fetch", name))
    if answer == b"none\n":
        return None
    if not answer.startswith(b"ok\n") or len(fds) != 1:
        for received in fds:
            os.close(received)
        raise KeeperError(f"fd keeper: unexpected answer to fetch: {answer[:64]!r}")
    return fds[0], answer[3:]


def has(root: Path, name: str) -> bool:
    """Whether the keeper keeps something under `name`. Raises KeeperError (no keeper)."""
    answer, _ = _request(root, _header(b"has", name))
    return answer == b"ok\n"


def drop(root: Path, name: str) -> bool:
    """Make the keeper close what it keeps under `name`; False when it kept nothing (or no
    keeper answers)."""
    try:
        answer, _ = _request(root, _header(b"drop", name))
    except KeeperError:
        return False
    return answer == b"ok\n"


def _header(verb: bytes, name: str) -> bytes:
    raw = name.encode()
    if not raw or len(raw) > MAX_NAME_BYTES or any(c in raw for c in b" \n\0/"):
        raise ValueError(f"bad keeper name {name!r}")
    return verb + b" " + raw + b"\n"


def _check_data(data: bytes) -> bytes:
    if len(data) > MAX_DATA_BYTES:
        raise ValueError(f"keeper data of {len(data)} bytes exceeds {MAX_DATA_BYTES}")
    return data


def spawn(root: Path, *, python: str = sys.executable, timeout_sec: float = 10.0) -> int:
    """Start a keeper for `root` detached (its own session, stdio to `<root>/fuse-keeper.log`)
    unless one answers already; returns the answering keeper's pid. Raises KeeperError when
    none answers within `timeout_sec`."""
    pid = ping(root)
    if pid is not None:
        return pid
    log_path = root / LOG_NAME
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        child = os.posix_spawn(
            python,
            [python, "-I", os.path.abspath(__file__), "--root", os.fspath(root)],
            dict(os.environ),
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, fd, 1),
                (os.POSIX_SPAWN_DUP2, fd, 2),
            ],
            setsid=True,
        )
    finally:
        os.close(fd)
    deadline = time.monotonic() + timeout_sec
    while time.monotonic() < deadline:
        pid = ping(root)
        if pid is not None:
            return pid
        with contextlib.suppress(ChildProcessError):
            done, status = os.waitpid(child, os.WNOHANG)
            if done:
                raise KeeperError(
                    f"the fd keeper exited at start ({os.waitstatus_to_exitcode(status)}); "
                    f"see {log_path}"
                )
        time.sleep(0.02)
    raise KeeperError(f"the fd keeper did not answer within {timeout_sec} s; see {log_path}")


# -- server ----------------------------------------------------------------------------------


@dataclass
class _Kept:
    fd: int
    data: bytes


def _log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    print(f"{stamp} fuse-keeper[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


class Keeper:
    """The server loop (see the module doc)."""

    def __init__(self, root: Path, *, stay: bool = False) -> None:
        self.root = root
        self.stay = stay
        self.kept: dict[str, _Kept] = {}
        self.held_any = False
        self.started = time.monotonic()
        self.listener = self._listen()

    def _listen(self) -> socket.socket:
        path = socket_path(self.root)
        self.lock = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.lock)
            raise SystemExit(f"another fd keeper runs for {self.root}") from None
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            s.bind(os.fspath(path))
        finally:
            os.umask(old)
        s.listen(16)
        return s

    def serve(self) -> None:
        _log(f"serving at {socket_path(self.root)}")
        try:
            while not self._done():
                self._step()
        finally:
            self.close()

    def _done(self) -> bool:
        if self.kept or self.stay:
            return False
        if self.held_any:
            _log("nothing kept any more: exiting")
            return True
        if time.monotonic() - self.started > IDLE_EXIT_SEC:
            _log(f"nothing stored within {IDLE_EXIT_SEC:.0f} s: exiting")
            return True
        return False

    def _step(self) -> None:
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        by_fd = {kept.fd: name for name, kept in self.kept.items()}
        for fd in by_fd:
            poller.register(fd, 0)  # errors and hang-ups only: never read a kept fd
        # Holding something (or staying), it sleeps until a request or an fd's error; else
        # it wakes each second to see whether it has waited long enough to exit.
        timeout_ms = None if self.kept or self.stay else 1000
        try:
            events = poller.poll(timeout_ms)
        except InterruptedError:
            return
        for fd, mask in events:
            if fd == self.listener.fileno():
                self._accept()
            elif fd in by_fd and mask & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                name = by_fd[fd]
                self._forget(name, "its connection is gone")

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(CLIENT_TIMEOUT_SEC)
            try:
                data, fds, _flags, _addr = socket.recv_fds(conn, MAX_MESSAGE_BYTES, 1)
            except OSError as e:
                _log(f"bad request: {e}")
                return
            try:
                answer, out = self._answer(data, fds)
            finally:
                for fd in fds:
                    if fd not in {k.fd for k in self.kept.values()}:
                        os.close(fd)
            with contextlib.suppress(OSError):
                if out is None:
                    conn.send(answer)
                else:
                    socket.send_fds(conn, [answer], [out])

    def _answer(self, message: bytes, fds: Sequence[int]) -> tuple[bytes, int | None]:
        head, _, data = message.partition(b"\n")
        verb, _, raw = head.partition(b" ")
        if verb == b"ping" and not raw:
            return b"ok\n" + str(os.getpid()).encode(), None
        try:
            name = raw.decode()
            _header(verb, name)
        except (UnicodeDecodeError, ValueError):
            return b"error bad name\n", None
        if verb == b"store":
            if len(fds) != 1 or len(data) > MAX_DATA_BYTES:
                return b"error store needs one fd and small data\n", None
            previous = self.kept.pop(name, None)
            if previous is not None:
                os.close(previous.fd)
            self.kept[name] = _Kept(fds[0], bytes(data))
            self.held_any = True
            _log(f"stored {name}")
            return b"ok\n", None
        if fds:
            return b"error unexpected fd\n", None
        kept = self.kept.get(name)
        if verb == b"fetch":
            if kept is None:
                return b"none\n", None
            _log(f"handed out {name}")
            return b"ok\n" + kept.data, kept.fd
        if verb == b"has":
            return (b"none\n" if kept is None else b"ok\n"), None
        if verb == b"drop":
            if kept is None:
                return b"none\n", None
            self._forget(name, "asked to")
            return b"ok\n", None
        return b"error unknown request\n", None

    def _forget(self, name: str, why: str) -> None:
        kept = self.kept.pop(name)
        os.close(kept.fd)
        _log(f"dropped {name} ({why})")

    def close(self) -> None:
        for name in list(self.kept):
            self._forget(name, "exiting")
        with contextlib.suppress(OSError):
            socket_path(self.root).unlink()
        self.listener.close()
        os.close(self.lock)  # last: a next keeper binds only once this one is gone


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sociable-fuse-keeper", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--root", required=True, help="the daemon's state directory")
    parser.add_argument(
        "--stay", action="store_true", help="never exit on its own (under a service manager)"
    )
    args = parser.parse_args(argv)
    root = Path(args.root)
    os.chdir("/")  # never keep a directory busy
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # SIGTERM/SIGINT stop the keeper (closing what it keeps): make that a clean exit.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        keeper = Keeper(root, stay=args.stay)
    except OSError as e:
        _log(f"cannot start: {e}")
        return 1
    keeper.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
