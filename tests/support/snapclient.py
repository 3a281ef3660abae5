"""Drive a real sociable-snapshotter over its gRPC socket, and mount what it returns.

- `SnapDaemon` / `run_daemon(base)`: the daemon as a subprocess with root
  `base/root` and socket `base/snap.sock`; readiness is the daemon's own
  sd_notify READY=1 on a NOTIFY_SOCKET the helper listens on (so this also
  exercises the notify path). `stop()` sends SIGTERM, `kill9()` crashes it.
- `SnapClient`: a typed wrapper of the Snapshots stub returning plain values;
  failures stay `grpc.RpcError` so tests can assert `.code()` and `.details()`.
- `mount_all` / `unmount` / `mounted`: perform the returned mounts for real
  like containerd's mounter, including its trick for overlay option strings
  longer than a page (chdir to the common lowerdir prefix, relative paths).
- Fixtures `snapd` (a fresh daemon per test) and `snap` (a client to it); not
  registered globally (tests.support.containerd imports this module): a test
  module opts in with `from tests.support.snapclient import snap, snapd`.

Everything here needs root for mounting; the daemon itself does not.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from snapshotter import mountinfo
from snapshotter.api import snapshots_pb2 as pb
from snapshotter.api import snapshots_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_SEC = 30.0
PAGE_BYTES = os.sysconf("SC_PAGESIZE")

KIND_NAMES = {1: "view", 2: "active", 3: "committed"}


@dataclass(frozen=True)
class MountSpec:
    """A containerd.types.Mount as returned by the daemon."""

    type: str
    source: str
    options: tuple[str, ...]


@dataclass(frozen=True)
class SnapInfo:
    """A snapshot Info; `kind` is "active", "view" or "committed"; times in ns."""

    name: str
    parent: str
    kind: str
    created_ns: int
    updated_ns: int
    labels: Mapping[str, str] = field(default_factory=dict)


def _info(pbi: pb.Info) -> SnapInfo:
    return SnapInfo(
        name=pbi.name,
        parent=pbi.parent,
        kind=KIND_NAMES.get(pbi.kind, f"unknown({pbi.kind})"),
        created_ns=pbi.created_at.seconds * 1_000_000_000 + pbi.created_at.nanos,
        updated_ns=pbi.updated_at.seconds * 1_000_000_000 + pbi.updated_at.nanos,
        labels=dict(pbi.labels),
    )


def _mounts(ms: Sequence[object]) -> list[MountSpec]:
    return [MountSpec(m.type, m.source, tuple(m.options)) for m in ms]  # type: ignore[attr-defined]


class SnapClient:
    """Typed client of one daemon socket; each method is one RPC.

    Raises grpc.RpcError exactly as the server answered.
    """

    def __init__(self, address: Path, snapshotter: str = "sociable") -> None:
        self.address = address
        self.snapshotter = snapshotter
        self.channel = grpc.insecure_channel(f"unix:{address}")
        self.stub = pb_grpc.SnapshotsStub(self.channel)

    def __repr__(self) -> str:
        return f"<SnapClient {str(self.address)!r}>"

    def close(self) -> None:
        self.channel.close()

    def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[MountSpec]:
        r = self.stub.Prepare(
            pb.PrepareSnapshotRequest(
                snapshotter=self.snapshotter, key=key, parent=parent, labels=labels or {}
            )
        )
        return _mounts(r.mounts)

    def view(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[MountSpec]:
        r = self.stub.View(
            pb.ViewSnapshotRequest(
                snapshotter=self.snapshotter, key=key, parent=parent, labels=labels or {}
            )
        )
        return _mounts(r.mounts)

    def wait_ready(self, name: str) -> None:
        """Wait until committed snapshot `name` (a layer the daemon took lazily) can be used:
        a view made on it and removed, as containerd's container snapshot would wait for a
        layer whose mount the daemon deferred until its zTOC is in."""
        key = f"wait-ready-{uuid.uuid4().hex}"
        self.view(key, name)
        self.remove(key)

    def mounts(self, key: str) -> list[MountSpec]:
        r = self.stub.Mounts(pb.MountsRequest(snapshotter=self.snapshotter, key=key))
        return _mounts(r.mounts)

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        self.stub.Commit(
            pb.CommitSnapshotRequest(
                snapshotter=self.snapshotter, name=name, key=key, labels=labels or {}
            )
        )

    def remove(self, key: str) -> None:
        self.stub.Remove(pb.RemoveSnapshotRequest(snapshotter=self.snapshotter, key=key))

    def stat(self, key: str) -> SnapInfo:
        r = self.stub.Stat(pb.StatSnapshotRequest(snapshotter=self.snapshotter, key=key))
        return _info(r.info)

    def update(
        self,
        name: str,
        labels: Mapping[str, str],
        paths: Sequence[str] = (),
        parent: str = "",
    ) -> SnapInfo:
        req = pb.UpdateSnapshotRequest(
            snapshotter=self.snapshotter,
            info=pb.Info(name=name, parent=parent, labels=dict(labels)),
        )
        req.update_mask.paths.extend(paths)
        return _info(self.stub.Update(req).info)

    def list(self, filters: Sequence[str] = ()) -> list[SnapInfo]:
        out: list[SnapInfo] = []
        for resp in self.stub.List(
            pb.ListSnapshotsRequest(snapshotter=self.snapshotter, filters=list(filters))
        ):
            out.extend(_info(i) for i in resp.info)
        return out

    def list_batches(self, filters: Sequence[str] = ()) -> list[int]:
        """Sizes of the streamed List messages (to check batching)."""
        return [
            len(r.info)
            for r in self.stub.List(
                pb.ListSnapshotsRequest(snapshotter=self.snapshotter, filters=list(filters))
            )
        ]

    def usage(self, key: str) -> tuple[int, int]:
        """(size in bytes, inodes)."""
        r = self.stub.Usage(pb.UsageRequest(snapshotter=self.snapshotter, key=key))
        return r.size, r.inodes

    def cleanup(self) -> None:
        self.stub.Cleanup(pb.CleanupRequest(snapshotter=self.snapshotter))


# ------------------------------------------------------------------ daemon


class SnapDaemonError(Exception):
    """The daemon did not start or stop as expected; the message has its log tail."""


@dataclass
class SnapDaemon:
    """A sociable-snapshotter subprocess. Use `run_daemon` for automatic cleanup."""

    root: Path
    address: Path
    log: Path
    config: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    ready_ns: int = 0

    def start(self, timeout_sec: float = START_TIMEOUT_SEC) -> None:
        """Start and wait for READY=1. Raises SnapDaemonError with the log tail."""
        notify_dir = Path(tempfile.mkdtemp(prefix="snapd-notify-"))
        notify_path = notify_dir / "n.sock"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env["NOTIFY_SOCKET"] = str(notify_path)
        cmd = [
            sys.executable,
            "-m",
            "snapshotter.cli",
            "--address",
            str(self.address),
            "--root",
            str(self.root),
            "--log-level",
            "debug",
        ]
        if self.config is not None:
            cmd += ["--config", str(self.config)]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(str(notify_path))
            notify.settimeout(0.2)
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(
                    cmd,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    cwd=REPO,
                )
            deadline = time.monotonic() + timeout_sec
            try:
                while True:
                    if self.proc.poll() is not None:
                        raise SnapDaemonError(
                            f"daemon exited with {self.proc.returncode}\n{self.log_tail()}"
                        )
                    if time.monotonic() > deadline:
                        self.kill9()
                        raise SnapDaemonError(
                            f"daemon not ready in {timeout_sec}s\n{self.log_tail()}"
                        )
                    try:
                        msg = notify.recv(4096)
                    except TimeoutError:
                        continue
                    if b"READY=1" in msg.split(b"\n"):
                        self.ready_ns = time.monotonic_ns()
                        break
            finally:
                notify_path.unlink(missing_ok=True)
                notify_dir.rmdir()

    def stop(self, timeout_sec: float = 20.0) -> int:
        """SIGTERM and wait; returns the exit status. Raises SnapDaemonError on timeout."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_sec)
            except subprocess.TimeoutExpired as e:
                self.kill9()
                raise SnapDaemonError(f"daemon ignored SIGTERM\n{self.log_tail()}") from e
        return self.proc.returncode

    def kill9(self) -> None:
        """SIGKILL and reap. Idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def client(self) -> SnapClient:
        return SnapClient(self.address)


@contextlib.contextmanager
def run_daemon(base: Path, config: Path | None = None) -> Iterator[SnapDaemon]:
    """A started daemon under `base`; stopped (SIGTERM, then SIGKILL) and mounts under
    `base` swept on exit, even when the body fails."""
    base.mkdir(parents=True, exist_ok=True)
    d = SnapDaemon(
        root=base / "root", address=base / "snap.sock", log=base / "daemon.log", config=config
    )
    d.start()
    try:
        yield d
    finally:
        try:
            d.stop()
        finally:
            d.kill9()
            sweep_mounts(base)


# ------------------------------------------------------------------ mounting


def _run(cmd: Sequence[str], cwd: Path | None = None) -> None:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise OSError(f"{' '.join(cmd)!r} failed ({r.returncode}): {r.stderr.strip()}")


def _compact_lowerdir(options: Sequence[str]) -> tuple[list[str], Path | None]:
    """containerd's long-option trick: relative lowerdirs from their common parent dir."""
    joined = ",".join(options)
    if len(joined) < PAGE_BYTES - 512:
        return list(options), None
    lower_idx = next((i for i, o in enumerate(options) if o.startswith("lowerdir=")), None)
    if lower_idx is None:
        return list(options), None
    dirs = options[lower_idx][len("lowerdir=") :].split(":")
    common = Path(os.path.commonpath(dirs))
    if len(dirs) == 1:
        common = common.parent
    rel = ":".join(os.path.relpath(d, common) for d in dirs)
    out = list(options)
    out[lower_idx] = f"lowerdir={rel}"
    return out, common


def mount_all(mounts: Sequence[MountSpec], target: Path) -> None:
    """Mount each spec on `target` in order (real mount(8)). Raises OSError."""
    for m in mounts:
        if m.type == "bind":
            _run(["mount", "-t", "none", "-o", ",".join(m.options), m.source, str(target)])
        elif m.type == "overlay":
            options, cwd = _compact_lowerdir(m.options)
            _run(
                ["mount", "-t", "overlay", "-o", ",".join(options), m.source, str(target)], cwd=cwd
            )
        else:
            raise OSError(f"unsupported mount type {m.type!r}")


def unmount(target: Path) -> None:
    """Unmount everything stacked on `target`. Raises OSError if it stays busy."""
    for _ in range(8):
        r = subprocess.run(["umount", str(target)], capture_output=True, check=False)
        if r.returncode != 0:
            return
    raise OSError(f"{target} still mounted")


@contextlib.contextmanager
def mounted(mounts: Sequence[MountSpec], target: Path) -> Iterator[Path]:
    """Mount on `target` (created if missing) for the body, always unmount after."""
    target.mkdir(parents=True, exist_ok=True)
    mount_all(mounts, target)
    try:
        yield target
    finally:
        unmount(target)


def sweep_mounts(base: Path) -> None:
    """Lazily unmount every mount point under `base`, deepest first."""
    root = base.resolve()
    points = [m.mountpoint for m in mountinfo.mounts_under(root) if m.mountpoint != str(root)]
    for mp in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True, check=False)


def can_mount() -> str | None:
    """None if real mounts work here, else the reason they do not."""
    if os.geteuid() != 0:
        return "needs root to mount"
    try:
        with open("/proc/filesystems") as f:
            if "overlay" not in f.read():
                return "overlay filesystem not available in this kernel"
    except OSError as e:
        return f"cannot read /proc/filesystems: {e}"
    return None


# ------------------------------------------------------------------ fixtures


@pytest.fixture
def snapd(tmp_path: Path) -> Iterator[SnapDaemon]:
    """A fresh daemon (own root and socket under tmp_path) for one test."""
    with run_daemon(tmp_path / "snapd") as d:
        yield d


@pytest.fixture
def snap(snapd: SnapDaemon) -> Iterator[SnapClient]:
    """A client of the `snapd` daemon."""
    c = snapd.client()
    try:
        yield c
    finally:
        c.close()
