"""Running containers keep their lazy layers across daemon restarts, crashes and upgrades.

A real container (containerd 1.6 CRI + runc) from a lazily pulled indexed image runs a loop
that checksums files of its lazy layers and reads one file it keeps open in 64 KiB pieces
(checksumming each piece), writing every result with a timestamp to a log on the host. The
page cache of those files is dropped before each restart, so the reads around it go
through FUSE. The test
restarts the daemon while the loop runs: `kill -9` at seeded random moments (at least five
times, and twice more a `kill -9` of the next daemon in the middle of its start-up), one
graceful restart (SIGTERM) and one restart into a fresh copy of the code (the source
packages copied to a temporary directory, run from there with PYTHONPATH). After each
restart a new indexed image is pulled lazily and a container of it reads its file right.
At the end: every checksum in the log is right, no read failed, and the loop never went
more than `SLACK_SEC` without a result except while no daemon served (from a kill to the
next READY), and then not longer than `SLACK_SEC` after it.

A read the daemon has taken but not answered when it is killed or stopped (its Range request
held by the registry proxy) is answered by the next daemon: the kernel resends it
(`FUSE_NOTIFY_RESEND`), the container gets the right bytes.

A keeper killed while the daemon runs is replaced: within seconds a new keeper holds the
connection (the daemon hands it over again), and a `kill -9` after that is survived.

Then the keeper is killed together with the daemon: the next daemon finds the FUSE mount
dead, clears it and the bind mounts, and lazy pulls work again.

The seed is printed; rerun with ``SOCIABLE_RESTART_SEED=<seed>`` to replay a run.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapshotter.fs import keeper
from snapshotter.mountinfo import mount_at, mounts_under
from tests.support import images
from tests.support.cli import sociable
from tests.support.containerd import (
    Containerd,
    PushedImages,
    require_containerd,
    start_containerd,
)
from tests.support.registry import RegistryServer, start_proxy
from tests.support.snapclient import SnapDaemon, run_daemon

pytestmark = [pytest.mark.root, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
K8S = "k8s.io"
KILLS = 5
STARTUP_KILLS = 2
SMALL_IMAGES = KILLS + STARTUP_KILLS + 3
PIECE = 65536
SLACK_SEC = 5.0
"""The loop may go without a line while no daemon serves (a restart: the daemon's start-up,
two to three seconds here), and at most this much longer."""
SUMMED = ("os.py", "json/decoder.py", "email/message.py", "typing.py", "argparse.py")
OPEN_FILE = "usr/lib/python3.11/_bulk_padding.bin"


def _seed() -> int:
    raw = os.environ.get("SOCIABLE_RESTART_SEED")
    seed = int(raw) if raw else random.SystemRandom().randrange(1 << 32)
    print(f"\nrestart survival seed: {seed} (SOCIABLE_RESTART_SEED={seed} replays it)")
    return seed


@dataclass(frozen=True)
class Pushed:
    image: images.Image
    lazy_ref: str
    small: list[tuple[str, str]]  # (ref, sha256 of /data/unique.bin)
    registry: RegistryServer
    pause_ref: str


@pytest.fixture(scope="module")
def pushed(
    registry: RegistryServer, pushed_images: PushedImages, tmp_path_factory: pytest.TempPathFactory
) -> Pushed:
    """The bulk image and `SMALL_IMAGES` small ones (a unique 200 KB layer each over busybox),
    all converted (SOCI v2) into the registry."""
    require_containerd()
    base = tmp_path_factory.mktemp("survival-images")
    image = images.bulk_image()
    lazy_ref = f"{registry.host}/survival/bulk:v1-soci"
    sociable(
        "convert",
        "--min-layer-size",
        "100000",
        f"oci-layout:{image.layout}:{image.tag}",
        lazy_ref,
        root=base / "convert-root",
    )
    small = []
    for i in range(SMALL_IMAGES):
        data = hashlib.sha256(f"unique {i}".encode()).digest() * (200_000 // 32)
        layout = images.write_oci_layout(
            base / f"small{i}",
            [images.busybox_layer(), [images.File(path="data/unique.bin", data=data)]],
            tag="v1",
        )
        ref = f"{registry.host}/survival/small{i}:v1-soci"
        sociable(
            "convert",
            "--min-layer-size",
            "100000",
            f"oci-layout:{layout.layout}:{layout.tag}",
            ref,
            root=base / "convert-root",
        )
        small.append((ref, hashlib.sha256(data).hexdigest()))
    return Pushed(image, lazy_ref, small, registry, pushed_images.pause_ref)


def _layer_sums(image: images.Image) -> tuple[dict[str, str], list[str]]:
    """sha256 of the `SUMMED` files and of each `PIECE` of `OPEN_FILE`, from the layer."""
    want = {f"usr/lib/python3.11/{p}" for p in SUMMED}
    sums: dict[str, str] = {}
    pieces: list[str] = []
    with gzip.open(image.layers[-1].path) as gz, tarfile.open(fileobj=gz, mode="r|") as tf:
        for m in tf:
            name = m.name.lstrip("./")
            if m.isreg() and (name in want or name == OPEN_FILE):
                f = tf.extractfile(m)
                assert f is not None
                if name == OPEN_FILE:
                    while piece := f.read(PIECE):
                        pieces.append(hashlib.sha256(piece).hexdigest())
                else:
                    sums["/" + name] = hashlib.sha256(f.read()).hexdigest()
    assert len(sums) == len(want) and pieces
    return sums, pieces


LOOP = r"""
files="{files}"
exec 3< /{open_file}
n=0
while :; do
  for f in $files; do
    if s=$(sha256sum $f 2>&1); then echo "$(cut -d' ' -f1 /proc/uptime) SUM $s"
    else echo "$(cut -d' ' -f1 /proc/uptime) ERR $f $s"; fi
  done
  if p=$(dd bs={piece} count=1 <&3 2>/dev/null | sha256sum); then
    echo "$(cut -d' ' -f1 /proc/uptime) PIECE $n $p"
  else echo "$(cut -d' ' -f1 /proc/uptime) ERR piece $n"; fi
  n=$((n+1))
  [ $n -ge {pieces} ] && {{ exec 3< /{open_file}; n=0; }}
  sleep 0.1
done >> /out/loop.log 2>&1
"""


def _evict(root: Path) -> int:
    """Drop the page cache of the files the loop reads (through the FUSE mount: the
    container's overlay reads the same inodes), so its reads around a restart go through
    FUSE. Returns how many files."""
    layer = next((root / "fuse").glob("snap-*/usr/lib/python3.11/os.py")).parents[3]
    names = [*(f"usr/lib/python3.11/{f}" for f in SUMMED), OPEN_FILE]
    for name in names:
        fd = os.open(layer / name, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return len(names)


def _uptime() -> float:
    """The clock of the loop's timestamps (`/proc/uptime`), in seconds."""
    return float(Path("/proc/uptime").read_text().split()[0])


def _wait_lines(log: Path, more_than: int, timeout_s: float = 60.0) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        n = len(log.read_text(errors="replace").splitlines()) if log.exists() else 0
        if n > more_than:
            return n
        assert time.monotonic() < deadline, f"the loop wrote nothing new in {timeout_s} s"
        time.sleep(0.2)


def _start_from(
    daemon: SnapDaemon, code: Path, kill_after: float | None = None, kill_at: str = ""
) -> str:
    """Start `daemon` from the copy of the source at `code` (its packages on PYTHONPATH, run
    from there) and wait for READY=1 ("ready"). With `kill_after`, `kill -9` it that many
    seconds into its start-up, or as soon as its log has a line with message `kill_at`
    ("killed"; "ready" when it was ready first)."""
    log_start = daemon.log.stat().st_size if daemon.log.exists() else 0
    notify_dir = Path(tempfile.mkdtemp(prefix="snapd-notify-"))
    notify_path = notify_dir / "n.sock"
    env = {**os.environ, "PYTHONPATH": str(code), "NOTIFY_SOCKET": str(notify_path)}
    cmd = [sys.executable, "-m", "snapshotter.cli", "--address", str(daemon.address)]
    cmd += ["--root", str(daemon.root), "--log-level", "debug"]
    if daemon.config is not None:
        cmd += ["--config", str(daemon.config)]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(0.005 if kill_at else 0.2)  # the log is polled between waits
        with open(daemon.log, "ab") as log:
            daemon.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=code,
            )
        deadline = time.monotonic() + (30 if kill_after is None else kill_after)
        try:
            while True:
                if kill_after is not None and time.monotonic() > deadline:
                    daemon.kill9()
                    return "killed"
                if kill_at:
                    with open(daemon.log, "rb") as f:
                        f.seek(log_start)
                        if f'"msg": "{kill_at}"'.encode() in f.read():
                            daemon.kill9()
                            return "killed"
                assert daemon.proc.poll() is None, daemon.log_tail()
                assert time.monotonic() < deadline, daemon.log_tail()
                with contextlib.suppress(TimeoutError):
                    if b"READY=1" in notify.recv(4096).split(b"\n"):
                        if kill_after is not None or kill_at:
                            daemon.kill9()
                        return "ready"
        finally:
            notify_path.unlink(missing_ok=True)
            notify_dir.rmdir()


def _events(daemon: SnapDaemon) -> list[dict[str, object]]:
    out = []
    for line in daemon.log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def _wait_containerd(ctd: Containerd) -> None:
    deadline = time.monotonic() + 30
    while True:
        res = ctd.ctr("snapshots", "--snapshotter", "sociable", "ls", namespace=K8S, check=False)
        if res.returncode == 0:
            return
        assert time.monotonic() < deadline, res.stderr
        time.sleep(0.3)


def _pull(ctd: Containerd, ref: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "index.cli", "pull", "--address", str(ctd.address), ref],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


@contextlib.contextmanager
def _stack(
    pushed: Pushed, base: Path, hosts: tuple[str, ...] = (), remote: str = ""
) -> Iterator[tuple[SnapDaemon, Containerd]]:
    base.mkdir(parents=True, exist_ok=True)
    config = base / "sociable.toml"
    config.write_text(f'[remote]\nhosts_dir = ""\nbackground_fetch = false\n{remote}')
    with (
        run_daemon(base / "sociable", config=config) as daemon,
        start_containerd(
            base / "containerd",
            proxy_address=daemon.address,
            registry_hosts=[*hosts, pushed.registry.host],
            sandbox_image=pushed.pause_ref,
        ) as ctd,
    ):
        try:
            yield daemon, ctd
        finally:
            # What the daemon keeps for its next start goes with it (the test's own root).
            with contextlib.suppress(Exception):
                ctd.ctr("task", "kill", "-s", "SIGKILL", "loop", namespace=K8S, check=False)
            daemon.stop()
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "snapshotter.cli",
                    "--root",
                    str(daemon.root),
                    "cleanup-mounts",
                ],
                cwd=REPO,
                capture_output=True,
                check=False,
                timeout=60,
            )


def _run_loop(ctd: Containerd, ref: str, out: Path, sums: dict[str, str], pieces: int) -> None:
    script = LOOP.format(files=" ".join(sums), open_file=OPEN_FILE, piece=PIECE, pieces=pieces)
    ctd.ctr(
        "run",
        "-d",
        "--runc-root",
        str(ctd.paths.state / "runc"),
        "--snapshotter",
        "sociable",
        "--mount",
        f"type=bind,src={out},dst=/out,options=rbind:rw",
        ref,
        "loop",
        "/bin/sh",
        "-c",
        script,
        namespace=K8S,
    )


def _check_log(
    log: Path, sums: dict[str, str], pieces: list[str], down: list[tuple[float, float]]
) -> tuple[int, float]:
    """Asserts every line right and no gap between two lines longer than `SLACK_SEC` unless
    it overlaps one of the `down` windows (uptime seconds from a kill to the next daemon's
    READY) and ends within `SLACK_SEC` of that window's end; returns (lines, the longest
    gap in s)."""
    last = None
    longest = 0.0
    lines = log.read_text(errors="replace").splitlines()
    for line in lines:
        parts = line.split()
        assert len(parts) >= 3 and parts[1] in ("SUM", "PIECE"), f"read failure: {line}"
        at = float(parts[0])
        if last is not None:
            longest = max(longest, at - last)
            if at - last > SLACK_SEC:
                explained = any(
                    last <= end and at >= start and at - end <= SLACK_SEC for start, end in down
                )
                assert explained, f"the loop stalled {at - last:.1f} s with a daemon serving"
        last = at
        if parts[1] == "SUM":
            assert sums[parts[3]] == parts[2], line
        else:
            assert pieces[int(parts[2])] == parts[3], line
    return len(lines), longest


def test_running_container_survives_restarts(pushed: Pushed, tmp_path: Path) -> None:
    rng = random.Random(_seed())
    sums, pieces = _layer_sums(pushed.image)
    out = tmp_path / "out"
    out.mkdir()
    log = out / "loop.log"
    code = tmp_path / "code"
    for package in ("index", "snapshotter"):
        shutil.copytree(
            REPO / package, code / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    with _stack(pushed, tmp_path / "stack") as (daemon, ctd):
        _pull(ctd, pushed.lazy_ref)
        _run_loop(ctd, pushed.lazy_ref, out, sums, len(pieces))
        seen = _wait_lines(log, 0)
        kinds = ["kill"] * KILLS + ["startup-kill"] * STARTUP_KILLS + ["graceful", "upgrade"]
        rng.shuffle(kinds)
        stalls = []
        down: list[tuple[float, float]] = []
        startup_kills = 0
        for i, kind in enumerate(kinds):
            time.sleep(rng.uniform(0.2, 2.5))
            _evict(daemon.root)
            t0 = time.monotonic()
            down_from = _uptime()
            if kind == "kill":
                daemon.kill9()
                daemon.start()
            elif kind == "startup-kill":
                daemon.kill9()
                # Once at a random moment of the start-up, once right after the adoption.
                startup_kills += 1
                start_sec = min(stalls) if stalls else 0.5  # a whole start-up, about
                after = rng.uniform(0.1, 0.9) * start_sec if startup_kills % 2 else None
                at = "" if after is not None else "fuse connection adopted"
                kind += f" ({_start_from(daemon, REPO, kill_after=after, kill_at=at)}"
                kind += f" {'at ' + at if at else f'after {after:.2f} s'})"
                daemon.start()
            elif kind == "graceful":
                assert daemon.stop() == 0
                daemon.start()
            else:
                daemon.stop()
                _start_from(daemon, code)
            stalls.append(time.monotonic() - t0)
            down.append((down_from, _uptime()))
            _wait_containerd(ctd)
            seen = _wait_lines(log, seen)
            ref, want = pushed.small[i]
            _pull(ctd, ref)
            output = ctd.run(
                ref, f"new-{i}", "/bin/sh", "-c", "sha256sum /data/unique.bin", namespace=K8S
            )
            assert output.split()[0] == want, output
            print(f"round {i}: {kind}, daemon back in {stalls[-1]:.2f} s, new image read right")
        seen = _wait_lines(log, seen + 2 * len(SUMMED))
        ctd.ctr("task", "kill", "-s", "SIGKILL", "loop", namespace=K8S, check=False)
        events = _events(daemon)
    lines, longest = _check_log(log, sums, pieces, down)
    adopted = [e for e in events if e.get("msg") == "fuse connection adopted"]
    print(
        f"{lines} results, all right; longest gap between two {longest:.2f} s; "
        f"{len(adopted)} adoptions, layers adopted: {[e.get('layers') for e in adopted]}"
    )
    print(f"longest restart {max(stalls):.2f} s")
    assert len(adopted) >= len(kinds)  # a daemon killed in its start-up may have adopted too
    assert all(int(str(e.get("layers"))) >= 3 for e in adopted)
    assert lines > 10 * len(kinds)


def _passthrough(root: Path, timeout_s: float = 20.0, **at_least: int) -> dict[str, object]:
    """The `passthrough` section of the daemon's status once each counter named in `at_least`
    (`copies`, `ids`) reaches its value."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError, ValueError):
            section = json.loads((root / "status.json").read_text()).get("passthrough") or {}
            if all(int(section.get(k, 0)) >= v for k, v in at_least.items()):
                return dict(section)
        assert time.monotonic() < deadline, f"passthrough never reached {at_least}"
        time.sleep(0.2)


def test_a_file_passed_through_is_opened_again_after_restarts(
    pushed: Pushed, tmp_path: Path
) -> None:
    """FUSE passthrough across restarts. A file the first daemon passed through and that is
    held open is opened again, with the right bytes, under the daemon after a `kill -9` and
    after a graceful restart: the next daemon answers it with the journaled backing id (the
    kernel fails any other answer, EIO, while the file is held open) and other files cached."""
    sums, _ = _layer_sums(pushed.image)
    remote = "passthrough_min_file_bytes = 4096\n"
    with _stack(pushed, tmp_path / "stack", remote=remote) as (daemon, ctd):
        _pull(ctd, pushed.lazy_ref)
        layer = next((daemon.root / "fuse").glob("snap-*/usr/lib/python3.11/os.py")).parents[3]
        passed, other = (f"usr/lib/python3.11/{p}" for p in ("os.py", "json/decoder.py"))
        for _ in range(2):  # a file that comes back is copied
            read = (layer / passed).read_bytes()
            assert hashlib.sha256(read).hexdigest() == sums["/" + passed]
        _passthrough(daemon.root, copies=1)
        with open(layer / passed, "rb") as held:  # this open is passed through
            assert _passthrough(daemon.root, ids=1)["ids"] == 1
            for how in ("kill -9", "graceful"):
                if how == "kill -9":
                    daemon.kill9()
                else:
                    assert daemon.stop() == 0
                daemon.start()
                again = hashlib.sha256((layer / passed).read_bytes()).hexdigest()
                assert again == sums["/" + passed], f"after {how}"
                held.seek(0)
                assert hashlib.sha256(held.read()).hexdigest() == sums["/" + passed], how
                read = (layer / other).read_bytes()
                assert hashlib.sha256(read).hexdigest() == sums["/" + other], how
                section = _passthrough(daemon.root, ids=1)
                assert "adopted" in str(section["copyOff"]), section


def test_keeper_killed_too_clears_the_dead_mount(pushed: Pushed, tmp_path: Path) -> None:
    with _stack(pushed, tmp_path / "stack") as (daemon, ctd):
        _pull(ctd, pushed.lazy_ref)
        before = ctd.run(
            pushed.lazy_ref,
            "first",
            "/bin/sh",
            "-c",
            "sha256sum /usr/lib/python3.11/os.py",
            namespace=K8S,
        )
        pid = keeper.ping(daemon.root)
        assert pid is not None
        fuse = daemon.root / "fuse"
        old = mount_at(fuse)
        assert old is not None and old.fstype == "fuse.sociable"
        binds = len(mounts_under(daemon.root / "snapshots"))
        assert binds >= 3
        daemon.kill9()
        os.kill(pid, signal.SIGKILL)
        daemon.start()
        _wait_containerd(ctd)
        # The kernel reuses dead mounts' device numbers and mount ids: count the mounts. Left
        # behind, the dead ones would be under the new ones (twice as many).
        at_fuse = [m for m in mounts_under(fuse) if m.mountpoint == str(fuse)]
        assert len(at_fuse) == 1 and at_fuse[0].fstype == "fuse.sociable"
        assert len(mounts_under(daemon.root / "snapshots")) == binds
        assert len(os.listdir(fuse)) == binds  # a dead mount would answer ENOTCONN
        assert not any(e.get("msg") == "fuse connection adopted" for e in _events(daemon))
        after = ctd.run(
            pushed.lazy_ref,
            "second",
            "/bin/sh",
            "-c",
            "sha256sum /usr/lib/python3.11/os.py",
            namespace=K8S,
        )
        assert after.split()[0] == before.split()[0]
        ref, want = pushed.small[-1]
        _pull(ctd, ref)
        output = ctd.run(ref, "new", "/bin/sh", "-c", "sha256sum /data/unique.bin", namespace=K8S)
        assert output.split()[0] == want
        # The explicit teardown: refused while the daemon runs; after a stop (which keeps
        # the mounts: lazy layers are mounted) it leaves no mount and no keeper.
        assert _cleanup_mounts(daemon).returncode == 3
        assert daemon.stop() == 0
        pid = keeper.ping(daemon.root)
        assert pid is not None and mounts_under(daemon.root)
        done = _cleanup_mounts(daemon)
        assert done.returncode == 0 and "mounts removed" in done.stdout, done.stderr
        assert mounts_under(daemon.root) == []
        deadline = time.monotonic() + 10
        while keeper.ping(daemon.root) is not None:
            assert time.monotonic() < deadline, "the keeper still runs after cleanup-mounts"
            time.sleep(0.1)


def _cleanup_mounts(daemon: SnapDaemon) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "snapshotter.cli", "--root", str(daemon.root), "cleanup-mounts"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


@pytest.mark.parametrize("stop", ["kill", "term"])
def test_a_read_in_flight_at_kill_is_answered_by_the_next_daemon(
    pushed: Pushed, tmp_path: Path, stop: str
) -> None:
    _, pieces = _layer_sums(pushed.image)
    piece = len(pieces) * 2 // 3  # far from what start-up reads: not fetched yet
    out = tmp_path / "out"
    out.mkdir()
    bulk = pushed.image.layers[-1].digest
    with (
        start_proxy(pushed.registry) as proxy,
        _stack(pushed, tmp_path / "stack", hosts=(proxy.host,)) as (daemon, ctd),
    ):
        ref = pushed.lazy_ref.replace(pushed.registry.host, proxy.host)
        _pull(ctd, ref)
        proxy.hold = lambda path, range_header: 30.0 if bulk in path and range_header else 0.0
        script = (
            f"dd if=/{OPEN_FILE} bs={PIECE} skip={piece} count=1 2>/dev/null | sha256sum"
            " > /out/result.tmp && mv /out/result.tmp /out/result"
        )
        ctd.ctr(
            "run",
            "-d",
            "--runc-root",
            str(ctd.paths.state / "runc"),
            "--snapshotter",
            "sociable",
            "--mount",
            f"type=bind,src={out},dst=/out,options=rbind:rw",
            ref,
            "reader",
            "/bin/sh",
            "-c",
            script,
            namespace=K8S,
        )
        deadline = time.monotonic() + 60
        while proxy.holding == 0:
            assert time.monotonic() < deadline, "the read never reached the registry"
            time.sleep(0.1)
        assert not (out / "result").exists()
        # The FUSE read is taken, its answer waits on the held request.
        if stop == "kill":
            daemon.kill9()
        else:  # a graceful stop cancels it unanswered (answered, it would be EIO)
            assert daemon.stop() == 0
        proxy.hold = None
        t0 = time.monotonic()
        daemon.start()
        deadline = time.monotonic() + 30
        while not (out / "result").exists():
            assert time.monotonic() < deadline, "the read taken by the killed daemon hangs"
            time.sleep(0.1)
        waited = time.monotonic() - t0
        result = (out / "result").read_text().split()[0]
        resent = [e for e in _events(daemon) if "not resent" in str(e.get("msg"))]
    print(f"the read in flight at the kill was answered {waited:.2f} s after the restart began")
    assert result == pieces[piece]
    assert resent == []


def test_keeper_killed_while_serving_is_replaced(
    pushed: Pushed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("INVOCATION_ID", raising=False)  # the daemon starts the new keeper
    sums, pieces = _layer_sums(pushed.image)
    out = tmp_path / "out"
    out.mkdir()
    log = out / "loop.log"
    with _stack(pushed, tmp_path / "stack") as (daemon, ctd):
        _pull(ctd, pushed.lazy_ref)
        _run_loop(ctd, pushed.lazy_ref, out, sums, len(pieces))
        seen = _wait_lines(log, 0)
        first = keeper.ping(daemon.root)
        assert first is not None
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while True:
            second = keeper.ping(daemon.root)
            names = ("fuse", "fuse-plain")
            if second not in (None, first) and all(keeper.has(daemon.root, n) for n in names):
                break
            assert time.monotonic() < deadline, "no new keeper holds the connections"
            time.sleep(0.2)
        handed = [
            e.get("connection")
            for e in _events(daemon)
            if e.get("msg") == "fuse connection handed to a new keeper"
        ]
        assert sorted(handed) == ["fuse", "fuse-plain"]
        _evict(daemon.root)
        down_from = _uptime()
        daemon.kill9()
        daemon.start()
        down = [(down_from, _uptime())]
        _wait_containerd(ctd)
        seen = _wait_lines(log, seen + 2 * len(SUMMED))
        ctd.ctr("task", "kill", "-s", "SIGKILL", "loop", namespace=K8S, check=False)
        adopted = [e for e in _events(daemon) if e.get("msg") == "fuse connection adopted"]
    lines, longest = _check_log(log, sums, pieces, down)
    print(
        f"keeper replaced; {lines} results after a kill -9, all right; longest gap {longest:.2f} s"
    )
    assert len(adopted) == 1


def _fuse_ops(root: Path) -> dict[str, int]:
    doc = json.loads((root / "status.json").read_text())
    return {op: int(v["count"]) for op, v in doc.get("fuseOps", {}).items()}


def _lazy_binds(root: Path, timeout_s: float = 30.0) -> list[tuple[Path, str]]:
    """(mountpoint, device) of the lazy layers' bind mounts under the root's snapshots, once
    there is one."""
    deadline = time.monotonic() + timeout_s
    while True:
        binds = [
            (Path(e.mountpoint), e.device)
            for e in mounts_under(root.resolve() / "snapshots")
            if e.fstype.startswith("fuse")
        ]
        if binds:
            return binds
        assert time.monotonic() < deadline, "no lazy layer was bound"
        time.sleep(0.2)


@pytest.mark.parametrize(
    ("min_bytes", "connection"), [(1 << 30, "fuse-plain"), (4096, "fuse")], ids=["plain", "open"]
)
def test_a_layer_is_bound_from_the_connection_its_files_need(
    pushed: Pushed, tmp_path: Path, min_bytes: int, connection: str
) -> None:
    """The daemon serves every layer on two connections. A layer whose bytes are mostly in
    files that passthrough may copy (`passthrough_min_file_bytes`) is bound from `<root>/fuse`,
    which answers OPEN (every open of its files is an OPEN, a RELEASE when closed); any other
    layer from `<root>/fuse-plain`, which never answers OPEN, so reading its files costs no
    OPEN at all. Files read right either way, and the choice survives a kill -9."""
    stdlib = images.python_stdlib_dir()
    remote = f"passthrough_min_file_bytes = {min_bytes}\n"
    with _stack(pushed, tmp_path / "stack", remote=remote) as (daemon, ctd):
        _pull(ctd, pushed.lazy_ref)
        status = json.loads((daemon.root / "status.json").read_text())
        if "passthrough" not in status:  # the kernel offers none: nothing answers OPEN
            connection = "fuse-plain"
        devices = {
            name: entry.device
            for name in ("fuse", "fuse-plain")
            if (entry := mount_at(daemon.root.resolve() / name)) is not None
        }
        assert len(set(devices.values())) == 2, devices
        for how in ("first daemon", "after kill -9"):
            binds = _lazy_binds(daemon.root)
            layer = next(m for m, _ in binds if (m / "usr/lib/python3.11/os.py").exists())
            assert dict(binds)[layer] == devices[connection], (how, binds, devices)
            files = sorted((layer / "usr/lib/python3.11/json").glob("*.py"))
            assert len(files) >= 4
            before = _fuse_ops(daemon.root)
            for path in files:
                assert path.read_bytes() == (stdlib / "json" / path.name).read_bytes(), (how, path)
            time.sleep(2.5)  # status.json is rewritten at most once a second
            after = _fuse_ops(daemon.root)
            opens = after.get("open", 0) - before.get("open", 0)
            if connection == "fuse":
                assert opens >= len(files), (how, before, after)
            else:  # one: the connection's first open, answered ENOSYS (then none comes)
                assert opens <= 1, (how, before, after)
            daemon.kill9()
            daemon.start()
            assert any(e.get("msg") == "fuse connection adopted" for e in _events(daemon))


def test_an_upgrade_from_one_connection_keeps_the_layers(pushed: Pushed, tmp_path: Path) -> None:
    """What an upgrade from a version with one FUSE connection finds: the keeper holds
    `<root>/fuse` only (the layers bound from it) and nothing is mounted at
    `<root>/fuse-plain`. The new daemon adopts `<root>/fuse`, its layers read right, and it
    mounts and keeps a fresh `<root>/fuse-plain`."""
    stdlib = images.python_stdlib_dir()
    remote = "passthrough_min_file_bytes = 1\n"  # every layer bound from <root>/fuse
    with _stack(pushed, tmp_path / "stack", remote=remote) as (daemon, ctd):
        _pull(ctd, pushed.lazy_ref)
        status = json.loads((daemon.root / "status.json").read_text())
        if "passthrough" not in status:
            pytest.skip("no FUSE passthrough: every layer is bound from <root>/fuse-plain")
        main = mount_at(daemon.root.resolve() / "fuse")
        assert main is not None
        binds = _lazy_binds(daemon.root)
        assert {device for _, device in binds} == {main.device}
        daemon.kill9()
        keeper.drop(daemon.root, "fuse-plain")
        subprocess.run(["umount", "-l", str(daemon.root / "fuse-plain")], check=True)
        daemon.start()
        assert any(e.get("msg") == "fuse connection adopted" for e in _events(daemon))
        assert _lazy_binds(daemon.root) == binds
        layer = next(m for m, _ in binds if (m / "usr/lib/python3.11/os.py").exists())
        for name in ("os.py", "json/decoder.py"):
            assert (layer / "usr/lib/python3.11" / name).read_bytes() == (
                stdlib / name
            ).read_bytes()
        plain = mount_at(daemon.root.resolve() / "fuse-plain")
        assert plain is not None and plain.device != main.device
        assert keeper.has(daemon.root, "fuse-plain")
