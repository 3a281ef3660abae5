"""The daemon's trio main: root lock, store, service, gRPC server, systemd integration.

`serve(settings)` starts up in this order, and any failure stops it before it serves:

1. the root directory (created 0700) and its lock (`snapshotter.rootlock`): a second
   daemon on the same root is refused before it touches anything under it;
2. the metadata store (`<root>/metadata.db`);
3. the layer mounter (`open_mounter`; the remote one clears stale mounts under the root);
4. the socket (a live socket at the address is refused, naming its holder's pid).

It then serves the Snapshots API (and, with `[cri] enable`, the CRI image-service proxy,
`snapshotter.cri.proxy`) until SIGTERM/SIGINT (or cancellation) and returns once in-flight
requests had `shutdown_grace_sec` to finish.

Listening: a plain path gets a fresh socket (parent directory created 0700 if
missing, a stale socket nobody answers on is removed, a live one is an error,
the socket is chmod 0660). With systemd socket activation (`LISTEN_PID` is
this process and `LISTEN_FDS` >= 1) the inherited fd 3 is used: grpcio cannot
adopt a listening fd, so the daemon accepts on it and splices each connection
to the gRPC server's private socket `<root>/grpc.sock`. `--address fd://`
requires activation.

systemd notification (`NOTIFY_SOCKET`): READY=1 once serving, STOPPING=1 when
shutdown begins.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import stat
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from .config import Config
from .errors import ConfigError, SnapshotterError
from .rootlock import lock_root
from .snapshots.grpc_server import build_server
from .snapshots.metadata import SqliteStore
from .snapshots.mounts import detect_overlay_features
from .snapshots.service import DeclineMounter, LayerMounter, SnapshotService

if TYPE_CHECKING:
    from .cri.proxy import CriProxy

log = logging.getLogger(__name__)

FD_ADDRESS = "fd://"
SD_LISTEN_FDS_START = 3
SPLICE_CHUNK_BYTES = 256 * 1024


class DaemonError(SnapshotterError):
    """The daemon cannot start: bad socket path, bad activation environment, ..."""


class AddressInUse(DaemonError):
    """Another process answers on the socket address."""


def _peer_pid(sock: socket.socket) -> int | None:
    """The pid that listened on the unix socket `sock` is connected to (SO_PEERCRED)."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid = struct.unpack("3i", creds)[0]
    return pid if pid > 0 else None


@dataclass(frozen=True)
class Settings:
    """Effective settings: the config file with command-line overrides applied."""

    config: Config
    address: str
    root: Path


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1") to systemd's NOTIFY_SOCKET, if set.

    Returns whether a message was sent. Errors are logged, never raised: a
    missing supervisor must not stop the daemon.
    """
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    addr = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(state.encode(), addr)
    except OSError as e:
        log.warning("sd_notify failed", extra={"state": state, "error": str(e)})
        return False
    return True


def activation_fds() -> list[int]:
    """File descriptors passed by systemd socket activation (possibly none).

    Follows sd_listen_fds(3): only when LISTEN_PID names this process. The
    variables are removed from the environment so children do not inherit them.
    Raises DaemonError for malformed values.
    """
    pid = os.environ.get("LISTEN_PID")
    fds = os.environ.get("LISTEN_FDS")
    if pid is None or fds is None:
        return []
    try:
        mine = int(pid) == os.getpid()
        count = int(fds)
    except ValueError as e:
        raise DaemonError(
            f"bad socket activation environment LISTEN_PID={pid!r} LISTEN_FDS={fds!r}"
        ) from e
    if not mine:
        return []
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    result = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))
    for fd in result:
        os.set_inheritable(fd, False)
    return result


def _remove_stale_socket(path: Path) -> None:
    """Remove `path` if it is a socket no one answers on. Raises DaemonError if live."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise DaemonError(f"address {str(path)!r} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(os.fspath(path))
        except OSError as e:
            if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
                log.info("removing stale socket", extra={"address": str(path)})
                path.unlink(missing_ok=True)
                return
            raise DaemonError(f"address {str(path)!r} cannot be probed: {e.strerror}") from e
        pid = _peer_pid(probe)
    holder = f"pid {pid}" if pid is not None else "another process"
    raise AddressInUse(f"address {str(path)!r} is in use by {holder}")


def prepare_socket_path(path: Path) -> None:
    """Make `path` bindable: create its directory (0700) if missing, drop a stale socket."""
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True)
    _remove_stale_socket(path)


def open_cri_proxy(cfg: Config, root: Path) -> CriProxy:
    """Serve CRI's ImageService on `[cri] address`, forwarding to containerd and keeping pull
    credentials in `<root>/credentials/cri.json` (`snapshotter.cri.proxy`)."""
    from .credentials.captured import CapturedCredentials, credentials_path
    from .cri.proxy import CriProxy

    address = Path(cfg.cri.address)
    prepare_socket_path(address)
    credentials = CapturedCredentials(credentials_path(root))
    proxy = CriProxy(
        address, cfg.cri.containerd_address, credentials, threads=cfg.daemon.grpc_threads
    )
    proxy.open()
    return proxy


MounterFactory = Callable[[Settings], AbstractAsyncContextManager[LayerMounter]]
"""Opens the daemon's LayerMounter for its lifetime (see `serve`)."""


@asynccontextmanager
async def open_decline_mounter(settings: Settings) -> AsyncIterator[LayerMounter]:
    """The default MounterFactory: no remote layers, every layer is local."""
    yield DeclineMounter()


@contextmanager
def _store(root: Path) -> Iterator[SqliteStore]:
    store = SqliteStore(root / "metadata.db")
    try:
        yield store
    finally:
        store.close()


async def _splice(src: trio.SocketStream, dst: trio.SocketStream) -> None:
    try:
        while data := await src.receive_some(SPLICE_CHUNK_BYTES):
            await dst.send_all(data)
        await dst.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _serve_activated(fd: int, backend: Path) -> None:
    """Accept on the inherited listening `fd`, splice each connection to `backend`."""
    sock = trio.socket.fromfd(fd, socket.AF_UNIX, socket.SOCK_STREAM)
    os.close(fd)
    listener = trio.SocketListener(sock)

    async def handle(client: trio.SocketStream) -> None:
        async with client:
            try:
                server = await trio.open_unix_socket(os.fspath(backend))
            except OSError as e:
                log.warning("activated connection: backend unreachable", extra={"error": str(e)})
                return
            async with server, trio.open_nursery() as nursery:
                nursery.start_soon(_splice, client, server)
                nursery.start_soon(_splice, server, client)

    await trio.serve_listeners(handle, [listener])


async def serve(
    settings: Settings,
    *,
    open_mounter: MounterFactory | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the daemon until SIGTERM/SIGINT or cancellation. Never returns early.

    `open_mounter(settings)` supplies the LayerMounter for remote layers as an
    async context manager entered after the store is open and exited after the
    gRPC server stopped (so a FUSE host can live exactly as long as the
    service); the default declines every layer.
    Start-up order and what stops it: see the module docstring. Raises RootLocked (another
    daemon on the root), AddressInUse, DaemonError (bad activation environment),
    ConfigError (fd:// without activation), OSError (root not creatable); errors from inside
    the mounter's task scope may arrive wrapped in an ExceptionGroup.
    `task_status.started()` fires once serving.
    """
    if open_mounter is None:
        open_mounter = open_decline_mounter
    cfg = settings.config
    root = settings.root
    fds = activation_fds()
    if settings.address == FD_ADDRESS and not fds:
        raise ConfigError('address "fd://" needs systemd socket activation (LISTEN_FDS)')
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    with lock_root(root), _store(root) as store:
        async with open_mounter(settings) as mounter:
            service = SnapshotService(
                store,
                root,
                features=detect_overlay_features(),
                sync_dirs=cfg.snapshots.fsync_dirs,
                disk_threads=cfg.snapshots.disk_threads,
                mounter=mounter,
            )
            await service.open()
            token = trio.lowlevel.current_trio_token()
            from .metrics import grpc_recorder_of  # prometheus-client: only the daemon

            server = build_server(
                service, token, threads=cfg.daemon.grpc_threads, calls=grpc_recorder_of(mounter)
            )
            if fds:
                bind_path = root / "grpc.sock"
                prepare_socket_path(bind_path)
            else:
                bind_path = Path(settings.address)
                prepare_socket_path(bind_path)
            if server.add_insecure_port(f"unix:{bind_path}") == 0:
                raise DaemonError(f"cannot listen on {str(bind_path)!r}")
            os.chmod(bind_path, 0o600 if fds else 0o660)
            server.start()
            cri_proxy: CriProxy | None = None
            try:
                if cfg.cri.enable:
                    cri_proxy = open_cri_proxy(cfg, root)
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async with trio.open_nursery() as nursery:
                        if fds:
                            for fd in fds:
                                nursery.start_soon(_serve_activated, fd, bind_path)
                        log.info(
                            "serving",
                            extra={
                                "address": settings.address,
                                "root": str(root),
                                "activated": bool(fds),
                                "overlay_index_off": service.features.index_off,
                                "overlay_userxattr": service.features.userxattr,
                            },
                        )
                        notify("READY=1")
                        task_status.started()
                        async for signum in signals:
                            log.info("shutting down", extra={"signal": signal.Signals(signum).name})
                            break
                        nursery.cancel_scope.cancel()
            finally:
                notify("STOPPING=1")
                grace = cfg.daemon.shutdown_grace_sec
                with trio.CancelScope(shield=True):
                    stopped = server.stop(grace)
                    if cri_proxy is not None:
                        await trio.to_thread.run_sync(cri_proxy.stop, grace)
                    await trio.to_thread.run_sync(stopped.wait)
                if not fds:
                    bind_path.unlink(missing_ok=True)
                service.close()
                log.info("stopped")
