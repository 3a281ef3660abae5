"""`PeerNode`: this node's part in the peer cluster, built from `[peers]`.

Two steps, because the listener serves the layers the mounter mounts and the mounter's
layers fetch through the peers: `PeerNode.create` (membership sources, the peer client, the
settings every `PeerSource` shares, the listening socket, bound now) before the layers, and
`start` (membership refresh and the listener, in the given task scope) after them.

Policy: a broken peer set-up (a port in use, an unreadable token file, a bad DNS server or
kubeconfig) disables the peers with one `peers disabled` error line (keys `error`); the
node then fetches from the registry as without peers, and `status` says why.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from snapshotter.config import PeersConfig
from snapshotter.mirror.serve import MirrorService
from snapshotter.tasks import TaskScope

from .address import format_address, parse_address
from .client import PeerClient
from .listener import PeerApp, bind_listener, serve_listener
from .members import Membership, MemberSource, StaticMembers, is_local_address
from .serving import SpanServer
from .source import PeerFetchStatistics, PeerSettings

log = logging.getLogger(__name__)


def member_sources(cfg: PeersConfig) -> list[MemberSource]:
    """The member sources `cfg` names (static, DNS, EndpointSlices). Raises ValueError or
    OSError for a source that cannot be set up (a bad DNS server, an unreadable kubeconfig)."""
    _, port = cfg.advertised()
    sources: list[MemberSource] = []
    if cfg.static:
        sources.append(StaticMembers(cfg.static))
    if cfg.dns:
        from .dns import DnsMembers

        sources.append(DnsMembers(cfg.dns, port, servers=cfg.dns_servers))
    if cfg.kubernetes_service:
        from .kube import endpoint_slice_source

        namespace, name = cfg.kubernetes_service.split("/")
        sources.append(endpoint_slice_source(cfg.kubeconfig, namespace, name, port))
    return sources


def own_mirror_hosts(cfg: PeersConfig) -> set[str]:
    """The `HOST:PORT`s containerd's hosts.toml may name this node's own listener by (as its
    registry mirror): the daemon's registry client leaves them out, so it never asks itself.
    Empty when peers are off."""
    if not cfg.enable:
        return set()
    port = parse_address(cfg.listen)[1]
    hosts = {f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"}
    for address in (cfg.listen, cfg.advertise):
        if address:
            host, p = parse_address(address)
            hosts.add(format_address(host, p))
    return hosts


class PeerNode:
    """See the module doc. Close with `aclose` (the client and, if never started, the socket)."""

    def __init__(
        self,
        cfg: PeersConfig,
        membership: Membership,
        client: PeerClient,
        settings: PeerSettings,
        sock: socket.socket,
        token: str,
    ) -> None:
        self.cfg = cfg
        self.membership = membership
        self.client = client
        self.settings = settings
        self._sock: socket.socket | None = sock
        self._token = token
        self.app: PeerApp | None = None

    def __repr__(self) -> str:
        return f"<PeerNode {self.settings.self_id} {self.membership!r}>"

    @classmethod
    def create(cls, cfg: PeersConfig) -> PeerNode:
        """Raises ValueError, OSError (see the module doc for what the caller does)."""
        token = ""
        if cfg.token_file:
            token = Path(cfg.token_file).read_text().strip()
            if not token:
                raise ValueError(f"token file {cfg.token_file} is empty")
        host, port = cfg.advertised()
        membership = Membership(
            member_sources(cfg),
            advertise=(host, port),
            refresh_sec=cfg.refresh_sec,
            down_backoff_sec=cfg.down_backoff_sec,
            down_backoff_max_sec=cfg.down_backoff_max_sec,
        )
        listen_host, listen_port = parse_address(cfg.listen)
        sock = bind_listener(listen_host, listen_port)
        client = PeerClient(connect_timeout_sec=cfg.connect_timeout_sec, token=token)
        settings = PeerSettings(
            view=membership,
            client=client,
            self_id=format_address(host, port),
            owners=cfg.owners,
            chunk_bytes=cfg.chunk_bytes,
            budget_sec=cfg.budget_sec,
            stats=PeerFetchStatistics(),
        )
        return cls(cfg, membership, client, settings, sock, token)

    def allowed(self, host: str) -> bool:
        """Whether a client at `host` may use the listener."""
        return (
            self.cfg.allow_non_members or self.membership.is_member(host) or is_local_address(host)
        )

    def start(
        self, scope: TaskScope, server: SpanServer, mirror: MirrorService | None = None
    ) -> None:
        """Refresh the membership and serve the listener (and `mirror`, the registry-mirror
        answers) in `scope` until it closes."""
        assert self._sock is not None, "started twice"
        self.app = PeerApp(
            server,
            is_allowed=self.allowed,
            token=self._token,
            max_uploads=self.cfg.max_uploads,
            upload_rate_bytes_per_sec=self.cfg.upload_rate_bytes_per_sec,
            max_budget_sec=self.cfg.budget_sec,
            mirror=mirror,
            is_local=is_local_address,
        )
        scope.start_soon(self.membership.serve, name="peer membership")
        scope.start_soon(serve_listener, self.app, self._sock, name="peer listener")
        self._sock = None  # the listener owns it now
        log.info(
            "peers enabled",
            extra={"advertise": self.settings.self_id, "listen": self.cfg.listen},
        )

    async def aclose(self) -> None:
        await self.client.aclose()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def status(self) -> dict[str, object]:
        """The `peers` part of `<root>/status.json`."""
        doc: dict[str, object] = {
            "state": "enabled",
            "advertise": self.settings.self_id,
            "members": self.membership.status(),
            "fetch": asdict(self.settings.stats),
        }
        if self.app is not None:
            doc["serve"] = {**asdict(self.app.server.stats), "forbidden": self.app.forbidden}
            if self.app.mirror is not None:
                doc["mirror"] = asdict(self.app.mirror.stats)
        return doc


def disabled_status(error: str) -> Callable[[], dict[str, object]]:
    """The `peers` status of a node whose peers could not start."""
    return lambda: {"state": "disabled", "error": error}
