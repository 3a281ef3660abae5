"""Peers on a cluster of nodes in network namespaces (`tests.support.cluster`).

Each test builds its own cluster: a bridge, a registry behind a `tc` limit, three nodes each
with its own containerd (CRI) and `sociable-snapshotter`. The image (busybox and four layers of
incompressible files, about 33 MB compressed, 1 MiB spans, every layer indexed) is built once
per module and pushed to each cluster's registry with `sociable convert`. A node "starts" by
pulling the image through CRI and running a container that prints the `sha256sum` of every
file, checked against the files' known digests.

Registry bytes are counted per phase. "Layer bytes" are the body bytes of the registry's blob
answers for the image's layers (its access log); the veth counter of the registry's link
(everything it sent) is printed next to them. The reference for "what one node alone
fetches" is the sum of the layers' compressed sizes: a node reads every file and its
background fetch completes the rest, so alone it fetches each layer in full once, which
`test_cluster_without_peers` checks for every node.

The failure tests run the registry link slower (:data:`SLOW_RATE`) so the cut lands while
the nodes are still reading, and keep a failed peer down for the rest of the test
(`down_backoff_sec`), so "down" can be read after the other nodes are done; the nodes that lost
the peer must then still stop on SIGTERM.

Every wait is bounded by the test's budget (:data:`TEST_BUDGET_S`), so a hung node fails the
test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import pytest

from tests.support.cluster import (
    Cluster,
    Node,
    PeerImage,
    RegistryMark,
    build_peer_image,
    call_in_thread,
    missing_binaries,
    open_cluster,
    wait_until,
)
from tests.support.containerd import capabilities

pytestmark = [pytest.mark.root, pytest.mark.slow]

NODES = 3
RATE = "200mbit"
SLOW_RATE = "40mbit"
"""The registry link in the failure tests: a transfer lasts long enough to cut it midway."""
TEST_BUDGET_S = 110.0
SIMULTANEOUS_MAX = 1.3
"""Registry layer bytes of a simultaneous start, at most this times the layers' sizes."""
ROLLING_MAX = 0.05
"""Registry layer bytes while the other nodes start after the first, at most this share of
the layers."""
CUT_AT = 0.25
"""The failure tests cut a peer off once the registry has sent this share of the layers."""


class Budget:
    """The time left of a test's :data:`TEST_BUDGET_S`."""

    def __init__(self, seconds: float = TEST_BUDGET_S) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self, at_least: float = 1.0) -> float:
        return max(at_least, self.deadline - time.monotonic())


def _require() -> None:
    caps = capabilities()
    missing = [] if caps.root else ["root"]
    if not caps.overlay:
        missing.append("overlay filesystem")
    if not caps.fuse:
        missing.append("fuse")
    missing += missing_binaries()
    if missing:
        pytest.skip(f"PREREQUISITE MISSING for the cluster tests: {', '.join(missing)}")


@pytest.fixture(scope="module")
def peer_image(tmp_path_factory: pytest.TempPathFactory) -> PeerImage:
    _require()
    return build_peer_image(tmp_path_factory.mktemp("peer-image") / "layout")


@pytest.fixture(scope="module")
def convert_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `sociable` store shared by the module's pushes (zTOCs are built once)."""
    return tmp_path_factory.mktemp("convert-root")


@pytest.fixture
def budget() -> Budget:
    return Budget()


def _cluster(
    tmp_path: Path,
    *,
    peers: bool,
    rate: str = RATE,
    node_config: Callable[[int, list[str]], str] | None = None,
) -> contextlib.AbstractContextManager[Cluster]:
    return open_cluster(
        tmp_path / "c", NODES, registry_rate=rate, peers=peers, node_config=node_config
    )


def _long_down(i: int, addresses: list[str]) -> str:
    """A failed peer stays down (skipped) for the rest of the test, so its state can be read
    after the other nodes are done."""
    return "[peers]\ndown_backoff_sec = 300.0\ndown_backoff_max_sec = 300.0\n"


def _layer_report(cluster: Cluster, image: PeerImage, mark: RegistryMark, what: str) -> int:
    """Prints the registry traffic since ``mark``; returns its layer bytes."""
    traffic = cluster.registry.since(mark)
    layer = traffic.layer_bytes(image.layer_digests)
    print(
        f"{what}: registry layer bytes {layer} ({layer / image.layer_bytes:.2f}x of the layers' "
        f"{image.layer_bytes}), on the wire {traffic.sent_bytes}, blob GETs "
        f"{traffic.blob_requests}"
    )
    return layer


def _check_sums(node: Node, image: PeerImage, sums: dict[str, str]) -> None:
    wrong = sorted(p for p in image.paths if sums.get(p) != image.sha256[p])
    assert not wrong, f"node {node.index}: wrong or missing checksums {wrong}\n{node.describe()}"


def _start_all(nodes: list[Node], ref: str, image: PeerImage) -> list[Future[dict[str, str]]]:
    return [
        call_in_thread(functools.partial(n.pull_and_checksum, ref, image.paths), f"node-{n.index}")
        for n in nodes
    ]


def _wait_sums(node: Node, future: Future[dict[str, str]], budget: Budget) -> dict[str, str]:
    try:
        return future.result(timeout=budget.left())
    except TimeoutError as e:
        raise AssertionError(f"node {node.index}: no result in time\n{node.describe()}") from e


def test_cluster_without_peers(
    peer_image: PeerImage, convert_root: Path, tmp_path: Path, budget: Budget
) -> None:
    """Three nodes, peers off, one after another: each reads every file right and fetches
    every layer from the registry itself, so the registry sends about three times what one
    node needs (the counting works)."""
    layers = len(peer_image.layer_digests)
    with _cluster(tmp_path, peers=False) as cluster:
        ref = cluster.push(peer_image, convert_root=convert_root, rate=RATE)
        per_node: list[tuple[int, int]] = []
        for node in cluster.nodes:
            mark = cluster.registry.mark()
            sums = node.pull_and_checksum(ref, peer_image.paths, timeout=budget.left())
            _check_sums(node, peer_image, sums)
            node.wait_fetched(layers, timeout=budget.left())
            layer = _layer_report(cluster, peer_image, mark, f"node {node.index} alone")
            per_node.append((layer, cluster.registry.since(mark).sent_bytes))
        for node, (layer, wire) in zip(cluster.nodes, per_node, strict=True):
            assert layer >= 0.95 * peer_image.layer_bytes, (node.index, per_node)
            assert layer <= 1.3 * peer_image.layer_bytes, (node.index, per_node)
            assert wire >= layer, (node.index, per_node)
        total_wire = sum(wire for _, wire in per_node)
        assert total_wire > 2 * per_node[0][1], per_node
        assert sum(layer for layer, _ in per_node) > 2 * per_node[0][0], per_node
        for node in cluster.nodes:
            assert node.daemon_alive(), node.describe()


def test_simultaneous_start_with_peers(
    peer_image: PeerImage, convert_root: Path, tmp_path: Path, budget: Budget
) -> None:
    """Three nodes with peers start at the same time: every file reads right, and the
    registry sends the layers about once for the cluster (at most 1.3x of the layers' sizes,
    measured until every node has every span)."""
    layers = len(peer_image.layer_digests)
    with _cluster(tmp_path, peers=True) as cluster:
        ref = cluster.push(peer_image, convert_root=convert_root, rate=RATE)
        mark = cluster.registry.mark()
        futures = _start_all(cluster.nodes, ref, peer_image)
        for node, future in zip(cluster.nodes, futures, strict=True):
            _check_sums(node, peer_image, _wait_sums(node, future, budget))
        for node in cluster.nodes:
            node.wait_fetched(layers, timeout=budget.left())
        layer = _layer_report(cluster, peer_image, mark, "simultaneous start")
        assert layer <= SIMULTANEOUS_MAX * peer_image.layer_bytes, (
            f"the registry sent {layer} layer bytes for {NODES} nodes starting together, more "
            f"than {SIMULTANEOUS_MAX}x of the layers' {peer_image.layer_bytes}\n"
            f"{cluster.describe(15)}"
        )


def test_rolling_start_with_peers(
    peer_image: PeerImage, convert_root: Path, tmp_path: Path, budget: Budget
) -> None:
    """Node 0 starts and completes its layers; then the other nodes start one after another
    and get the layers from the peers: the registry sends at most 5% of the layers meanwhile,
    and each node's own count (`bytesFrom`) agrees: at most 5% from the registry, some from
    peers."""
    layers = len(peer_image.layer_digests)
    with _cluster(tmp_path, peers=True) as cluster:
        ref = cluster.push(peer_image, convert_root=convert_root, rate=RATE)
        first, *rest = cluster.nodes
        mark = cluster.registry.mark()
        _check_sums(first, peer_image, first.pull_and_checksum(ref, peer_image.paths))
        first.wait_fetched(layers, timeout=budget.left())
        _layer_report(cluster, peer_image, mark, "node 0 alone")
        mark = cluster.registry.mark()
        for node in rest:
            sums = node.pull_and_checksum(ref, peer_image.paths, timeout=budget.left())
            _check_sums(node, peer_image, sums)
            node.wait_fetched(layers, timeout=budget.left())
        layer = _layer_report(cluster, peer_image, mark, f"nodes 1..{NODES - 1} after node 0")
        assert layer <= ROLLING_MAX * peer_image.layer_bytes, (
            f"the registry sent {layer} layer bytes while nodes 1..{NODES - 1} started, more than "
            f"{ROLLING_MAX:.0%} of the layers' {peer_image.layer_bytes}\n{cluster.describe(15)}"
        )
        for node in rest:
            sources = node.bytes_from()
            print(f"node {node.index} got {sources}")
            from_registry = sources.get("registry", 0)
            assert from_registry <= ROLLING_MAX * peer_image.layer_bytes, (
                f"node {node.index}: bytes by source {sources}: more than {ROLLING_MAX:.0%} "
                f"from the registry\n{node.describe(15)}"
            )
            assert sources.get("peers", 0) > 0, (
                f"node {node.index}: bytes by source {sources}: none from the peers\n"
                f"{node.describe(15)}"
            )


def _cut_midway(
    cluster: Cluster, image: PeerImage, convert_root: Path, budget: Budget, cut: str
) -> tuple[Node, list[Node]]:
    """Starts every node together and, once the registry has sent :data:`CUT_AT` of the
    layers, cuts the last node off (``cut``: "kill" its daemon with SIGKILL, or take its
    "link" down). Checks the other nodes read every file right; returns (victim, others)."""
    ref = cluster.push(image, convert_root=convert_root, rate=SLOW_RATE)
    *others, victim = cluster.nodes
    mark = cluster.registry.mark()
    futures = _start_all(cluster.nodes, ref, image)
    wait_until(
        lambda: (
            cluster.registry.since(mark).layer_bytes(image.layer_digests)
            >= CUT_AT * image.layer_bytes
        ),
        timeout=budget.left(),
        what=f"the registry sending {CUT_AT:.0%} of the layers",
    )
    unfinished = [n.index for n, f in zip(cluster.nodes, futures, strict=True) if not f.done()]
    if cut == "kill":
        victim.kill_daemon(signal.SIGKILL)
    else:
        victim.link_down()
    print(f"node {victim.index} cut off ({cut}) while nodes {unfinished} were still reading")
    for node, future in zip(others, futures[:-1], strict=True):
        _check_sums(node, image, _wait_sums(node, future, budget))
    return victim, others


def _wait_down(victim: Node, others: list[Node], budget: Budget, cluster: Cluster) -> None:
    def all_see_down() -> bool:
        return all(n.peer_states().get(victim.peer_address) == "down" for n in others)

    try:
        wait_until(all_see_down, timeout=min(30.0, budget.left()), what="peer shown down")
    except AssertionError as e:
        states = {n.index: n.peer_states() for n in others}
        raise AssertionError(
            f"node {victim.index} ({victim.peer_address}) not shown down by the others: "
            f"{states}\n{cluster.describe(15)}"
        ) from e


def _stop_others(others: list[Node]) -> None:
    """The nodes that lost a peer are still up and stop on SIGTERM in bounded time
    (:meth:`Node.stop_daemon` raises otherwise, with the daemon's thread stacks in its log)."""
    for node in others:
        assert node.daemon_alive(), node.describe()
    for node in others:
        node.stop_daemon()


def test_peer_killed_mid_transfer(
    peer_image: PeerImage, convert_root: Path, tmp_path: Path, budget: Budget
) -> None:
    """A peer's daemon is killed (SIGKILL) while the others read through it: they still read
    every file right, in bounded time, show it down, and still stop on SIGTERM."""
    with _cluster(tmp_path, peers=True, rate=SLOW_RATE, node_config=_long_down) as cluster:
        victim, others = _cut_midway(cluster, peer_image, convert_root, budget, "kill")
        assert not victim.daemon_alive()
        _wait_down(victim, others, budget, cluster)
        _stop_others(others)


def test_peer_link_down(
    peer_image: PeerImage, convert_root: Path, tmp_path: Path, budget: Budget
) -> None:
    """A peer's link goes down while the others read through it: they still read every file
    right, in bounded time, and show it down; they still stop on SIGTERM (an answer being
    sent to the unreachable peer must not hold the daemon)."""
    with _cluster(tmp_path, peers=True, rate=SLOW_RATE, node_config=_long_down) as cluster:
        victim, others = _cut_midway(cluster, peer_image, convert_root, budget, "link")
        _wait_down(victim, others, budget, cluster)
        _stop_others(others)
