"""`open_remote_mounter`: the composition root of lazy loading (the daemon's MounterFactory).

The only place that knows every part: it builds them from the config, owns them for the
daemon's lifetime and closes them in reverse order.

Start-up policy, in one place: anything that breaks lazy loading (stale mounts that cannot
be cleared, the local store, the registry client or hosts dir, the span cache, the restore
records, FUSE, ...) degrades to ordinary snapshots: one `lazy layers disabled` error line
(keys `component`, `error`), a `degraded` entry in `<root>/status.json`, and a
`DegradedMounter`. Only the metadata store and the socket (opened by the daemon, not here)
stop the daemon.

Restart survival (docs/architecture.md, "Restart survival"): the two FUSE connections
(`CONNECTIONS`: one host served at `<root>/fuse` and at `<root>/fuse-plain`, which never
answers OPEN) are kept by the fd keeper (`snapshotter.fs.keeper`, started when none answers).
At start each kept connection that still serves its mount is adopted: the bind mounts of its
layers stay, the layers are put back from their restore records (`LazyLayers.adopt`) and
only then are the connections served again; mounts of anything else left under the root are
cleared and a fresh connection is mounted and handed to the keeper in place of each one not
adopted. On exit the mounts stay for the next start while lazy layers are mounted; with none
(or when an adopted connection was never served again) everything is torn down. `cleanup_mounts` is the explicit full teardown.

Task tree (every task lives in a scope owned by what it serves):

    remote                    root TaskScope of the mounter, open while the daemon serves
    ├── status writer         rewrites <root>/status.json when it changes
    ├── keeper watch          hands the FUSE connections to a keeper again when none holds them
    ├── background            the background fetcher's loop
    ├── preresolve            layer-tree pre-resolution workers and their expiry timer;
    │                         the timer that stops idle tree worker processes
    ├── discovery             zTOC downloads of each image, once its index is in
    ├── mounts                deferred mounts: a layer's zTOC awaited, then mounted (or
    │                         unpacked locally); closed before the layers are
    ├── peers                 membership refresh and the peer listener ([peers] enable)
    │   ├── one task per peer request (hypercorn's)
    │   └── the mirror's whole-blob check of a layer out of the span cache, once per layer
    └── layer snap-<id>       one per mounted lazy layer (read-ahead), closed by unmount
    metrics                   the /metrics listener ([metrics] address), closed before remote
    └── one task per scrape (hypercorn's)

Metrics (`[metrics] address`): one `DaemonMetrics` for the daemon, given to the parts that
record (FUSE boundary, sources, mounter) and carried by the mounter as `metrics` for the gRPC
server; the parts' own statistics are read at scrape time by collectors. A listener that
cannot bind disables only the metrics (one `metrics disabled` error line).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from index.digest import Digest
from index.model import Ztoc
from index.oci.client import AsyncRegistryClient
from index.oci.dockerconfig import DockerConfig
from index.oci.errors import CredentialsError
from index.oci.reference import Reference
from index.store import LocalStore
from snapshotter.configcheck import check_mirror, is_warning
from snapshotter.credentials.captured import CapturedCredentials, credentials_path
from snapshotter.credentials.keychain import Keychain
from snapshotter.credentials.providers import load_keychain
from snapshotter.fs.connection import KEEPER_NAME, PLAIN_KEEPER_NAME
from snapshotter.lazy import BackgroundFetcher, DemandTracker
from snapshotter.lazy.cache import SpanCache
from snapshotter.metrics import DaemonMetrics, MetricsApp, bind_metrics, serve_metrics
from snapshotter.metrics.collectors import (
    BackgroundCollector,
    CacheCollector,
    LayersCollector,
    NodePeersView,
    PeersCollector,
    PushCollector,
)
from snapshotter.mirror.access import PublicRepositories
from snapshotter.mirror.serve import MirrorService
from snapshotter.mirror.spans import SpanBlobs
from snapshotter.mountinfo import mounts_under
from snapshotter.peers.address import AddressError
from snapshotter.peers.client import PeerBlobClient
from snapshotter.peers.content import ContentStore
from snapshotter.peers.images import ImageStore
from snapshotter.peers.node import PeerNode, disabled_status, own_mirror_hosts
from snapshotter.peers.serving import SpanServer
from snapshotter.snapshots.mounts import detect_overlay_features
from snapshotter.snapshots.service import DeclineMounter, LayerMounter
from snapshotter.tasks import TaskScope, open_task_scope

from . import bindmount
from .catalog import ImageCatalog
from .discovery import DiscoveryModes, load_ztoc
from .layers import LastLayerCallback, LayerSources, LazyLayers, RegistrySources
from .local import RegistryUnpacker
from .mounter import DegradedMounter, RemoteMounter
from .records import RecordStore, layer_name
from .status import remove_daemon_status, write_daemon_status
from .treeprocs import TreeProcesses
from .trees import LayerTrees

if TYPE_CHECKING:
    from snapshotter.daemon import Settings
    from snapshotter.fs.connection import KeptConnection
    from snapshotter.fs.fuse import FuseMount

log = logging.getLogger(__name__)

STATUS_INTERVAL_SEC = 1.0
"""How often the status writer looks for changes, in seconds."""


class _Step:
    """The start-up step running now: names the component in the degraded-start line."""

    name = "start"


async def _write_status(settings: Settings, doc: dict[str, object]) -> None:
    try:
        await trio.to_thread.run_sync(write_daemon_status, settings.root, doc)
    except OSError as e:
        log.warning("cannot write the status file", extra={"error": str(e)})


async def _status_writer(settings: Settings, status: Callable[[], dict[str, object]]) -> None:
    """Rewrite `<root>/status.json` whenever `status()` changes (checked every second)."""
    last = ""
    while True:
        doc = status()
        text = json.dumps(doc, sort_keys=True)
        if text != last:
            await _write_status(settings, doc)
            last = text
        await trio.sleep(STATUS_INTERVAL_SEC)


def _captured(settings: Settings) -> CapturedCredentials | None:
    """The credentials the CRI proxy captures (`[cri] enable`), else None."""
    if not settings.config.cri.enable:
        return None
    return CapturedCredentials(credentials_path(settings.root))


def _forget_captured(captured: CapturedCredentials) -> LastLayerCallback:
    """`LazyLayers`' `on_last_layer`: forget the repository's captured credentials (the
    image's last snapshot is gone). A failed write is logged (`cannot forget credentials`)."""

    async def forget(ref: Reference) -> None:
        try:
            forgotten = await trio.to_thread.run_sync(captured.forget, ref.registry, ref.repository)
        except OSError as e:
            log.warning(
                "cannot forget credentials",
                extra={"registry": ref.registry, "repository": ref.repository, "error": str(e)},
            )
            return
        if forgotten:
            log.info(
                "credentials forgotten",
                extra={"registry": ref.registry, "repository": ref.repository},
            )

    return forget


def _keychain(settings: Settings, captured: CapturedCredentials | None) -> Keychain:
    """Every registry request's credentials: captured by the CRI proxy (`captured`),
    kubelet's credential providers (`[credential_providers]`), the docker config. A provider
    config that cannot be used is logged (`credential providers disabled`) and left out."""
    cfg = settings.config
    providers = None
    try:
        providers = load_keychain(cfg.credential_providers)
    except CredentialsError as e:
        log.error("credential providers disabled", extra={"error": str(e)})
    return Keychain(
        captured=captured,
        providers=providers,
        docker=DockerConfig(cfg.remote.docker_config or None),
    )


def _create_peers(
    settings: Settings, stack: contextlib.AsyncExitStack
) -> tuple[PeerNode | None, Callable[[], dict[str, object]] | None]:
    """The peer node when `[peers] enable`; a set-up that fails disables only the peers
    (one `peers disabled` error line, shown in status)."""
    cfg = settings.config.peers
    if not cfg.enable:
        return None, None
    try:
        node = PeerNode.create(cfg)
    except (OSError, ValueError) as e:
        error = f"{type(e).__name__}: {e}"
        log.error("peers disabled", extra={"error": error})
        return None, disabled_status(error)
    stack.push_async_callback(node.aclose)
    return node, node.status


async def _mirror(
    settings: Settings,
    stack: contextlib.AsyncExitStack,
    peer_node: PeerNode,
    spans: SpanBlobs | None = None,
) -> MirrorService | None:
    """The registry-mirror answers of the peer listener (`[mirror] enable`): containerd's
    content store here and on members, layers whose spans are all cached here (`spans`),
    manifests for public repositories only (checked with an anonymous client that never
    uses this node's own mirror), tags from this node's containerd image store
    (`resolve_tags`, `resolve_latest`)."""
    cfg = settings.config.mirror
    if not cfg.enable:
        return None
    ctd_config = Path(settings.config.containerd.config_path)
    try:
        text = await trio.to_thread.run_sync(ctd_config.read_text)
    except OSError:
        text = None  # nothing to check against (containerd configured elsewhere)
    if text is not None:
        findings = check_mirror(settings.config, text, f"containerd config {ctd_config}")
        for finding in findings:
            log.warning("registry mirror set-up", extra={"problem": finding})
        if any(not is_warning(f) for f in findings):
            log.error("registry mirror disabled", extra={"error": "containerd set-up, see above"})
            return None
    content = ContentStore(cfg.containerd_address, namespace=cfg.namespace)
    stack.callback(content.close)
    images = ImageStore(cfg.containerd_address, cfg.namespace)
    stack.callback(images.close)
    anonymous = AsyncRegistryClient(
        credentials=None,
        hosts_dirs=[settings.config.remote.hosts_dir] if settings.config.remote.hosts_dir else [],
        skip_mirrors=own_mirror_hosts(settings.config.peers),
    )
    stack.push_async_callback(anonymous.aclose)
    return MirrorService(
        content=content,
        peers=PeerBlobClient(peer_node.client, peer_node.membership),
        public=PublicRepositories(anonymous),
        lookup_timeout_sec=cfg.lookup_timeout_sec,
        stall_timeout_sec=cfg.stall_timeout_sec,
        images=images,
        resolve_tags=cfg.resolve_tags,
        resolve_latest=cfg.resolve_latest,
        spans=spans,
    )


def _bind_metrics(settings: Settings) -> tuple[DaemonMetrics, socket.socket] | None:
    """The daemon's metrics and their bound listener when `[metrics] address` is set; a
    listener that cannot bind disables the metrics (one `metrics disabled` error line)."""
    address = settings.config.metrics.address
    if not address:
        return None
    try:
        sock = bind_metrics(address)
    except (OSError, AddressError) as e:
        log.error("metrics disabled", extra={"address": address, "error": str(e)})
        return None
    return DaemonMetrics(), sock


@asynccontextmanager
async def _serving_metrics(
    bound: tuple[DaemonMetrics, socket.socket] | None,
) -> AsyncIterator[None]:
    """Serve `/metrics` in a task scope of its own (`metrics`) for the block's duration."""
    if bound is None:
        yield
        return
    metrics, sock = bound
    address = "{}:{}".format(*sock.getsockname()[:2])
    async with open_task_scope("metrics") as scope:
        scope.start_soon(serve_metrics, MetricsApp(metrics.registry), sock, name="metrics listener")
        log.info("metrics enabled", extra={"address": address})
        yield


async def _build(
    settings: Settings,
    stack: contextlib.AsyncExitStack,
    step: _Step,
    metrics: DaemonMetrics | None = None,
) -> RemoteMounter:
    """Every part of lazy loading, entered into `stack`. Raises whatever a part raises."""
    from snapshotter.fs import LayerHost
    from snapshotter.fs.fuse import FUSE_OP_STATS, open_fuse_host

    cfg = settings.config.remote
    root = settings.root
    step.name = "stale mounts"
    kept, binds, survival = await trio.to_thread.run_sync(_take_connections, root)
    if survival:
        step.name = "fuse"
        for name in CONNECTIONS:
            if kept[name] is None:
                kept[name] = await trio.to_thread.run_sync(_mount_fresh, root, name)
    held = {name: k for name, k in kept.items() if k is not None}
    served = False
    host = LayerHost()

    async def teardown() -> None:
        """The mounts stay for the next start while lazy layers are served on kept
        connections (or an adopted one was never served again); else they go."""
        if not held or (not served and any(k.adopted for k in held.values())):
            return
        if served and host.layer_names():
            kept_layers = len(host.layer_names())
            log.info("fuse mounts kept for the next start", extra={"layers": kept_layers})
            return
        # shielded: when the daemon stops on an error the stack unwinds in a cancelled scope,
        # and a Cancelled here would leave the mounts and replace the error
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_release_all, root, tuple(held))

    stack.push_async_callback(teardown)
    step.name = "store"
    store = LocalStore(root)
    stack.callback(store.close)
    step.name = "registry"
    captured = _captured(settings)
    requests = trio.CapacityLimiter(cfg.max_parallel_requests)  # registry requests, all layers
    client = AsyncRegistryClient(
        credentials=_keychain(settings, captured),
        hosts_dirs=[cfg.hosts_dir] if cfg.hosts_dir else [],
        gate=lambda: requests,
        skip_mirrors=own_mirror_hosts(settings.config.peers),
    )
    stack.push_async_callback(client.aclose)
    step.name = "cache"
    cache = SpanCache(root / "cache", cfg.cache_config())
    step.name = "records"
    records = RecordStore(root / "remote")
    userxattr = detect_overlay_features().userxattr
    unpacker = RegistryUnpacker(
        client, root / "unpack", userxattr=userxattr, timeout_sec=cfg.unpack_timeout_sec
    )
    tracker = DemandTracker()
    background = BackgroundFetcher(cfg.background_config(), tracker)
    peer_node, peers_status = _create_peers(settings, stack)
    read_config = cfg.read_config().with_shared_memory()
    if peer_node is not None:
        read_config = dataclasses.replace(read_config, chunk_bytes=peer_node.cfg.chunk_bytes)
    registry_sources = RegistrySources(
        client, cfg.fetch_config(), meter=metrics.metered if metrics is not None else None
    )
    step.name = "fuse"
    fuse = await stack.enter_async_context(
        open_fuse_host(
            root / KEEPER_NAME,
            host,
            metrics=metrics,
            connection=kept[KEEPER_NAME],
            start=False,
            passthrough=cfg.passthrough_config(root / "passthrough"),
            push_bytes=cfg.push_after_read_bytes,
        )
    )
    fuse.plain = await stack.enter_async_context(
        open_fuse_host(
            root / PLAIN_KEEPER_NAME,
            host,
            metrics=metrics,
            connection=kept[PLAIN_KEEPER_NAME],
            start=False,
            push_bytes=cfg.push_after_read_bytes,
        )
    )
    processes = TreeProcesses(cfg.tree_processes) if cfg.tree_processes > 0 else None
    if processes is not None:  # closed after the task scope: no build uses them any more

        async def close_processes() -> None:
            # shielded: a Cancelled from here would replace the error the stack unwinds for
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(processes.close)

        stack.push_async_callback(close_processes)
    step.name = "tasks"
    scope: TaskScope = await stack.enter_async_context(open_task_scope("remote"))
    background_scope = await scope.open_child("background")
    background_scope.start_soon(background.serve, name="background fetch")
    trees = LayerTrees(
        store, await scope.open_child("preresolve"), userxattr=userxattr, processes=processes
    )
    catalog = ImageCatalog(
        client,
        store,
        DiscoveryModes(cfg.soci_v2, cfg.soci_v1, cfg.local_store),
        queue_tree=trees.queue,
        warm_trees=trees.warm,
        tasks=await scope.open_child("discovery"),
    )
    layers = LazyLayers(
        fuse=fuse,
        tasks=scope,
        trees=trees,
        sources=LayerSources(
            registry_sources,
            cfg.fetch_config(),
            peer_node.settings if peer_node is not None else None,
        ),
        records=records,
        cache=cache,
        background=background,
        tracker=tracker,
        read_config=read_config,
        on_last_layer=_forget_captured(captured) if captured is not None else None,
    )
    stack.push_async_callback(layers.close)
    # deferred mounts end (cancelled) before the layers close
    mounts_scope = await scope.open_child("mounts")
    stack.push_async_callback(mounts_scope.aclose)
    if peer_node is not None:

        async def ztoc_of(ref: Reference, digest: Digest) -> Ztoc:
            return await load_ztoc(client, store, ref, digest)

        server = SpanServer(
            layers=layers,
            cache=cache,
            load_ztoc=ztoc_of,
            upstream=registry_sources.get,
            tracker=tracker,
            io_limiter=trio.CapacityLimiter(4),  # span-cache writes for peers
            max_request_bytes=cfg.max_request_bytes,
        )
        peers_scope = await scope.open_child("peers")
        spans = SpanBlobs(
            layers=server, cache=cache, upstream=registry_sources.get, tasks=peers_scope
        )
        mirror = await _mirror(settings, stack, peer_node, spans)
        peer_node.start(peers_scope, server, mirror)
    layers.keep_mounts = bool(held)
    adopted_devices = [k.device for k in held.values() if k.adopted]
    if adopted_devices:
        step.name = "adopt"
        found = await trio.to_thread.run_sync(records.read_all)
        adopted = await layers.adopt(binds, found)
        log.info(
            "fuse connection adopted",
            extra={
                "device": ",".join(adopted_devices),
                "layers": adopted,
                "bind_mounts": len(binds),
            },
        )
    step.name = "fuse"
    await fuse.start()
    served = True
    if held:
        mounts = {KEEPER_NAME: fuse, PLAIN_KEEPER_NAME: fuse.plain}
        watched = [(name, mounts[name], k.keeper_data()) for name, k in held.items()]
        scope.start_soon(_watch_keeper, root, watched, name="keeper watch")
    mounter = RemoteMounter(
        catalog=catalog,
        layers=layers,
        unpacker=unpacker,
        records=records,
        mount_timeout_sec=cfg.mount_timeout_sec,
        local_unpack=cfg.local_unpack,
        peers_status=peers_status,
        metrics=metrics,
        tasks=mounts_scope,
        demand=tracker,
    )

    def push_statistics() -> dict[str, dict[str, int]]:
        """`Pusher.statistics` by connection name, for the connections that push."""
        out = {}
        for name, mount in ((KEEPER_NAME, fuse), (PLAIN_KEEPER_NAME, fuse.plain)):
            stats = None if mount is None else mount.push_statistics()
            if stats is not None:
                out[name] = stats
        return out

    if metrics is not None:
        metrics.register(
            [
                CacheCollector(cache),
                BackgroundCollector(background.statistics),
                LayersCollector(lambda: len(layers)),
                PushCollector(lambda: push_statistics().values()),
            ]
        )
        if peer_node is not None:
            metrics.register([PeersCollector(NodePeersView(peer_node))])

    def status() -> dict[str, object]:
        # FUSE requests answered per handler and their CPU time (benchmarks read them).
        stats = FUSE_OP_STATS.statistics()
        doc: dict[str, object] = {
            **mounter.status(),
            "fuseOps": stats.to_status(),
            "trioThreadCpuSec": round(stats.trio_thread_cpu_sec, 3),
        }
        if fuse.passthrough is not None:
            doc["passthrough"] = fuse.passthrough.statistics()
        if pushes := push_statistics():
            doc["push"] = pushes
        if processes is not None:
            doc["treeWorkers"] = processes.statistics()
        return doc

    scope.start_soon(_status_writer, settings, status, name="status writer")
    return mounter


CONNECTIONS = (KEEPER_NAME, PLAIN_KEEPER_NAME)
"""The daemon's FUSE connections, each mounted at `<root>/<name>` and kept by the keeper as
`<name>`: both serve every layer (one host); the plain one never answers OPEN, and layers of
small files are given out from it (`snapshotter.fs.fuse.FuseMount.plain`)."""


def _take_connections(
    root: Path,
) -> tuple[dict[str, KeptConnection | None], dict[Path, str], bool]:
    """The adopted FUSE connections (by name, None where none is adopted), the bind mounts of
    their layers still in place (mountpoint -> layer name) and whether a keeper answers. A
    keeper's connection is adopted when it still serves `<root>/<name>`; other mounts under
    the root's snapshots are detached, and a connection not adopted has its mountpoint
    cleared (then `_mount_fresh`, or without a keeper the FUSE server mounts a connection of
    its own). Blocking; raises OSError."""
    from snapshotter.fs import connection, keeper
    from snapshotter.fs.fuse import cleanup_stale_mount

    snapshots = root / "snapshots"
    kept: dict[str, KeptConnection | None] = dict.fromkeys(CONNECTIONS)
    try:
        keeper.spawn(root)
        for name in CONNECTIONS:
            kept[name] = connection.adopt(root, root / name, name)
        survival = True
    except keeper.KeeperError as e:
        log.warning("fuse restart survival off", extra={"error": str(e)})
        for name, k in kept.items():
            if k is not None:
                connection.discard(k.fd, None)
                kept[name] = None
        survival = False
    devices = {k.device for k in kept.values() if k is not None}
    binds: dict[Path, str] = {}
    if devices:
        ours: set[str] = set()
        for entry in mounts_under(snapshots):  # latest first: the top mount of each path
            mountpoint = Path(entry.mountpoint)
            if entry.mountpoint in ours or mountpoint in binds:
                continue
            with contextlib.suppress(ValueError):
                name = layer_name(mountpoint)
                if entry.device in devices and entry.root == f"/{name}":
                    binds[mountpoint] = name
                    continue
            ours.add(entry.mountpoint)
        for path in sorted(ours, reverse=True):
            with contextlib.suppress(OSError):
                while bindmount.detach(Path(path)):
                    pass
    else:
        bindmount.detach_all_under(snapshots)
    for name, k in kept.items():
        if k is None:
            cleanup_stale_mount(root / name)
            (root / name).mkdir(mode=0o755, parents=True, exist_ok=True)
    return kept, binds, survival


def _mount_fresh(root: Path, name: str) -> KeptConnection | None:
    """A fresh FUSE connection on `<root>/<name>`, kept by the keeper as `name`; None
    (logged) when the keeper refuses it (the FUSE server then mounts one of its own).
    Blocking; raises OSError (no /dev/fuse, ...)."""
    from snapshotter.fs import connection, keeper
    from snapshotter.fs.fuse import MOUNT_OPTIONS

    try:
        return connection.mount_fresh(root, root / name, MOUNT_OPTIONS, name)
    except keeper.KeeperError as e:
        log.warning("fuse restart survival off", extra={"error": str(e)})
        return None


KEEPER_CHECK_SEC = 5.0
"""How often the daemon checks that a keeper holds its FUSE connection, in seconds."""


async def _watch_keeper(root: Path, kept: list[tuple[str, FuseMount, bytes]]) -> None:
    """Every `KEEPER_CHECK_SEC`: when no keeper holds a connection of `kept` (name, mount,
    keeper data) any more (the keeper was killed or restarted), hand it to one again, so the
    next restart can still adopt it. A keeper is started here unless systemd runs this daemon
    (then the keeper's unit restarts it: one started here would die with this unit). The
    connections are handed one after the other (one keeper started). Failures are logged
    once until it works again (`fuse connection not kept`)."""
    from snapshotter.fs.keeper import KeeperError

    warned = False
    while True:
        await trio.sleep(KEEPER_CHECK_SEC)
        failed = False
        for name, fuse, data in kept:
            fd = fuse.connection_fd
            if fd is None:
                continue
            try:
                handed = await trio.to_thread.run_sync(_keep_again, root, name, fd, data)
            except (OSError, ValueError, KeeperError) as e:
                if not warned:
                    log.warning(
                        "fuse connection not kept", extra={"connection": name, "error": str(e)}
                    )
                warned = failed = True
                continue
            if handed:
                log.info(
                    "fuse connection handed to a new keeper",
                    extra={"root": str(root), "connection": name},
                )
        warned = failed


def _keep_again(root: Path, name: str, fd: int, data: bytes) -> bool:
    """Store `fd` in the keeper as `name` unless it holds that connection; True when stored.
    Blocking; raises KeeperError, OSError."""
    import os

    from snapshotter.fs import keeper

    try:
        if keeper.has(root, name):
            return False
    except keeper.KeeperError:
        if "INVOCATION_ID" in os.environ:
            raise
        keeper.spawn(root)
    keeper.store(root, name, fd, data)
    return True


def _release_all(root: Path, names: tuple[str, ...]) -> None:
    """Full teardown: every bind mount under the root's snapshots detached, the keeper told
    to forget the connections `names`, their FUSE mounts lazily unmounted. Blocking; never
    raises."""
    from snapshotter.fs import connection

    with contextlib.suppress(OSError):
        bindmount.detach_all_under(root / "snapshots")
    for name in names:
        connection.release(root, root / name, name)


def cleanup_mounts(root: Path) -> int:
    """`sociable-snapshotter cleanup-mounts`: with the daemon stopped (its root lock taken
    here), tear down what a stopped daemon leaves for the next start: bind mounts under
    `<root>/snapshots`, the kept FUSE connections and their mounts (`<root>/fuse`,
    `<root>/fuse-plain`). Running containers lose their lazy layers (ENOTCONN). Returns how
    many mounts went. Raises RootLocked (a daemon runs), OSError."""
    from snapshotter.fs import keeper
    from snapshotter.fs.fuse import cleanup_stale_mount
    from snapshotter.rootlock import lock_root

    with lock_root(root):
        count = bindmount.detach_all_under(root / "snapshots")
        for name in CONNECTIONS:
            keeper.drop(root, name)
            if cleanup_stale_mount(root / name):
                count += 1
    return count


@asynccontextmanager
async def open_remote_mounter(settings: Settings) -> AsyncIterator[LayerMounter]:
    """The daemon's LayerMounter for its lifetime: a `RemoteMounter` serving lazy layers
    from a FUSE host at `<root>/fuse`, a `DegradedMounter` when lazy loading cannot start
    (see the module doc), a `DeclineMounter` when `[remote] enable = false`.

    A FUSE connection the keeper kept for a previous process is adopted with the bind mounts
    still on it; mounts nobody serves any more (no keeper, a dead connection) are lazily
    unmounted first (docs/architecture.md, "Restart survival"). Never raises for a part of
    lazy loading; on exit every task is cancelled, and the mounts are kept for the next
    process while lazy layers are mounted, otherwise detached and the FUSE host unmounted.
    """
    root = settings.root
    if not settings.config.remote.enable:
        await _write_status(settings, {"lazyLayers": "disabled", "component": "config"})
        try:
            yield DeclineMounter()
        finally:
            remove_daemon_status(root)
        return
    step = _Step()
    stack = contextlib.AsyncExitStack()
    bound = _bind_metrics(settings)
    metrics = bound[0] if bound is not None else None
    try:
        mounter: RemoteMounter | DegradedMounter = await _build(settings, stack, step, metrics)
    except Exception as e:  # the start-up policy: lazy loading broken -> degraded, logged once
        with trio.CancelScope(shield=True):
            await stack.aclose()
        log.error(
            "lazy layers disabled",
            extra={"component": step.name, "error": f"{type(e).__name__}: {e}"},
        )
        mounter = DegradedMounter(step.name, f"{type(e).__name__}: {e}", metrics=metrics)
        await _write_status(settings, mounter.status())
    try:
        async with stack, _serving_metrics(bound):
            yield mounter
    finally:
        remove_daemon_status(root)
