"""What the install tests need: a wheelhouse and a bundle built once per session from this
checkout, the daemon run from an installed venv, and containerd run with a config file as
`install` left it.

- :func:`wheelhouse` (session fixture): `pip wheel` of the checkout and its dependencies (from
  pip's cache or the index), what `make dist` builds;
- :func:`unpack_bundle`: the `make dist` tarball built from it and unpacked;
- :func:`run_installed_daemon`: `<prefix>/usr/local/bin/sociable-snapshotter --config C`,
  started as systemd would (`NOTIFY_SOCKET`, ready on `READY=1`), without this checkout on
  its path; stopped with SIGTERM (SIGKILL after 20 s) and its mounts swept at exit;
- :func:`run_containerd`: containerd with a given config file whose paths are those of
  :class:`~tests.support.containerd.ContainerdPaths`; killed, its shims too, at exit.
"""

from __future__ import annotations

import contextlib
import os
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

from snapshotter.install import bundle
from tests.support.containerd import (
    START_TIMEOUT_S,
    Containerd,
    ContainerdError,
    ContainerdPaths,
    unmount_all,
    wait_for_socket,
)

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 60.0


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our wheel and every dependency's, built from this checkout once per session."""
    out = tmp_path_factory.mktemp("wheelhouse")
    done = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check"),
            *("--wheel-dir", str(out), str(REPO)),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, f"pip wheel failed:\n{done.stderr[-3000:]}"
    return out


def unpack_bundle(wheels: Path, dest: Path) -> Path:
    """The `make dist` tarball built from `wheels` and unpacked under `dest`; returns its
    directory (`install.sh`, `wheelhouse/`, `systemd/`, `docs/`)."""
    dest.mkdir(parents=True, exist_ok=True)
    tarball = bundle.build(wheels, dest, REPO)
    with tarfile.open(tarball) as tar:
        tar.extractall(dest, filter="tar")
    (top,) = [p for p in dest.iterdir() if p.is_dir()]
    return top


@dataclass
class InstalledDaemon:
    proc: subprocess.Popen[bytes]
    log: Path

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _clean_env() -> dict[str, str]:
    """The environment without this checkout on the Python path."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


@contextlib.contextmanager
def run_installed_daemon(program: Path, config: Path, base: Path) -> Iterator[InstalledDaemon]:
    """`program --config config` until READY=1 (raises AssertionError with the log tail
    otherwise); stopped and mounts under `base` swept on exit."""
    base.mkdir(parents=True, exist_ok=True)
    log = base / "daemon.log"
    notify_dir = Path(tempfile.mkdtemp(prefix="install-notify-"))
    notify_path = notify_dir / "n.sock"
    env = {**_clean_env(), "NOTIFY_SOCKET": str(notify_path)}
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(0.2)
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [str(program), "--config", str(config), "--log-level", "debug"],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=base,
            )
        daemon = InstalledDaemon(proc, log)
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:
                assert proc.poll() is None, f"daemon exited {proc.returncode}\n{daemon.log_tail()}"
                assert time.monotonic() < deadline, f"daemon not ready\n{daemon.log_tail()}"
                try:
                    msg = notify.recv(4096)
                except TimeoutError:
                    continue
                if b"READY=1" in msg.split(b"\n"):
                    break
            notify_path.unlink(missing_ok=True)
            notify_dir.rmdir()
            yield daemon
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=20)
            unmount_all(base)
            notify_path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                notify_dir.rmdir()


@contextlib.contextmanager
def run_containerd(
    paths: ContainerdPaths, config: Path, *, proxy_name: str, registry_hosts: tuple[str, ...]
) -> Iterator[Containerd]:
    """containerd with `config` (whose root, state and socket are those of `paths`)."""
    for d in (paths.root, paths.state, paths.cni_conf):
        d.mkdir(parents=True, exist_ok=True)
    (paths.root / f"io.containerd.snapshotter.v1.{proxy_name}").mkdir(exist_ok=True)
    log = open(paths.log, "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        ["containerd", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    ctd = Containerd(paths=paths, proc=proc, proxy_name=proxy_name, registry_hosts=registry_hosts)
    try:
        try:
            wait_for_socket(paths.address, proc, START_TIMEOUT_S, "containerd")
        except ContainerdError as e:
            raise ContainerdError(f"{e}\n--- containerd log tail ---\n{ctd.log_tail()}") from e
        yield ctd
    finally:
        try:
            ctd.stop()
        finally:
            log.close()
            unmount_all(paths.base)
