"""Layer trees built from zTOC bytes, in worker processes off the daemon's interpreter.

`build_light` is the whole job: decode a zTOC and build its `LayerTree`, returning it with the
reader's zTOC without file entries (`Ztoc` with `files=()`). It is pure Python: about 0.4 s
of CPU for a layer of 54k files, all of it holding the interpreter lock. Built in the
daemon's own threads, a large tree stalls whatever else the daemon does meanwhile (gRPC
answers to containerd, the other zTOC downloads, FUSE requests of running containers) and
two trees built at once share one core's worth of interpreter.

`TreeProcesses` runs `build_light` in up to `processes` worker processes instead: each is
`python -m snapshotter.remote.treeprocs` (a fresh interpreter, never a fork of the daemon with
its threads and FUSE sessions) in a session of its own (a terminal's Ctrl-C does not reach
it), answering one request at a time on its stdin and stdout: a length-prefixed pickle of
the zTOC's bytes in, of the result out (compact arrays: about 10 MB and a few milliseconds
to unpickle for 54k files). A worker exits when its stdin closes, so workers never outlive
the daemon, however it ends. Workers start with `start` (the catalog calls it once an
image's index is found, while its zTOCs download: starting takes 0.15-0.4 s) or with the
first build, and stop once no build used them for `idle_sec` (each keeps 30-40 MB idle and
peaks at about 100 MB building a tree of 100k entries: `tests.bench.bench_memory`).

A build a worker cannot do (it died or answered garbage, it cannot be started, the pool is
closed) returns None and the caller builds in its own thread; that worker is gone and the
next build starts a fresh one. After `MAX_FAILURES` such failures in a row the workers are
given up for the daemon's lifetime (one warning).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO, Final, cast

from index.model import FileMetadata, Ztoc
from index.ztoc_codec import ZtocError, ZtocView
from snapshotter.fs import LayerTree, build_tree
from snapshotter.fs.errors import FsError

from .errors import MountError
from .heap import release_free_memory

log = logging.getLogger(__name__)

DEFAULT_PROCESSES: Final = 2
DEFAULT_IDLE_SEC: Final = 60.0
"""How long the workers stay after the last build, in seconds."""
MAX_FAILURES: Final = 3
"""Worker failures in a row after which builds stay in the daemon."""
EXIT_WAIT_SEC: Final = 2.0
"""How long a stopping worker may take to exit before it is killed."""

_LENGTH = struct.Struct("<Q")
_HELLO: Final = b"\x01"
"""What a worker writes once it has imported everything: it is ready."""

Built = tuple[Ztoc, LayerTree]


def build_light(data: bytes, *, userxattr: bool) -> Built:
    """Blocking: decode zTOC `data` and build its tree. Raises ZtocError or FsError."""
    view = ZtocView(data)
    tree = build_tree(cast(Sequence[FileMetadata], view), userxattr=userxattr)
    light = Ztoc(
        version=view.version,
        build_tool_identifier=view.build_tool_identifier,
        compressed_archive_size=view.compressed_archive_size,
        uncompressed_archive_size=view.uncompressed_archive_size,
        files=(),
        compression=view.compression,
    )
    return light, tree


def _send(stream: IO[bytes], message: object) -> None:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LENGTH.pack(len(payload)))
    stream.write(payload)
    stream.flush()


def _receive(stream: IO[bytes]) -> object:
    """The next message; EOFError when the stream ends (cleanly or not)."""
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        raise EOFError("the stream ended")
    (size,) = _LENGTH.unpack(head)
    payload = stream.read(size)
    if len(payload) < size:
        raise EOFError("the stream ended inside a message")
    return pickle.loads(payload)


def serve(requests: IO[bytes], answers: IO[bytes]) -> None:
    """The worker's loop: `(data, userxattr)` in, `("ok", Built)` or `("error", message)` out,
    until `requests` ends."""
    while True:
        try:
            data, userxattr = cast(tuple[bytes, bool], _receive(requests))
        except EOFError:
            return
        try:
            answer: tuple[str, object] = ("ok", build_light(data, userxattr=userxattr))
        except (ZtocError, FsError) as e:
            answer = ("error", str(e))
        del data
        _send(answers, answer)
        del answer
        release_free_memory()


class _Worker:
    """One worker process and its pipes; used by one thread at a time."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", __name__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        self._ready = False

    def ready(self) -> bool:
        """Whether it has started (its hello is in), without blocking. Raises OSError or
        EOFError when it failed."""
        if not self._ready:
            stdout = cast(IO[bytes], self.proc.stdout)
            if select.select([stdout], [], [], 0)[0]:
                self._hello(stdout)
        return self._ready

    def _hello(self, stdout: IO[bytes]) -> None:
        hello = stdout.read(len(_HELLO))
        if hello != _HELLO:
            raise EOFError(f"the worker said {hello!r} at start")
        self._ready = True

    def call(self, data: bytes, userxattr: bool) -> Built | str:
        """Blocking (waits for the worker to start). Raises OSError, EOFError or
        pickle.UnpicklingError when the worker fails (the caller then stops it)."""
        stdout = cast(IO[bytes], self.proc.stdout)
        if not self._ready:
            self._hello(stdout)
        _send(cast(IO[bytes], self.proc.stdin), (data, userxattr))
        answer = _receive(stdout)
        match answer:
            case ("ok", (Ztoc() as light, LayerTree() as tree)):
                return light, tree
            case ("error", str() as message):
                return message
        raise pickle.UnpicklingError(f"unexpected answer {type(answer).__name__}")

    def stop(self) -> None:
        """Close its stdin (it exits), kill it when it does not. Never raises."""
        with contextlib.suppress(OSError):
            cast(IO[bytes], self.proc.stdin).close()
        try:
            self.proc.wait(EXIT_WAIT_SEC)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        with contextlib.suppress(OSError):
            cast(IO[bytes], self.proc.stdout).close()


class TreeProcesses:
    """`build_light` in worker processes (see the module doc). Thread-safe."""

    def __init__(
        self, processes: int = DEFAULT_PROCESSES, *, idle_sec: float = DEFAULT_IDLE_SEC
    ) -> None:
        self.processes = max(1, processes)
        self.idle_sec = idle_sec
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._count = 0
        """Workers alive: idle ones and those in a build."""
        self._last_used = 0.0
        self._failures = 0
        self._closed = False
        self.builds = 0
        """Builds the workers did (a zTOC that did not build included)."""
        self.fallbacks = 0
        """Builds the workers could not do (the caller built them itself)."""

    def __repr__(self) -> str:
        return (
            f"<TreeProcesses processes={self.processes} running={self._count} "
            f"builds={self.builds} fallbacks={self.fallbacks}>"
        )

    @property
    def running(self) -> int:
        """Worker processes alive."""
        return self._count

    def pids(self) -> list[int]:
        """Process ids of the idle workers."""
        with self._cond:
            return [w.proc.pid for w in self._idle]

    def statistics(self) -> dict[str, object]:
        """What status.json shows as `treeWorkers`."""
        return {
            "processes": self.processes,
            "running": self._count,
            "builds": self.builds,
            "fallbacks": self.fallbacks,
        }

    def start(self) -> None:
        """Blocking (briefly): start the missing workers now, so that the first builds do not
        wait for them. Never raises (a failure shows in the next build)."""
        with self._cond:
            if self._closed or self._failures >= MAX_FAILURES:
                return
            missing = self.processes - self._count
            self._count += missing
            self._last_used = time.monotonic()
        for _ in range(missing):
            worker = self._spawn()
            with self._cond:
                if worker is None:
                    self._count -= 1
                else:
                    self._idle.append(worker)
                self._cond.notify()

    def build(self, data: bytes, *, userxattr: bool, wait: bool = True) -> Built | None:
        """Blocking: `build_light` in a worker; with `wait`, for one that is starting or busy,
        else only in one that is started and idle. None when the workers cannot do it or
        `wait` is False and none is ready (the caller builds itself). Raises MountError for
        a zTOC that does not decode or build."""
        worker = self._checkout(wait)
        if worker is None:
            return None
        try:
            outcome = worker.call(data, userxattr)
        except (OSError, EOFError, pickle.UnpicklingError, ValueError) as e:
            self._failed(worker, e)
            return None
        self._checkin(worker)
        if isinstance(outcome, str):
            raise MountError(outcome)
        return outcome

    def seconds_to_idle(self) -> float | None:
        """Seconds until the workers count as idle (0 when they do), None when none runs."""
        with self._cond:
            if not self._count:
                return None
            if len(self._idle) < self._count:
                return self.idle_sec  # a build is under way
            return max(0.0, self._last_used + self.idle_sec - time.monotonic())

    def close_if_idle(self) -> bool:
        """Stop the workers when no build used them for `idle_sec`. Returns whether none runs
        now. Never raises."""
        with self._cond:
            if not self._count:
                return True
            idle = len(self._idle) == self._count
            if not idle or time.monotonic() - self._last_used < self.idle_sec:
                return False
            stopping, self._idle = self._idle, []
            self._count = 0
        for worker in stopping:
            worker.stop()
        log.debug("tree worker processes stopped (idle)", extra={"workers": len(stopping)})
        return True

    def close(self) -> None:
        """Stop the workers for good; later builds return None. Blocks until the idle ones
        exited (builds still running stop theirs when they end). Never raises."""
        with self._cond:
            self._closed = True
            stopping, self._idle = self._idle, []
            self._count -= len(stopping)
            self._cond.notify_all()
        for worker in stopping:
            worker.stop()

    def _spawn(self) -> _Worker | None:
        try:
            return _Worker()
        except OSError as e:
            self._note_failure(e)
            return None

    def _checkout(self, wait: bool) -> _Worker | None:
        failed: list[tuple[_Worker, BaseException]] = []
        try:
            with self._cond:
                while True:
                    if self._closed or self._failures >= MAX_FAILURES:
                        self.fallbacks += 1
                        return None
                    worker = self._ready_worker(failed)
                    if worker is not None:
                        return worker
                    if not wait:
                        return None
                    if self._idle:
                        return self._idle.pop()
                    if self._count < self.processes:
                        self._count += 1
                        break
                    self._cond.wait()
        finally:
            for worker, error in failed:
                worker.stop()
                self._note_failure(error)
        worker = self._spawn()
        if worker is None:
            with self._cond:
                self._count -= 1
                self.fallbacks += 1
                self._cond.notify()
        return worker

    def _ready_worker(self, failed: list[tuple[_Worker, BaseException]]) -> _Worker | None:
        """With the lock held: an idle worker that has started; those that failed at start
        are taken out into `failed`."""
        for worker in list(reversed(self._idle)):
            try:
                ready = worker.ready()
            except (OSError, EOFError) as e:
                self._idle.remove(worker)
                self._count -= 1
                failed.append((worker, e))
                continue
            if ready:
                self._idle.remove(worker)
                return worker
        return None

    def _checkin(self, worker: _Worker) -> None:
        with self._cond:
            self.builds += 1
            self._failures = 0
            self._last_used = time.monotonic()
            if self._closed:
                self._count -= 1
            else:
                self._idle.append(worker)
                self._cond.notify()
                return
        worker.stop()

    def _failed(self, worker: _Worker, error: BaseException) -> None:
        worker.stop()
        with self._cond:
            self._count -= 1
            self.fallbacks += 1
            self._cond.notify()
        self._note_failure(error)

    def _note_failure(self, error: BaseException) -> None:
        with self._cond:
            self._failures += 1
            given_up = self._failures == MAX_FAILURES
        if self._closed:
            return
        log.warning(
            "tree worker process failed"
            + ("; every tree is built in the daemon from now on" if given_up else ""),
            extra={"error": repr(error)},
        )


def _main() -> None:
    """The worker process: answers go to a private copy of stdout, and whatever else would
    print to stdout goes to stderr instead of into the answers."""
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    answers.write(_HELLO)
    answers.flush()
    serve(sys.stdin.buffer, answers)


if __name__ == "__main__":
    _main()
