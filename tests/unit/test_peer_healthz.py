"""`/healthz` as the daemon serves it: a real `PeerNode` (membership, allow policy, token,
listener) started in a task scope, probed on loopback the way kubelet probes the
`sociable-peers` DaemonSet's host-network pod: from an address of the node itself, without
the cluster's token. The probe passes while the node serves and fails once it stops."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from index.digest import Digest
from index.model import Ztoc
from index.oci.reference import Reference
from snapshotter.config import PeersConfig
from snapshotter.lazy.cache import SpanCache
from snapshotter.lazy.demand import DemandTracker
from snapshotter.lazy.sources import BlobSource
from snapshotter.peers.listener import HEALTH_PATH
from snapshotter.peers.node import PeerNode
from snapshotter.peers.serving import SpanServer
from snapshotter.tasks import open_task_scope
from tests.support.peers import FakeMounted
from tests.support.registry import free_port


def span_server(cache_dir: Path) -> SpanServer:
    """A span server that holds nothing (the probe never reaches it)."""

    async def load_ztoc(ref: Reference, digest: Digest) -> Ztoc:
        raise AssertionError("the probe loaded a zTOC")

    def upstream(ref: Reference) -> BlobSource:
        raise AssertionError("the probe asked the registry")

    return SpanServer(
        layers=FakeMounted(),
        cache=SpanCache(cache_dir),
        load_ztoc=load_ztoc,
        upstream=upstream,
        tracker=DemandTracker(),
        io_limiter=trio.CapacityLimiter(1),
        max_request_bytes=4 << 20,
    )


async def get(url: str, source: str) -> httpx.Response:
    transport = httpx.AsyncHTTPTransport(local_address=source)
    async with httpx.AsyncClient(transport=transport, trust_env=False, timeout=5) as http:
        return await http.get(url)


async def test_the_probe_passes_from_the_nodes_address_while_the_node_serves(
    tmp_path: Path,
) -> None:
    token = tmp_path / "peer-token"
    token.write_text("cluster-secret\n")
    port = free_port()
    cfg = PeersConfig(
        enable=True,
        listen=f"127.0.0.1:{port}",
        static=[f"127.0.0.1:{port}"],
        token_file=str(token),
    )
    node = PeerNode.create(cfg)
    url = f"http://127.0.0.1:{port}{HEALTH_PATH}"
    try:
        async with open_task_scope("peers") as scope:  # closed on exit: the daemon stops
            node.start(scope, span_server(tmp_path / "cache"))
            # another address of this machine, as the node's InternalIP is: not a member,
            # allowed as one of the node's own, no token sent
            got = await get(url, source="127.0.0.2")
            assert (got.status_code, got.text) == (200, "ok\n")
            assert node.app is not None and node.app.forbidden == 0
            assert not node.membership.is_member("127.0.0.2")
        with pytest.raises(httpx.ConnectError):
            await get(url, source="127.0.0.2")
    finally:
        await node.aclose()
