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

`test_members_from_dns` gives the nodes no static list: their members are the A records of
one name served by a real dnsmasq on the bridge address, and the test adds and removes
records while the nodes run. `test_corrupt_peer_and_silent_peer` lists two fake members
served by the test on the bridge address: one answers every range with wrong bytes of the
right length, the other accepts connections and never answers.

Every wait is bounded by the test's budget (:data:`TEST_BUDGET_S`), so a hung node fails the
test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import http.server
import ipaddress
import json
import math
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from pathlib import Path

import dns.exception
import dns.resolver
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
from tests.support.registry import free_port

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
            sources = node.settled_bytes_from()
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


# ---------------------------------------------------------------------------------------------
# Members from DNS

DNSMASQ = "/usr/sbin/dnsmasq"
PEERS_NAME = "sociable-peers.cluster.test"
"""The name whose A records are the members (dnsmasq answers everything under `test.`)."""
REFRESH_SEC = 1.0
"""`[peers] refresh_sec` in the DNS test."""
MEMBERSHIP_WAIT_S = 10.0
"""How long a change of the records may take to reach a node's member list in `status`: a few
refreshes, plus the status writer's one-second check."""


def _bridge_ip(addresses: list[str]) -> str:
    """The bridge's address (`.1` of the nodes' /24), from the node addresses `node_config`
    gets before the cluster object exists."""
    host = addresses[0].rpartition(":")[0]
    return str(ipaddress.ip_interface(f"{host}/24").network.network_address + 1)


class ClusterDns:
    """A real dnsmasq in the host namespace on `host:port` (the bridge address, which every
    node namespace reaches) answering :data:`PEERS_NAME` from an `--addn-hosts` file that is
    re-read on SIGHUP."""

    def __init__(self, directory: Path, host: str, port: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port
        self.hosts = directory / "hosts"
        self.log = directory / "dnsmasq.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def query(self, lifetime: float = 1.0) -> list[str]:
        """The A records of :data:`PEERS_NAME` as the server answers them now, sorted."""
        r = dns.resolver.Resolver(configure=False)
        r.nameservers = [self.host]
        r.port = self.port
        r.lifetime = lifetime
        try:
            return sorted(rd.to_text() for rd in r.resolve(PEERS_NAME, "A"))
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []

    def _write(self, ips: list[str]) -> None:
        self.hosts.write_text("".join(f"{ip} {PEERS_NAME}\n" for ip in ips))

    def _wait_answer(self, ips: list[str], what: str) -> None:
        deadline = time.monotonic() + 5
        while True:
            with contextlib.suppress(dns.exception.DNSException):
                if self.query(lifetime=0.3) == sorted(ips):
                    return
            if self.proc is None or self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
                raise AssertionError(f"dnsmasq: {what}: records {ips} not answered\n{tail}")
            time.sleep(0.05)

    def start(self, ips: list[str]) -> None:
        """Starts dnsmasq with `ips` as the records; returns once it answers them."""
        self._write(ips)
        args = [
            DNSMASQ,
            "--no-daemon",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--conf-file=/dev/null",
            "--pid-file=",
            f"--port={self.port}",
            f"--listen-address={self.host}",
            "--bind-interfaces",
            "--user=root",
            "--local=/test/",
            f"--addn-hosts={self.hosts}",
            "--log-facility=-",
            "--log-queries",
        ]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        self._wait_answer(ips, "start")

    def set_records(self, ips: list[str]) -> None:
        """Replaces the records with `ips` (SIGHUP); returns once the server answers them."""
        assert self.proc is not None
        self._write(ips)
        self.proc.send_signal(signal.SIGHUP)
        self._wait_answer(ips, "reload")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@contextlib.contextmanager
def _dns_server(directory: Path, host: str, port: int, ips: list[str]) -> Iterator[ClusterDns]:
    server = ClusterDns(directory, host, port)
    try:
        server.start(ips)
        yield server
    finally:
        server.stop()


def _members(node: Node) -> set[str]:
    """The member addresses in the node's status."""
    return set(node.peer_states())


def _wait_members(
    nodes: list[Node], want: Mapping[int, set[str]], timeout: float, what: str
) -> float:
    """Waits until each node's member list is `want[node.index]`; returns the seconds it took.
    Raises AssertionError with every node's list."""
    start = time.monotonic()

    def reached() -> bool:
        return all(_members(n) == want[n.index] for n in nodes)

    try:
        wait_until(reached, timeout=timeout, interval=0.1, what=what)
    except AssertionError as e:
        seen = {n.index: sorted(_members(n)) for n in nodes}
        raise AssertionError(f"{e}: members {seen}, want {want}") from e
    return time.monotonic() - start


def _peer_events(node: Node, message: str) -> list[str]:
    """The `peer` key of the node's log records with `msg` == `message`."""
    return [str(e.get("peer")) for e in node.daemon_events() if e.get("msg") == message]


def _down_at(node: Node, peer: str) -> float:
    """When `node` logged `peer down` for `peer` first (Unix time; inf when it did not)."""
    times = [
        datetime.datetime.fromisoformat(str(e["time"]).replace("Z", "+00:00")).timestamp()
        for e in node.daemon_events()
        if e.get("msg") == "peer down" and e.get("peer") == peer
    ]
    return min(times, default=math.inf)


def test_members_from_dns(
    peer_image: PeerImage, convert_root: Path, tmp_path: Path, budget: Budget
) -> None:
    """The members are the A records of one name served by a real dnsmasq (no static list),
    re-read every second; the server starts after the daemons, whose first lookups fail.
    Records for nodes 0 and 1: node 0 starts, node 1 then gets bytes from it, node 2 is
    nobody's member. Node 2 added: nodes 0 and 1 list it within seconds, and it starts with
    bytes from the peers and at most :data:`ROLLING_MAX` of the layers from the registry (the
    chunks it is now the first owner of are still held by the owners before it joined). Node
    1 removed: nodes 0 and 2 drop it (logged `peer left`)."""
    if not os.access(DNSMASQ, os.X_OK):
        pytest.skip(f"PREREQUISITE MISSING: {DNSMASQ} (Debian: dnsmasq-base)")
    layers = len(peer_image.layer_digests)
    dns_port = free_port()

    def dns_members(i: int, addresses: list[str]) -> str:
        return (
            "[peers]\nstatic = []\n"
            f'dns = "{PEERS_NAME}"\n'
            f'dns_servers = ["{_bridge_ip(addresses)}:{dns_port}"]\n'
            f"refresh_sec = {REFRESH_SEC}\n"
        )

    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(_cluster(tmp_path, peers=True, node_config=dns_members))
        n0, n1, n2 = cluster.nodes
        assert _bridge_ip(cluster.peer_addresses) == cluster.bridge_ip
        dns_server = stack.enter_context(
            _dns_server(tmp_path / "dns", cluster.bridge_ip, dns_port, [n0.ip, n1.ip])
        )
        ref = cluster.push(peer_image, convert_root=convert_root, rate=RATE)
        # node 2 is not a record, but it reads the records too: its members are 0 and 1
        _wait_members(
            cluster.nodes,
            {
                0: {n1.peer_address},
                1: {n0.peer_address},
                2: {n0.peer_address, n1.peer_address},
            },
            MEMBERSHIP_WAIT_S,
            "members from the first records",
        )

        mark = cluster.registry.mark()
        _check_sums(n0, peer_image, n0.pull_and_checksum(ref, peer_image.paths))
        n0.wait_fetched(layers, timeout=budget.left())
        _layer_report(cluster, peer_image, mark, "node 0 alone")
        _check_sums(
            n1, peer_image, n1.pull_and_checksum(ref, peer_image.paths, timeout=budget.left())
        )
        n1.wait_fetched(layers, timeout=budget.left())
        sources = n1.settled_bytes_from()
        print(f"node 1 got {sources}")
        assert sources.get("peers", 0) > 0, (
            f"node 1: bytes by source {sources}: none from node 0\n{cluster.describe(15)}"
        )
        for node in (n0, n1):
            assert n2.peer_address not in _members(node), (node.index, _members(node))
        assert n2.layer_status() == [], "node 2 has pulled nothing yet"

        dns_server.set_records([n0.ip, n1.ip, n2.ip])
        took = _wait_members(
            [n0, n1],
            {0: {n1.peer_address, n2.peer_address}, 1: {n0.peer_address, n2.peer_address}},
            MEMBERSHIP_WAIT_S,
            "node 2 added to the records",
        )
        print(f"node 2 listed by nodes 0 and 1 {took:.1f} s after the records changed")
        assert _members(n2) == {n0.peer_address, n1.peer_address}
        for node in (n0, n1):
            assert _peer_events(node, "peer joined").count(n2.peer_address) == 1

        mark = cluster.registry.mark()
        _check_sums(
            n2, peer_image, n2.pull_and_checksum(ref, peer_image.paths, timeout=budget.left())
        )
        n2.wait_fetched(layers, timeout=budget.left())
        _layer_report(cluster, peer_image, mark, "node 2 after joining")
        sources = n2.settled_bytes_from()
        print(f"node 2 got {sources}")
        assert sources.get("peers", 0) > 0, (
            f"node 2: bytes by source {sources}: none from the peers\n{cluster.describe(15)}"
        )
        joined_registry = sources.get("registry", 0)
        assert joined_registry <= ROLLING_MAX * peer_image.layer_bytes, (
            f"node 2: bytes by source {sources}: more than {ROLLING_MAX:.0%} of the layers' "
            f"{peer_image.layer_bytes} from the registry\n{n2.describe(15)}"
        )

        dns_server.set_records([n0.ip, n2.ip])
        took = _wait_members(
            [n0, n2],
            {0: {n2.peer_address}, 2: {n0.peer_address}},
            MEMBERSHIP_WAIT_S,
            "node 1 removed from the records",
        )
        print(f"node 1 dropped by nodes 0 and 2 {took:.1f} s after the records changed")
        for node in (n0, n2):
            assert _peer_events(node, "peer left") == [n1.peer_address], node.describe(15)


# ---------------------------------------------------------------------------------------------
# Members that fail: wrong bytes, no answer

FAKE_BUDGET_S = 2.0
"""`[peers] budget_sec` in the fault test: what the silent member costs a request."""
FAULT_RUN_MAX_S = 30.0
"""Every node of the fault test has read every file and completed its layers within this
(about 5 s here): no read waited on a fake member for more than a few budgets (a read that
hung on the silent member would take the pull timeout, 120 s)."""
FAKE_ARRIVAL_SLACK_S = 0.5
"""A node's requests to a fake member arrive at the latest this long after the node logged it
`peer down`: those already on their way then, none later (the member is skipped for
`down_backoff_sec`, 300 s: the rest of the test). How many came before depends on how many
reads were under way while its first request failed."""
_BLOB_PATH = re.compile(r"/v2/.+/blobs/(sha256:[0-9a-f]{64})(\?.*)?")
_RANGE = re.compile(r"bytes=(\d+)-(\d+)")


class _RequestCounter:
    """Requests per client address and when they arrived, from several threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._times: dict[str, list[float]] = {}

    def add(self, client: str) -> None:
        with self._lock:
            self._times.setdefault(client, []).append(time.time())

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {client: len(times) for client, times in self._times.items()}

    def last(self, client: str) -> float:
        """When the last request of `client` arrived (Unix time; 0 for none)."""
        with self._lock:
            return max(self._times.get(client, [0.0]))


class CorruptPeer:
    """A fake member at `host:port` that answers every blob range with `206` and the right
    headers but wrong bytes: the blob's real bytes (from `blobs`, digest → file) with one byte
    flipped in the middle of the range (random bytes for an unknown blob)."""

    def __init__(self, host: str, port: int, blobs: Mapping[str, Path]) -> None:
        self.address = f"{host}:{port}"
        self.requests = _RequestCounter()
        counter, blob_files = self.requests, dict(blobs)

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                counter.add(self.client_address[0])
                path = _BLOB_PATH.fullmatch(self.path)
                rng = _RANGE.fullmatch(self.headers.get("range", ""))
                if path is None or rng is None:
                    self.send_response(400)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                start, last = int(rng[1]), int(rng[2])
                blob = blob_files.get(path[1])
                if blob is None:
                    data, total = bytearray(os.urandom(last + 1 - start)), "*"
                else:
                    with blob.open("rb") as f:
                        f.seek(start)
                        data = bytearray(f.read(last + 1 - start))
                    total = str(blob.stat().st_size)
                    data += bytes(last + 1 - start - len(data))  # past the end: zeros
                data[len(data) // 2] ^= 0xFF
                self.send_response(206)
                self.send_header("content-type", "application/octet-stream")
                self.send_header("content-range", f"bytes {start}-{last}/{total}")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(bytes(data))

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class SilentPeer:
    """A fake member at `host:port` that accepts every connection, reads the requests (and
    counts them) and never answers."""

    def __init__(self, host: str, port: int) -> None:
        self.address = f"{host}:{port}"
        self.requests = _RequestCounter()
        self._sock = socket.create_server((host, port), backlog=64)
        self._sock.settimeout(0.1)
        self._closed = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, (client, _) = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._conns.append(conn)
            threading.Thread(target=self._read, args=(conn, client), daemon=True).start()

    def _read(self, conn: socket.socket, client: str) -> None:
        pending = b""
        with contextlib.suppress(OSError):
            while data := conn.recv(65536):
                pending += data
                while b"\r\n\r\n" in pending:
                    head, pending = pending.split(b"\r\n\r\n", 1)
                    if head.startswith(b"GET "):
                        self.requests.add(client)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)
        self._sock.close()
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()


def _member_entry(node: Node, address: str) -> dict[str, object]:
    """The node's status entry of member `address` (`{}` when it is not a member)."""
    members = node.peer_status().get("members")
    for m in members if isinstance(members, list) else []:
        if isinstance(m, dict) and m.get("peer") == address:
            return m
    return {}


def test_corrupt_peer_and_silent_peer(
    peer_image: PeerImage, convert_root: Path, tmp_path: Path, budget: Budget
) -> None:
    """Every node's static members also list two fake members on the bridge address: one
    sends wrong bytes of the right length, one never answers (`budget_sec` 2, three owners
    per chunk, a failed member skipped for 300 s). The three nodes start together: every file
    reads right, everything is done within :data:`FAULT_RUN_MAX_S`, both fakes are `down`
    with their failure in every node's status, and no node asked a fake again once it logged
    it down (:data:`FAKE_ARRIVAL_SLACK_S`)."""
    layers = len(peer_image.layer_digests)
    corrupt_port = free_port()
    silent_port = free_port()
    while silent_port == corrupt_port:
        silent_port = free_port()

    def with_fakes(i: int, addresses: list[str]) -> str:
        bridge = _bridge_ip(addresses)
        static = [*addresses, f"{bridge}:{corrupt_port}", f"{bridge}:{silent_port}"]
        return (
            f"[peers]\nstatic = {json.dumps(static)}\nowners = 3\n"
            f"budget_sec = {FAKE_BUDGET_S}\n"
            "down_backoff_sec = 300.0\ndown_backoff_max_sec = 300.0\n"
        )

    blobs = {layer.digest: layer.path for layer in peer_image.image.layers}
    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(_cluster(tmp_path, peers=True, node_config=with_fakes))
        corrupt = CorruptPeer(cluster.bridge_ip, corrupt_port, blobs)
        stack.callback(corrupt.close)
        silent = SilentPeer(cluster.bridge_ip, silent_port)
        stack.callback(silent.close)
        ref = cluster.push(peer_image, convert_root=convert_root, rate=RATE)
        wait_until(
            lambda: all({corrupt.address, silent.address} <= _members(n) for n in cluster.nodes),
            timeout=MEMBERSHIP_WAIT_S,
            what="the fake members listed by every node",
        )

        start = time.monotonic()
        futures = _start_all(cluster.nodes, ref, peer_image)
        for node, future in zip(cluster.nodes, futures, strict=True):
            _check_sums(node, peer_image, _wait_sums(node, future, budget))
        for node in cluster.nodes:
            node.wait_fetched(layers, timeout=budget.left())
        took = time.monotonic() - start
        print(f"every node read every file and completed its layers in {took:.1f} s")
        print(f"requests to the corrupt member {corrupt.requests.counts()}")
        print(f"requests to the silent member {silent.requests.counts()}")
        assert took < FAULT_RUN_MAX_S, f"{took:.1f} s\n{cluster.describe(15)}"

        for node in cluster.nodes:
            print(f"node {node.index}: peers fetch {node.peer_status().get('fetch')}")
            for fake, error in ((corrupt, "digest mismatch"), (silent, "no answer within")):
                entry = _member_entry(node, fake.address)
                assert entry.get("state") == "down", (
                    f"node {node.index}: fake member {fake.address}: {entry}\n{node.describe(15)}"
                )
                failures = entry.get("failures")
                assert isinstance(failures, int) and failures >= 1, (node.index, entry)
                assert error in str(entry.get("lastError")), (node.index, entry)
                asked = fake.requests.counts().get(node.ip, 0)
                late = fake.requests.last(node.ip) - _down_at(node, fake.address)
                assert asked >= 1 and late <= FAKE_ARRIVAL_SLACK_S, (
                    f"node {node.index} asked fake member {fake.address} {asked} times, the "
                    f"last {late:.2f} s after it logged it down"
                )
                assert _peer_events(node, "peer down").count(fake.address) == 1, node.index
            for other in cluster.nodes:
                if other is not node:
                    assert _member_entry(node, other.peer_address).get("state") == "up", (
                        node.index,
                        node.peer_states(),
                    )
