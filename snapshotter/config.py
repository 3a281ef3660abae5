"""The daemon's configuration: a typed, frozen tree loaded from TOML.

Keys carry their unit in the name (`_sec`, `_bytes`). `render_default()` is
the full default file (`sociable-snapshotter config default`, checked in as
docs/config.default.toml). Unknown keys and wrongly typed values are errors,
so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:  # imported where used: loading the config needs no trio
    from snapshotter.fs.passthrough import PassthroughConfig
    from snapshotter.lazy.background import BackgroundConfig
    from snapshotter.lazy.cache import CacheConfig
    from snapshotter.lazy.reader import ReadConfig
    from snapshotter.lazy.sources import FetchConfig

DEFAULT_CONFIG_PATH = Path("/etc/sociable/config.toml")
DEFAULT_ADDRESS = "/run/sociable/sociable.sock"
DEFAULT_ROOT = "/var/lib/sociable"


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclass(frozen=True)
class DaemonConfig:
    """[daemon]: where the daemon listens and keeps its state."""

    address: str = field(
        default=DEFAULT_ADDRESS,
        metadata=_doc(
            'Unix socket serving the Snapshots gRPC API; "fd://" uses the socket '
            "passed by systemd (LISTEN_FDS). Overridden by --address."
        ),
    )
    root: str = field(
        default=DEFAULT_ROOT,
        metadata=_doc("State directory: metadata.db and snapshots/. Overridden by --root."),
    )
    log_level: str = field(
        default="info",
        metadata=_doc("One of debug, info, warning, error. Overridden by --log-level."),
    )
    grpc_threads: int = field(
        default=16, metadata=_doc("Worker threads of the gRPC server (concurrent requests).")
    )
    shutdown_grace_sec: float = field(
        default=5.0,
        metadata=_doc("On SIGTERM/SIGINT, seconds in-flight requests get to finish."),
    )


@dataclass(frozen=True)
class SnapshotsConfig:
    """[snapshots]: local snapshot storage."""

    fsync_dirs: bool = field(
        default=True,
        metadata=_doc(
            "fsync snapshots/ after creating a snapshot directory (durability across "
            "power loss; a process crash is safe either way)."
        ),
    )
    disk_threads: int = field(
        default=4, metadata=_doc("Threads for disk walks (Usage, Commit) and directory removal.")
    )


@dataclass(frozen=True)
class ContainerdConfig:
    """[containerd]: how containerd is expected to use this daemon (`config check`)."""

    plugin_name: str = field(
        default="sociable",
        metadata=_doc("Name of the [proxy_plugins.<name>] table and of CRI's snapshotter."),
    )
    config_path: str = field(
        default="/etc/containerd/config.toml",
        metadata=_doc("containerd config file checked by `config check`."),
    )


@dataclass(frozen=True)
class RemoteConfig:
    """[remote]: lazily mounted layers (SOCI index discovery, FUSE, span cache, fallbacks)."""

    enable: bool = field(
        default=True,
        metadata=_doc("Serve indexed layers lazily; false = every layer is pulled by containerd."),
    )
    soci_v2: bool = field(
        default=True,
        metadata=_doc("Find indexes through the image manifest annotation (SOCI v2)."),
    )
    soci_v1: bool = field(
        default=False,
        metadata=_doc("Find indexes through referrers, with the tag-schema fallback (SOCI v1)."),
    )
    local_store: bool = field(
        default=True,
        metadata=_doc("Use an index recorded in <root>/content for the image manifest."),
    )
    local_unpack: bool = field(
        default=True,
        metadata=_doc(
            "Unpack layers the index does not cover ourselves (keeps the image lazy above "
            "them); false leaves them to containerd."
        ),
    )
    hosts_dir: str = field(
        default="/etc/containerd/certs.d",
        metadata=_doc("containerd registry config_path (hosts.toml mirrors); empty = none."),
    )
    docker_config: str = field(
        default="",
        metadata=_doc("docker config.json for credentials; empty = $DOCKER_CONFIG or ~/.docker."),
    )
    mount_timeout_sec: float = field(
        default=30.0,
        metadata=_doc("Longest a lazy mount may take (index, zTOCs, tree) before falling back."),
    )
    unpack_timeout_sec: float = field(
        default=600.0,
        metadata=_doc(
            "Longest a local unpack (download and apply of a layer without a zTOC) may take; "
            "past it the layer is left to containerd."
        ),
    )
    cache_max_bytes: int = field(
        default=10 * 1024 * 1024 * 1024,
        metadata=_doc("Size bound of the span cache under <root>/cache, in bytes."),
    )
    inflated_cache_max_bytes: int = field(
        default=4 * 1024 * 1024 * 1024,
        metadata=_doc(
            "Size bound of the inflated-span tier under <root>/cache/inflated, in bytes: hot "
            "spans kept uncompressed so a read skips re-verifying and inflating; 0 = off."
        ),
    )
    passthrough: bool = field(
        default=True,
        metadata=_doc(
            "FUSE passthrough (Linux 6.9+): files read again are copied to <root>/passthrough "
            "and the kernel serves their later reads from the copy, at local-disk speed; the "
            "mount then counts as one filesystem stacking level (see docs/configuration.md)."
        ),
    )
    passthrough_min_file_bytes: int = field(
        default=1024 * 1024,
        metadata=_doc(
            "Smallest file copied for passthrough, in bytes. A layer whose files of this size "
            "hold less than half of its bytes is served without OPEN requests (no passthrough)."
        ),
    )
    passthrough_max_bytes: int = field(
        default=4 * 1024 * 1024 * 1024,
        metadata=_doc("Disk bound of the passthrough copies under <root>/passthrough, in bytes."),
    )
    push_after_read_bytes: int = field(
        default=512 * 1024,  # snapshotter.fs.push.DEFAULT_PUSH_BYTES (a test keeps them equal)
        metadata=_doc(
            "Bytes of the small files that follow a file in its layer, pushed into the "
            "kernel's page cache when a read starts that file and their bytes are already "
            "local, so reading them sends no READ to the daemon; 0 = off."
        ),
    )
    tree_processes: int = field(
        default=2,
        metadata=_doc(
            "Worker processes that decode zTOCs and build layer trees off the daemon's "
            "interpreter (started with the first build, stopped after a minute idle); 0 "
            "builds them in the daemon's threads."
        ),
    )
    max_parallel_requests: int = field(
        default=4,
        metadata=_doc(
            "Registry operations in flight at once, of every kind and layer (discovery, "
            "span reads, background fetch, local-unpack downloads)."
        ),
    )
    request_timeout_sec: float = field(
        default=60.0, metadata=_doc("Timeout of one registry Range request.")
    )
    background_fetch: bool = field(
        default=True,
        metadata=_doc("Fetch the rest of mounted layers in the background after a quiet period."),
    )
    background_quiet_period_ms: int = field(
        default=10000,
        metadata=_doc("Quiet time after a layer mount or on-demand read before background fetch."),
    )
    background_rate_bytes_per_sec: int = field(
        default=64 * 1024 * 1024,
        metadata=_doc("Background fetch rate limit in bytes per second; 0 = unlimited."),
    )
    background_step_bytes: int = field(
        default=8 * 1024 * 1024,
        metadata=_doc("Most compressed bytes one background fetch request takes."),
    )
    background_stream_after_bytes: int = field(
        default=64 * 1024 * 1024,
        metadata=_doc(
            "When reads fetched this many compressed bytes on demand within the quiet period, "
            "background fetch runs alongside them instead of waiting; 0 = never."
        ),
    )
    background_error_backoff_sec: float = field(
        default=30.0,
        metadata=_doc("After a failed background step, seconds before that layer is tried again."),
    )
    max_request_bytes: int = field(
        default=16 * 1024 * 1024,
        metadata=_doc("Largest Range request a read's missing spans are coalesced into, in bytes."),
    )
    readahead_spans: int = field(
        default=4,
        metadata=_doc("Spans fetched ahead of a sequential reader (per layer); 0 = no read-ahead."),
    )
    memory_cache_spans: int = field(
        default=8, metadata=_doc("Inflated spans kept in memory per mounted layer.")
    )
    memory_cache_bytes: int = field(
        default=32 * 1024 * 1024,
        metadata=_doc(
            "Inflated bytes kept in memory, all mounted layers together (least recently used "
            "out first, across layers)."
        ),
    )
    inflate_threads: int = field(
        default=0, metadata=_doc("Threads inflating spans, all layers together; 0 = CPU count.")
    )
    fetch_max_attempts: int = field(
        default=4,
        metadata=_doc("Tries of one Range request at one source (transient errors, bad bytes)."),
    )
    fetch_backoff_initial_ms: int = field(
        default=50, metadata=_doc("Delay before the first retry; doubles per retry, jittered.")
    )
    fetch_backoff_max_ms: int = field(
        default=2000, metadata=_doc("Longest delay between retries of a Range request.")
    )

    def read_config(self) -> ReadConfig:
        """The read-path settings. Raises ValueError for values `ReadConfig` rejects."""
        from snapshotter.lazy.reader import ReadConfig

        return ReadConfig(
            max_request_bytes=self.max_request_bytes,
            readahead_spans=self.readahead_spans,
            memory_cache_spans=self.memory_cache_spans,
            memory_cache_bytes=self.memory_cache_bytes,
            inflate_threads=self.inflate_threads,
        )

    def background_config(self) -> BackgroundConfig:
        """The background fetch settings. Raises ValueError for values it rejects."""
        from snapshotter.lazy.background import BackgroundConfig

        return BackgroundConfig(
            enabled=self.background_fetch,
            quiet_period_ms=self.background_quiet_period_ms,
            rate_bytes_per_sec=self.background_rate_bytes_per_sec,
            step_bytes=self.background_step_bytes,
            error_backoff_sec=self.background_error_backoff_sec,
            stream_after_bytes=self.background_stream_after_bytes,
        )

    def fetch_config(self) -> FetchConfig:
        """The registry fetch settings. Raises ValueError for values it rejects."""
        from snapshotter.lazy.sources import FetchConfig

        return FetchConfig(
            max_attempts=self.fetch_max_attempts,
            backoff_initial_ms=self.fetch_backoff_initial_ms,
            backoff_max_ms=self.fetch_backoff_max_ms,
            request_timeout_sec=self.request_timeout_sec,
        )

    def passthrough_config(self, directory: Path) -> PassthroughConfig:
        """The passthrough settings with backing files in `directory` (also when it is off: a
        connection kept from a daemon that had it on is still served by its journal)."""
        from snapshotter.fs.passthrough import PassthroughConfig

        return PassthroughConfig(
            directory,
            enabled=self.passthrough,
            min_file_bytes=self.passthrough_min_file_bytes,
            max_bytes=self.passthrough_max_bytes,
        )

    def cache_config(self) -> CacheConfig:
        """The span cache settings. Raises ValueError for negative sizes."""
        from snapshotter.lazy.cache import CacheConfig

        return CacheConfig(
            max_bytes=self.cache_max_bytes, inflated_max_bytes=self.inflated_cache_max_bytes
        )


@dataclass(frozen=True)
class PeersConfig:
    """[peers]: nodes fetch spans from each other before the registry (docs/peers.md)."""

    enable: bool = field(
        default=False,
        metadata=_doc(
            "Fetch spans from peers and serve them to peers (a node alone sees no change)."
        ),
    )
    listen: str = field(
        default="0.0.0.0:8472",
        metadata=_doc('Peer listener, "ADDR:PORT" (IPv6 as "[ADDR]:PORT").'),
    )
    advertise: str = field(
        default="",
        metadata=_doc(
            'The "ADDR:PORT" other nodes reach this one at; empty = listen\'s (which must then '
            "name an address, not 0.0.0.0). Members with this address are this node."
        ),
    )
    static: tuple[str, ...] = field(
        default=(), metadata=_doc('Peers as "ADDR:PORT" (a fixed list; merged with the others).')
    )
    dns: str = field(
        default="",
        metadata=_doc(
            "A DNS name whose A/AAAA records are the peers (a headless Service), with "
            "listen's port; re-resolved every refresh_sec."
        ),
    )
    dns_servers: tuple[str, ...] = field(
        default=(),
        metadata=_doc(
            "DNS servers (IP addresses) asked for `dns`; empty = /etc/resolv.conf's. A host "
            "daemon on Kubernetes names the cluster DNS Service here."
        ),
    )
    kubernetes_service: str = field(
        default="",
        metadata=_doc(
            'The peers as the ready endpoints of a Service, "NAMESPACE/NAME", read from '
            "its EndpointSlices through the Kubernetes API; empty = off."
        ),
    )
    kubeconfig: str = field(
        default="",
        metadata=_doc(
            "kubeconfig for the Kubernetes API (e.g. kubelet's); empty = in-cluster "
            "service-account credentials."
        ),
    )
    refresh_sec: float = field(
        default=10.0, metadata=_doc("How often the DNS and Kubernetes members are re-read.")
    )
    owners: int = field(
        default=2, metadata=_doc("Peers that own each chunk of a layer (rendezvous hashing).")
    )
    chunk_bytes: int = field(
        default=16 * 1024 * 1024,
        metadata=_doc(
            "Ownership unit: an aligned run of spans of this many compressed bytes; a read's "
            "requests never cross a chunk boundary when peers are on."
        ),
    )
    connect_timeout_sec: float = field(
        default=1.0, metadata=_doc("Longest wait for a TCP connection to a peer.")
    )
    budget_sec: float = field(
        default=10.0,
        metadata=_doc(
            "Longest one request to a peer may take, answer included (an owner may fetch "
            "from its registry first); past it the next source is tried."
        ),
    )
    down_backoff_sec: float = field(
        default=5.0,
        metadata=_doc(
            "A failing peer is skipped this long; doubled on each further failure up to "
            "down_backoff_max_sec."
        ),
    )
    down_backoff_max_sec: float = field(
        default=120.0, metadata=_doc("Longest a failing peer is skipped before it is tried again.")
    )
    max_uploads: int = field(
        default=8, metadata=_doc("Peer requests served at once (the rest wait).")
    )
    upload_rate_bytes_per_sec: int = field(
        default=0, metadata=_doc("Upload rate limit of the peer listener; 0 = unlimited.")
    )
    allow_non_members: bool = field(
        default=False,
        metadata=_doc(
            "Serve any client; false = only current members and this node's own addresses "
            "(so a pod cannot read layers through the listener)."
        ),
    )
    token_file: str = field(
        default="",
        metadata=_doc(
            "File holding a shared secret every node sends and requires (X-Sociable-Token); "
            "empty = none."
        ),
    )

    def advertised(self) -> tuple[str, int]:
        """This node's (host, port) as members see it: `advertise`, else `listen`'s."""
        from snapshotter.peers.address import parse_address

        return parse_address(self.advertise or self.listen)


@dataclass(frozen=True)
class MirrorConfig:
    """[mirror]: the peer listener as containerd's hosts.toml registry mirror (docs/mirror.md)."""

    enable: bool = field(
        default=True,
        metadata=_doc(
            "With [peers] enable: serve blobs containerd holds, here or on a member, to this "
            "node's containerd (hosts.toml) and to members."
        ),
    )
    containerd_address: str = field(
        default="/run/containerd/containerd.sock",
        metadata=_doc("containerd's socket: its content store is read through the Content API."),
    )
    namespace: str = field(
        default="k8s.io", metadata=_doc("containerd namespace whose content is served.")
    )
    lookup_timeout_sec: float = field(
        default=2.0,
        metadata=_doc("Longest a mirror request looks for a blob before answering 404."),
    )
    stall_timeout_sec: float = field(
        default=10.0,
        metadata=_doc("A blob whose bytes stop coming this long is cut (containerd retries)."),
    )
    resolve_tags: bool = field(
        default=True,
        metadata=_doc(
            "Answer a manifest by tag with what this node's containerd image store names "
            "(public repositories only); false = tags are resolved at the registry."
        ),
    )
    resolve_latest: bool = field(
        default=False,
        metadata=_doc(
            "With resolve_tags: resolve the tag latest too (it moves most, so a node's copy "
            "is the most likely to be stale)."
        ),
    )


@dataclass(frozen=True)
class CriConfig:
    """[cri]: the CRI image-service proxy kubelet talks to (docs/credentials.md)."""

    enable: bool = field(
        default=False,
        metadata=_doc(
            "Serve CRI's ImageService on `address`, forwarding every call to containerd and "
            "keeping the credentials of each PullImage for lazy reads."
        ),
    )
    address: str = field(
        default="/run/sociable/cri.sock",
        metadata=_doc("The socket kubelet's --image-service-endpoint names (unix://<address>)."),
    )
    containerd_address: str = field(
        default="/run/containerd/containerd.sock",
        metadata=_doc("containerd's CRI socket, where every call is forwarded."),
    )


@dataclass(frozen=True)
class CredentialProvidersConfig:
    """[credential_providers]: kubelet's credential-provider plugins (docs/credentials.md)."""

    config: str = field(
        default="",
        metadata=_doc(
            "kubelet's CredentialProviderConfig file (--image-credential-provider-config); "
            "empty = none."
        ),
    )
    bin_dir: str = field(
        default="",
        metadata=_doc("Directory of the plugin binaries (--image-credential-provider-bin-dir)."),
    )


@dataclass(frozen=True)
class MetricsConfig:
    """[metrics]: Prometheus metrics of the daemon (docs/metrics.md)."""

    address: str = field(
        default="",
        metadata=_doc(
            'ADDR:PORT serving the metrics at /metrics over HTTP, e.g. "127.0.0.1:9101"; '
            "empty = no metrics. Anyone who can reach it can read them."
        ),
    )


@dataclass(frozen=True)
class Config:
    """The whole configuration file."""

    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    snapshots: SnapshotsConfig = field(default_factory=SnapshotsConfig)
    containerd: ContainerdConfig = field(default_factory=ContainerdConfig)
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    peers: PeersConfig = field(default_factory=PeersConfig)
    mirror: MirrorConfig = field(default_factory=MirrorConfig)
    cri: CriConfig = field(default_factory=CriConfig)
    credential_providers: CredentialProvidersConfig = field(
        default_factory=CredentialProvidersConfig
    )
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


LOG_LEVELS = ("debug", "info", "warning", "error")


def _check_value(section: str, key: str, expected: type, value: Any) -> Any:
    where = f"[{section}] {key}"
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(f"{where}: {value} is too large") from None
    if expected is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    if expected is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        return tuple(value)
    if expected is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if not isinstance(value, expected):
        raise ConfigError(f"{where}: expected {expected.__name__}, got {type(value).__name__}")
    return value


def _validate(cfg: Config) -> None:
    d = cfg.daemon
    if d.log_level not in LOG_LEVELS:
        raise ConfigError(
            f"[daemon] log_level: {d.log_level!r} is not one of {', '.join(LOG_LEVELS)}"
        )
    if d.grpc_threads < 1:
        raise ConfigError(f"[daemon] grpc_threads: must be at least 1, got {d.grpc_threads}")
    if d.shutdown_grace_sec < 0:
        raise ConfigError("[daemon] shutdown_grace_sec: must not be negative")
    if not d.root.startswith("/"):
        raise ConfigError(f"[daemon] root: must be an absolute path, got {d.root!r}")
    if d.address != "fd://" and not d.address.startswith("/"):
        raise ConfigError(
            f'[daemon] address: must be an absolute path or "fd://", got {d.address!r}'
        )
    if cfg.snapshots.disk_threads < 1:
        raise ConfigError("[snapshots] disk_threads: must be at least 1")
    if not cfg.containerd.plugin_name:
        raise ConfigError("[containerd] plugin_name: must not be empty")
    r = cfg.remote
    if r.mount_timeout_sec <= 0 or r.request_timeout_sec <= 0 or r.unpack_timeout_sec <= 0:
        raise ConfigError(
            "[remote] mount_timeout_sec, request_timeout_sec and unpack_timeout_sec must be "
            "positive"
        )
    if r.tree_processes < 0:
        raise ConfigError("[remote] tree_processes: must not be negative")
    if r.max_parallel_requests < 1:
        raise ConfigError("[remote] max_parallel_requests: must be at least 1")
    if r.cache_max_bytes < 0 or r.background_rate_bytes_per_sec < 0:
        raise ConfigError(
            "[remote] cache_max_bytes and background_rate_bytes_per_sec must not be negative"
        )
    if r.inflated_cache_max_bytes < 0:
        raise ConfigError("[remote] inflated_cache_max_bytes: must not be negative")
    if r.passthrough_min_file_bytes < 0 or r.passthrough_max_bytes < 0:
        raise ConfigError(
            "[remote] passthrough_min_file_bytes and passthrough_max_bytes must not be negative"
        )
    if r.push_after_read_bytes < 0:
        raise ConfigError("[remote] push_after_read_bytes: must not be negative")
    if r.background_stream_after_bytes < 0:
        raise ConfigError("[remote] background_stream_after_bytes: must not be negative")
    if r.background_quiet_period_ms < 0:
        raise ConfigError("[remote] background_quiet_period_ms: must not be negative")
    try:  # the read, fetch and background settings check their own values
        r.read_config()
        r.fetch_config()
        r.background_config()
    except ValueError as e:
        raise ConfigError(f"[remote] {e}") from e
    _validate_peers(cfg.peers)
    _validate_metrics(cfg.metrics)
    for key, path in (
        ("[cri] address", cfg.cri.address),
        ("[cri] containerd_address", cfg.cri.containerd_address),
    ):
        if not path.startswith("/"):
            raise ConfigError(f"{key}: not an absolute path: {path!r}")
    m = cfg.mirror
    if m.lookup_timeout_sec <= 0 or m.stall_timeout_sec <= 0:
        raise ConfigError("[mirror] lookup_timeout_sec and stall_timeout_sec must be positive")
    if not m.containerd_address.startswith("/"):
        raise ConfigError(
            f"[mirror] containerd_address: not an absolute path: {m.containerd_address!r}"
        )


def _validate_metrics(m: MetricsConfig) -> None:
    from snapshotter.peers.address import AddressError, parse_address

    if m.address:
        try:
            parse_address(m.address)
        except AddressError as e:
            raise ConfigError(f"[metrics] address: {e}") from e


def _validate_peers(p: PeersConfig) -> None:
    from snapshotter.peers.address import AddressError, parse_address

    try:
        listen_host, _ = parse_address(p.listen)
        if p.advertise:
            parse_address(p.advertise, allow_unspecified=False)
        for peer in p.static:
            parse_address(peer, allow_unspecified=False)
    except AddressError as e:
        raise ConfigError(f"[peers] {e}") from e
    if p.enable and not p.advertise and listen_host in ("0.0.0.0", "::"):
        raise ConfigError(
            f"[peers] advertise: set it to this node's ADDR:PORT (listen is {p.listen})"
        )
    if p.kubernetes_service and p.kubernetes_service.count("/") != 1:
        raise ConfigError(
            f"[peers] kubernetes_service: {p.kubernetes_service!r} is not NAMESPACE/NAME"
        )
    if p.owners < 1 or p.max_uploads < 1:
        raise ConfigError("[peers] owners and max_uploads must be at least 1")
    if p.chunk_bytes < 64 * 1024:
        raise ConfigError("[peers] chunk_bytes: must be at least 65536")
    if min(p.refresh_sec, p.connect_timeout_sec, p.budget_sec, p.down_backoff_sec) <= 0:
        raise ConfigError(
            "[peers] refresh_sec, connect_timeout_sec, budget_sec and down_backoff_sec must "
            "be positive"
        )
    if p.down_backoff_max_sec < p.down_backoff_sec:
        raise ConfigError("[peers] down_backoff_max_sec: must be at least down_backoff_sec")
    if p.upload_rate_bytes_per_sec < 0:
        raise ConfigError("[peers] upload_rate_bytes_per_sec: must not be negative")


def from_mapping(data: dict[str, Any]) -> Config:
    """Build a Config from parsed TOML. Raises ConfigError naming the bad key."""
    sections: dict[str, Any] = {}
    known = {f.name: f for f in dataclasses.fields(Config)}
    for name, table in data.items():
        if name not in known:
            raise ConfigError(f"unknown section [{name}]")
        if not isinstance(table, dict):
            raise ConfigError(f"[{name}] must be a table")
        cls = known[name].default_factory
        assert isinstance(cls, type)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in table.items():
            if key not in fields:
                raise ConfigError(f"[{name}] unknown key {key!r}")
            default = fields[key].default
            values[key] = _check_value(name, key, type(default), value)
        sections[name] = cls(**values)
    cfg = Config(**sections)
    _validate(cfg)
    return cfg


def load(path: Path | None) -> Config:
    """Load the config file at `path`.

    `path` None means the default location, where a missing file means all
    defaults; an explicit path that does not exist is a ConfigError, as is
    invalid TOML or any bad key/value.
    """
    explicit = path is not None
    p = path if path is not None else DEFAULT_CONFIG_PATH
    try:
        text = p.read_text()
    except FileNotFoundError as e:
        if explicit:
            raise ConfigError(f"config file {str(p)!r} does not exist") from e
        return Config()
    except OSError as e:
        raise ConfigError(f"config file {str(p)!r} cannot be read: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8: {e}") from e
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}") from e
    try:
        return from_mapping(data)
    except ConfigError as e:
        raise ConfigError(f"config file {str(p)!r}: {e}") from e


def _toml_value(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def render(cfg: Config) -> str:
    """The TOML text of `cfg`, every key with its documentation as a comment."""
    lines = [
        "# sociable-snapshotter configuration (all keys, default values).",
        "# Units are part of key names: _sec seconds, _bytes bytes.",
    ]
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        lines.append("")
        lines.append(f"# {(type(sub).__doc__ or '').strip()}")
        lines.append(f"[{section.name}]")
        for f in dataclasses.fields(sub):
            lines.append(f"# {f.metadata.get('doc', '')}")
            lines.append(f"{f.name} = {_toml_value(getattr(sub, f.name))}")
    return "\n".join(lines) + "\n"


def render_default() -> str:
    """The full default configuration file."""
    return render(Config())
