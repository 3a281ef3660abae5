"""Several nodes on one machine, each in its own network namespace, for peer tests.

:func:`open_cluster` builds, under a base directory:

- a Linux bridge ``socbr<tag>`` with ``10.232.<k>.1/24`` on the host side, so the test process
  reaches every namespace (``<k>`` is a /24 no host address uses; ``<tag>`` is the pid modulo
  1000 and a per-process sequence digit);
- a registry namespace: Debian's ``docker-registry`` (distribution 2.8, access log on) at
  ``10.232.<k>.2:5000``, its veth to the bridge limited with ``tc tbf`` in both directions when
  ``registry_rate`` is set. :meth:`ClusterRegistry.mark` and :meth:`ClusterRegistry.since` give
  the bytes the registry sent during a phase: the veth counter (everything on the wire) and the
  blob bytes per digest from the access log (what "registry layer bytes" means in the tests);
  with ``registry_auth`` it requires Docker token auth from a :class:`ClusterTokenServer` on
  the bridge address (every namespace reaches it; it grants its user everything and anonymous
  callers nothing, so every repository is private);
- N node namespaces at ``10.232.<k>.11``, ``.12``, ... each with its own ``sociable-snapshotter``
  (own root, socket and config file) and its own containerd 1.6 (CRI with
  ``snapshotter = "sociable"``, the proxy plugin at the node's daemon socket, a ``certs.d``
  with a plain-HTTP ``hosts.toml`` for the registry). Both run with
  ``nsenter --net=/run/netns/<ns>``: the network namespace only. ``ip netns exec`` would also
  give them a private mount namespace, and containerd's overlay mounts must see the daemon's
  FUSE bind mounts.

Each daemon's config is rendered from a table the harness fills (``[daemon]`` root, address and
log level; ``[remote]`` hosts_dir and a short background quiet period; with ``peers=True`` a
``[peers]`` table listing every node, 1 MiB chunks) merged with the TOML text
``node_config(i, addresses)`` returns (its keys win). With ``mirror=True`` each daemon's
``[mirror]`` table names its own node's containerd socket (namespace ``k8s.io``) and
``[containerd] config_path`` that containerd's config, so the registry mirror on its peer
listener serves what that containerd holds; containerd asks it only once the node's
``hosts.toml`` names it (``sociable-snapshotter mirror configure``, :meth:`Node.configure_mirror`).

:func:`build_peer_image` writes an image whose data files are incompressible and whose sha256
are known; :meth:`Cluster.push` indexes it with ``sociable convert`` (1 MiB spans, every layer
indexed) and pushes it to the cluster's registry; :meth:`Cluster.push_unindexed` pushes the
image as it is (skopeo, no SOCI index: containerd pulls it the ordinary way).

Teardown always runs, also when the body raises: the containers' processes, containerd and its
shims, the daemons, every mount under the base directory (lazily), the namespaces, veths and
the bridge (their qdiscs go with them). Leftovers of the same names from a crashed run are
removed first. Logs and configs stay under the base directory; the daemons' and containerd's
state directories are removed. A teardown step that fails does not stop the others; the
failures are raised together as :class:`ClusterError` unless the body already raised.

Needs root, ``ip``, ``tc``, ``nsenter``, ``docker-registry``, ``containerd``, ``ctr``, ``runc``
and the bridge, veth and tbf kernel features. Only addresses this module creates are used.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import http.server
import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx

from snapshotter.remote.status import read_daemon_status
from tests.support import images
from tests.support.cli import snapshotter_cli, sociable
from tests.support.containerd import (
    CONTAINERD_BIN,
    PROXY_NAME,
    Containerd,
    ContainerdPaths,
    CriImageClient,
    mounts_under,
    render_config,
    unmount_all,
    wait_for_socket,
    write_certs_d,
)
from tests.support.netns import NetNs
from tests.support.registry import TOKEN_ISSUER, TOKEN_SERVICE, TokenServer
from tests.support.snapclient import REPO, SnapDaemon

SUBNET_PREFIX = "10.232"
REGISTRY_HOST_OCTET = 2
FIRST_NODE_OCTET = 11
REGISTRY_PORT = 5000
PEER_PORT = 8472
CHUNK_BYTES = 1 << 20
"""``[peers] chunk_bytes`` in the cluster: small, so one layer has several chunks and owners."""
SPAN_BYTES = 1 << 20
"""``sociable convert --span-size``: a layer of the test image has many spans."""
BACKGROUND_QUIET_MS = 2000
"""``[remote] background_quiet_period_ms``: a node completes its layers soon after its reads."""
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
PULL_TIMEOUT_S = 120.0
COMMAND_TIMEOUT_S = 30.0
K8S_NAMESPACE = "k8s.io"
LAYER_SUMMARY_KEYS = (
    "digest",
    "fetchedPercent",
    "bytesFrom",
    "fetchErrors",
    "lastFetchError",
    "readErrors",
    "error",
)
"""The keys of a layer's status that assertion messages show."""
MAX_SOCKET_PATH = 104
"""containerd refuses a unix socket path longer than this."""
REQUIRED_BINARIES = ("ip", "tc", "nsenter", "docker-registry", CONTAINERD_BIN, "ctr", "runc")

_sequence = itertools.count()


class ClusterError(Exception):
    """A step of building or tearing down the cluster failed; the message names the step and
    carries the command's stderr or the process's log tail."""


def missing_binaries() -> list[str]:
    """The binaries of :data:`REQUIRED_BINARIES` that are not on ``PATH``."""
    return [b for b in REQUIRED_BINARIES if shutil.which(b) is None]


def _run(cmd: Sequence[str], *, check: bool = True, timeout: float = COMMAND_TIMEOUT_S) -> str:
    try:
        proc = subprocess.run(
            list(cmd), capture_output=True, text=True, check=False, timeout=timeout
        )
    except subprocess.TimeoutExpired as e:
        raise ClusterError(f"{' '.join(cmd)}: no answer in {timeout} s") from e
    if check and proc.returncode != 0:
        raise ClusterError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def nsenter_args(ns_name: str, *cmd: str) -> list[str]:
    """``nsenter --net=/run/netns/<ns> -- cmd...``: ``cmd`` in the namespace's network and the
    host's mount namespace (nsenter execs it: the pid is the command's)."""
    return ["nsenter", f"--net=/run/netns/{ns_name}", "--", *cmd]


# ---------------------------------------------------------------------------------------------
# Names and addresses


@dataclass(frozen=True)
class ClusterNames:
    """Every kernel object name of one cluster (interface names stay within 15 characters)."""

    tag: str
    n_nodes: int

    @property
    def bridge(self) -> str:
        return f"socbr{self.tag}"

    @property
    def registry_ns(self) -> str:
        return f"soc{self.tag}r"

    @property
    def registry_if(self) -> str:
        """The registry veth's host end (a bridge port)."""
        return f"s{self.tag}r"

    def node_ns(self, i: int) -> str:
        return f"soc{self.tag}n{i}"

    def node_if(self, i: int) -> str:
        """Node ``i``'s veth host end (a bridge port)."""
        return f"s{self.tag}n{i}"

    def namespaces(self) -> list[str]:
        return [self.registry_ns, *(self.node_ns(i) for i in range(self.n_nodes))]

    def links(self) -> list[str]:
        return [self.registry_if, *(self.node_if(i) for i in range(self.n_nodes)), self.bridge]


def _host_ipv4_networks() -> list[ipaddress.IPv4Interface]:
    doc = json.loads(_run(["ip", "-j", "-4", "addr", "show"]) or "[]")
    out = []
    for link in doc:
        for a in link.get("addr_info", []):
            out.append(ipaddress.IPv4Interface(f"{a['local']}/{a['prefixlen']}"))
    return out


def _free_subnet(seed: int) -> int:
    """The third octet of a ``10.232.<k>.0/24`` no host address overlaps, starting at ``seed``.
    Raises :class:`ClusterError` when all are taken."""
    used = _host_ipv4_networks()
    for step in range(254):
        k = (seed + step) % 254 + 1
        net = ipaddress.IPv4Network(f"{SUBNET_PREFIX}.{k}.0/24")
        if not any(iface.network.overlaps(net) for iface in used):
            return k
    raise ClusterError(f"no free {SUBNET_PREFIX}.<k>.0/24 on this host")


def _cleanup_network(names: ClusterNames) -> list[str]:
    """Deletes the links and namespaces of ``names`` (deleting a veth end deletes both).
    Returns the errors of objects that exist and could not be deleted."""
    errors = []
    existing_links = {link["ifname"] for link in json.loads(_run(["ip", "-j", "link"]) or "[]")}
    for link in names.links():
        if link in existing_links:
            proc = subprocess.run(["ip", "link", "del", link], capture_output=True, text=True)
            if proc.returncode != 0:
                errors.append(f"ip link del {link}: {proc.stderr.strip()}")
    for ns in names.namespaces():
        if Path("/run/netns", ns).exists():
            proc = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True)
            if proc.returncode != 0:
                errors.append(f"ip netns del {ns}: {proc.stderr.strip()}")
    return errors


def _add_namespace(ns_name: str, host_if: str, bridge: str, ip: str, bridge_ip: str) -> NetNs:
    """Namespace ``ns_name`` with ``eth0`` at ``ip/24`` whose veth peer ``host_if`` is a port
    of ``bridge``; loopback up."""
    tmp_if = f"{host_if}p"
    _run(["ip", "netns", "add", ns_name])
    _run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", tmp_if])
    _run(["ip", "link", "set", tmp_if, "netns", ns_name])
    _run(["ip", "-n", ns_name, "link", "set", tmp_if, "name", "eth0"])
    _run(["ip", "-n", ns_name, "addr", "add", f"{ip}/24", "dev", "eth0"])
    _run(["ip", "-n", ns_name, "link", "set", "eth0", "up"])
    _run(["ip", "-n", ns_name, "link", "set", "lo", "up"])
    _run(["ip", "link", "set", host_if, "master", bridge])
    _run(["ip", "link", "set", host_if, "up"])
    return NetNs(name=ns_name, host_if=host_if, ns_if="eth0", host_ip=bridge_ip, ns_ip=ip)


# ---------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class RegistryMark:
    """The registry's counters at one moment (see :meth:`ClusterRegistry.mark`)."""

    sent_bytes: int
    log_offset: int


@dataclass(frozen=True)
class RegistryTraffic:
    """What the registry sent between a mark and now.

    ``sent_bytes``: bytes its veth carried towards the bridge (headers, manifests, zTOCs and
    TCP/IP overhead included). ``blob_bytes``: body bytes of blob answers per digest, from the
    access log (a request cut short counts what was written). ``blob_requests``: blob GETs.
    """

    sent_bytes: int
    blob_bytes: Mapping[str, int]
    blob_requests: int

    def layer_bytes(self, digests: Sequence[str]) -> int:
        """Blob body bytes sent for ``digests`` (the layers of an image)."""
        return sum(self.blob_bytes.get(d, 0) for d in digests)


_ACCESS_LINE = re.compile(
    r'"(?P<method>GET|HEAD) (?P<path>/v2/\S+/blobs/(?P<digest>sha256:[0-9a-f]{64})) '
    r'HTTP/[0-9.]+" (?P<status>\d{3}) (?P<size>\d+|-)'
)


@dataclass
class ClusterRegistry:
    """``docker-registry`` in the registry namespace; ``host`` is ``IP:PORT``."""

    ns: NetNs
    storage: Path
    log: Path
    proc: subprocess.Popen[bytes]
    token_server: TokenServer | None = None

    @property
    def host(self) -> str:
        return f"{self.ns.ns_ip}:{REGISTRY_PORT}"

    @property
    def credentials(self) -> tuple[str, str] | None:
        """``(user, password)`` the token server grants everything to; None without auth."""
        if self.token_server is None:
            return None
        return self.token_server.username, self.token_server.password

    def sent_bytes(self) -> int:
        """Bytes the registry namespace has sent so far (its veth's host end received them)."""
        return self.ns.counters().rx_bytes

    def mark(self) -> RegistryMark:
        """The counters now; pass it to :meth:`since` at the end of a phase."""
        return RegistryMark(self.sent_bytes(), self.log.stat().st_size)

    def since(self, mark: RegistryMark) -> RegistryTraffic:
        """The traffic after ``mark``: see :class:`RegistryTraffic`."""
        sent = self.sent_bytes() - mark.sent_bytes
        with open(self.log, "rb") as f:
            f.seek(mark.log_offset)
            text = f.read().decode(errors="replace")
        per_digest: dict[str, int] = {}
        requests = 0
        for m in _ACCESS_LINE.finditer(text):
            if m["method"] != "GET":
                continue
            requests += 1
            if m["size"] != "-":
                per_digest[m["digest"]] = per_digest.get(m["digest"], 0) + int(m["size"])
        return RegistryTraffic(sent, per_digest, requests)

    def limit(self, rate: str) -> None:
        """tbf at ``rate`` (a tc rate) on both ends of the registry's veth."""
        self.ns.limit(rate)

    def unlimit(self) -> None:
        self.ns.unlimit()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no registry log)"

    def stop(self) -> None:
        """Terminates the registry (SIGKILL after 10 s). Idempotent."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def _start_registry(
    ns: NetNs, base: Path, storage: Path | None = None, token: TokenServer | None = None
) -> ClusterRegistry:
    """docker-registry inside ``ns`` with its config and log under ``base`` and its storage at
    ``storage`` (default ``base/storage``), requiring tokens of ``token`` (started) when given.
    Raises :class:`ClusterError` (with the log tail) when it does not answer ``/v2/`` from the
    host within 20 s."""
    storage = storage or base / "storage"
    base.mkdir(parents=True, exist_ok=True)
    storage.mkdir(parents=True, exist_ok=True)
    config = {
        "version": 0.1,
        "log": {"level": "error", "accesslog": {"disabled": False}},
        "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True}},
        "http": {"addr": f"{ns.ns_ip}:{REGISTRY_PORT}", "secret": "sociable-cluster"},
        "health": {"storagedriver": {"enabled": False}},
    }
    if token is not None:
        bundle = base / "token-root.pem"
        bundle.write_bytes(token.cert_pem)
        config["auth"] = {
            "token": {
                "realm": token.realm,
                "service": TOKEN_SERVICE,
                "issuer": TOKEN_ISSUER,
                "rootcertbundle": str(bundle),
            }
        }
    cfg = base / "config.yml"
    cfg.write_text(json.dumps(config))
    log = base / "registry.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            nsenter_args(ns.name, "docker-registry", "serve", str(cfg)),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "OTEL_TRACES_EXPORTER": "none"},
            start_new_session=True,
        )
    reg = ClusterRegistry(ns, storage, log, proc, token)
    ready = 401 if token is not None else 200
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            raise ClusterError(f"docker-registry exited {proc.returncode}\n{reg.log_tail()}")
        try:
            if httpx.get(f"http://{reg.host}/v2/", timeout=1).status_code == ready:
                return reg
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            reg.stop()
            raise ClusterError(f"docker-registry: no answer on {reg.host}\n{reg.log_tail()}")
        time.sleep(0.1)


@dataclass
class ClusterTokenServer(TokenServer):
    """:class:`~tests.support.registry.TokenServer` whose realm is on ``address`` (the
    bridge's, which every namespace reaches) rather than the host's loopback."""

    address: str = "127.0.0.1"
    _bridge: http.server.ThreadingHTTPServer | None = None

    @property
    def realm(self) -> str:
        port = self._bridge.server_address[1] if self._bridge is not None else 0
        return f"http://{self.address}:{port}/token"

    def start(self) -> None:
        super().start()
        assert self._httpd is not None
        # the loopback server's handler class serves the bridge address too
        self._bridge = http.server.ThreadingHTTPServer(
            (self.address, 0), self._httpd.RequestHandlerClass
        )
        self._bridge.daemon_threads = True
        threading.Thread(
            target=self._bridge.serve_forever, name="token-server-bridge", daemon=True
        ).start()

    def stop(self) -> None:
        if self._bridge is not None:
            self._bridge.shutdown()
            self._bridge.server_close()
            self._bridge = None
        super().stop()


# ---------------------------------------------------------------------------------------------
# Daemon configuration


TomlTable = dict[str, object]


def _merge(base: TomlTable, extra: Mapping[str, object]) -> TomlTable:
    out = dict(base)
    for key, value in extra.items():
        old = out.get(key)
        if isinstance(old, dict) and isinstance(value, Mapping):
            out[key] = _merge(old, value)
        else:
            out[key] = value
    return out


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ClusterError(f"cannot write {value!r} as a TOML value")


def render_toml(doc: Mapping[str, object]) -> str:
    """TOML text of tables of scalars and lists (what a daemon config holds)."""
    lines: list[str] = []
    for name, table in doc.items():
        if not isinstance(table, Mapping):
            raise ClusterError(f"top-level key {name!r}: a daemon config holds tables only")
        lines.append(f"[{name}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in table.items()]
        lines.append("")
    return "\n".join(lines)


def daemon_config(
    *,
    root: Path,
    address: Path,
    hosts_dir: Path,
    peers: bool,
    listen: str,
    addresses: Sequence[str],
    extra: str = "",
    containerd: ContainerdPaths | None = None,
) -> str:
    """The config text of one node's daemon (see the module docstring). ``extra`` is TOML whose
    keys override or add to the harness's. ``containerd``: the node's containerd, whose socket
    the registry mirror reads (``[mirror]``) and whose config it checks (``[containerd]``).
    Raises :class:`ClusterError` for invalid ``extra``."""
    doc: TomlTable = {
        "daemon": {"root": str(root), "address": str(address), "log_level": "debug"},
        "remote": {"hosts_dir": str(hosts_dir), "background_quiet_period_ms": BACKGROUND_QUIET_MS},
    }
    if peers:
        doc["peers"] = {
            "enable": True,
            "listen": listen,
            "static": list(addresses),
            "chunk_bytes": CHUNK_BYTES,
        }
    if containerd is not None:
        doc["containerd"] = {"config_path": str(containerd.config)}
        doc["mirror"] = {
            "containerd_address": str(containerd.address),
            "namespace": K8S_NAMESPACE,
        }
    try:
        doc = _merge(doc, tomllib.loads(extra))
    except tomllib.TOMLDecodeError as e:
        raise ClusterError(f"node_config returned invalid TOML: {e}") from e
    return render_toml(doc)


# ---------------------------------------------------------------------------------------------
# Nodes


@dataclass
class Node:
    """One node: a namespace with its daemon and containerd.

    ``peer_address`` is ``IP:PORT`` of its peer listener; ``cri`` is a CRI ImageService client
    on its containerd (PullImage waits at most :data:`PULL_TIMEOUT_S`).
    """

    index: int
    tag: str
    ns: NetNs
    base: Path
    daemon: SnapDaemon
    containerd: Containerd | None = None
    _cri: CriImageClient | None = field(default=None, repr=False)
    _runs: itertools.count[int] = field(default_factory=itertools.count, repr=False)

    @property
    def ip(self) -> str:
        return self.ns.ns_ip

    @property
    def peer_address(self) -> str:
        return f"{self.ip}:{PEER_PORT}"

    @property
    def cri(self) -> CriImageClient:
        if self.containerd is None:
            raise ClusterError(f"node {self.index}: containerd is not running")
        if self._cri is None:
            self._cri = CriImageClient(self.containerd.channel(), timeout_s=PULL_TIMEOUT_S)
        return self._cri

    # -- processes

    def start_daemon(self) -> None:
        """Starts the daemon in the node's namespace with its config file and waits until it
        serves gRPC. Raises :class:`ClusterError` with the log tail."""
        d = self.daemon
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env.pop("NOTIFY_SOCKET", None)
        env["PYTHONFAULTHANDLER"] = "1"  # stacks in the log on SIGABRT (see stop_daemon)
        assert d.config is not None
        cmd = nsenter_args(
            self.ns.name, sys.executable, "-m", "snapshotter.cli", "--config", str(d.config)
        )
        with open(d.log, "ab") as log:
            d.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=REPO,
                start_new_session=True,
            )
        try:
            wait_for_socket(d.address, d.proc, START_TIMEOUT_S, f"node {self.index} daemon")
        except Exception as e:
            d.kill9()
            raise ClusterError(f"{e}\n--- daemon log ---\n{d.log_tail()}") from e
        d.ready_ns = time.monotonic_ns()

    def kill_daemon(self, sig: int = signal.SIGKILL) -> None:
        """Sends ``sig`` to the daemon; after SIGKILL, waits until it is gone."""
        proc = self.daemon.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        if sig == signal.SIGKILL:
            proc.wait(timeout=30)

    def stop_daemon(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, then waits ``timeout`` seconds for the daemon to exit. A daemon still
        running gets SIGABRT (faulthandler writes every thread's Python stack to its log),
        then SIGKILL, and :class:`ClusterError` is raised. Idempotent."""
        proc = self.daemon.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            pass
        proc.send_signal(signal.SIGABRT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        self.daemon.kill9()
        raise ClusterError(
            f"node {self.index}: the daemon did not exit within {timeout} s of SIGTERM (its "
            f"threads' stacks are at the end of {self.daemon.log})\n{self.daemon_log(40)}"
        )

    def daemon_alive(self) -> bool:
        return self.daemon.alive()

    def _start_containerd(self, registry_host: str) -> None:
        paths = ContainerdPaths(self.base / "ctd")
        for d in (paths.root, paths.state, paths.cni_conf):
            d.mkdir(parents=True, exist_ok=True)
        # CRI 1.6 reports image-fs usage for this path.
        (paths.root / f"io.containerd.snapshotter.v1.{PROXY_NAME}").mkdir(exist_ok=True)
        paths.config.write_text(
            render_config(
                paths,
                proxy_name=PROXY_NAME,
                proxy_address=self.daemon.address,
                cri_snapshotter=PROXY_NAME,
                sandbox_image="127.0.0.1:1/pause:none",
            )
        )
        with open(paths.log, "ab") as log:
            proc = subprocess.Popen(
                nsenter_args(self.ns.name, CONTAINERD_BIN, "--config", str(paths.config)),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.containerd = Containerd(
            paths=paths, proc=proc, proxy_name=PROXY_NAME, registry_hosts=(registry_host,)
        )
        try:
            wait_for_socket(paths.address, proc, START_TIMEOUT_S, f"node {self.index} containerd")
        except Exception as e:
            raise ClusterError(f"{e}\n--- containerd log ---\n{self.containerd.log_tail()}") from e

    # -- images and containers

    def configure_mirror(self, registry_host: str, mirror: str | None = None) -> str:
        """``sociable-snapshotter mirror configure`` for ``registry_host`` in this node's
        ``certs.d``: containerd asks ``mirror`` (default: this node's listener) first, the
        registry after it. Configuring again swaps the mirror. Returns the command's output.
        Raises :class:`ClusterError` when the command fails."""
        assert self.daemon.config is not None
        args = ["--config", str(self.daemon.config), "mirror", "configure"]
        args += ["--registry", registry_host, *(["--mirror", mirror] if mirror else [])]
        proc = snapshotter_cli(*args, timeout=30)
        if proc.returncode != 0:
            raise ClusterError(f"node {self.index}: mirror configure: {proc.stderr.strip()}")
        return proc.stdout

    def unconfigure_mirror(self, registry_host: str) -> None:
        """``sociable-snapshotter mirror unconfigure`` for ``registry_host``: containerd goes
        straight to the registry again. Raises :class:`ClusterError` when the command fails."""
        assert self.daemon.config is not None
        args = ["--config", str(self.daemon.config), "mirror", "unconfigure"]
        proc = snapshotter_cli(*args, "--registry", registry_host, timeout=30)
        if proc.returncode != 0:
            raise ClusterError(f"node {self.index}: mirror unconfigure: {proc.stderr.strip()}")

    def run_checksums(
        self, ref: str, paths: Sequence[str], *, timeout: float = PULL_TIMEOUT_S
    ) -> dict[str, str]:
        """Runs a container of ``ref`` (already pulled through CRI: containerd namespace
        ``k8s.io``, snapshotter ``sociable``) that prints ``sha256sum`` of ``paths``; returns
        ``{path: hex digest}`` of the lines it printed. Raises
        :class:`~tests.support.containerd.CtrError` when the container fails or exits non-zero
        (e.g. a file could not be read) or ``timeout`` seconds pass."""
        if self.containerd is None:
            raise ClusterError(f"node {self.index}: containerd is not running")
        # Container ids name cgroups, which every containerd on the host shares.
        cid = f"sums-{self.tag}-n{self.index}-{next(self._runs)}"
        script = "PATH=/bin; sha256sum " + " ".join(paths)
        out = self.containerd.run(
            ref, cid, "/bin/sh", "-c", script, namespace=K8S_NAMESPACE, timeout=timeout
        )
        return parse_sha256sum(out)

    def pull_and_checksum(
        self, ref: str, paths: Sequence[str], *, timeout: float = PULL_TIMEOUT_S
    ) -> dict[str, str]:
        """CRI PullImage of ``ref``, then :meth:`run_checksums` (what starting a pod does)."""
        self.cri.pull_image(ref)
        return self.run_checksums(ref, paths, timeout=timeout)

    def kill_containers(self) -> None:
        """SIGKILLs the init process of every task of this node's containerd (by pid, from
        ``ctr tasks ls``). Errors are ignored."""
        if self.containerd is None or self.containerd.proc.poll() is not None:
            return
        for namespace in (K8S_NAMESPACE, "default"):
            with contextlib.suppress(Exception):
                res = self.containerd.ctr(
                    "tasks", "ls", namespace=namespace, check=False, timeout=10
                )
                for line in res.stdout.splitlines()[1:]:
                    parts = line.split()
                    if len(parts) >= 2 and parts[1].isdigit() and int(parts[1]) > 1:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(parts[1]), signal.SIGKILL)

    # -- status

    def status(self) -> dict[str, object]:
        """The daemon's ``<root>/status.json`` (``{}`` when there is none; a killed daemon
        leaves its last one)."""
        return read_daemon_status(self.daemon.root) or {}

    def peer_status(self) -> dict[str, object]:
        """The ``peers`` part of :meth:`status` (``{}`` when peers are off)."""
        peers = self.status().get("peers")
        return peers if isinstance(peers, dict) else {}

    def peer_states(self) -> dict[str, str]:
        """``{"ADDR:PORT": "up"|"down"}`` of the members in :meth:`peer_status`."""
        members = self.peer_status().get("members")
        out: dict[str, str] = {}
        for m in members if isinstance(members, list) else []:
            if isinstance(m, dict) and "peer" in m:
                out[str(m["peer"])] = str(m.get("state"))
        return out

    def layer_status(self) -> list[dict[str, object]]:
        """The layer records of ``sociable-snapshotter status``: one per lazily mounted layer
        (fetched bytes and percent, bytes by source, bytes served, errors). Raises
        :class:`ClusterError` when the command fails."""
        proc = snapshotter_cli("--root", str(self.daemon.root), "status", "--json", timeout=30)
        if proc.returncode != 0:
            raise ClusterError(f"node {self.index}: status failed: {proc.stderr.strip()}")
        records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        return [r for r in records if "fuseDir" in r and "restoreFailed" not in r]

    def bytes_from(self) -> dict[str, int]:
        """The layers' ``bytesFrom`` summed: compressed bytes this node got per source
        (``cache``, ``peers``, ``registry``)."""
        out: dict[str, int] = {}
        for layer in self.layer_status():
            sources = layer.get("bytesFrom")
            if isinstance(sources, dict):
                for source, n in sources.items():
                    out[str(source)] = out.get(str(source), 0) + int(n)
        return out

    def settled_bytes_from(self, timeout: float = 5.0) -> dict[str, int]:
        """:meth:`bytes_from` once every layer's ``bytesFrom`` accounts for its ``fetchedSize``.

        ``fetchedSize`` comes from the layer's FUSE status file (read live), ``bytesFrom`` from
        ``<root>/status.json``, which the daemon rewrites at most once a second: right after
        :meth:`wait_fetched` it can still hold an earlier count. Raises AssertionError after
        ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            out: dict[str, int] = {}
            behind = []
            for layer in self.layer_status():
                sources = layer.get("bytesFrom")
                counted = 0
                for source, n in sources.items() if isinstance(sources, dict) else ():
                    out[str(source)] = out.get(str(source), 0) + int(n)
                    counted += int(n)
                if counted < int(str(layer.get("fetchedSize", 0))):
                    behind.append(layer.get("fuseDir"))
            if not behind:
                return out
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"node {self.index}: bytesFrom of {behind} still behind fetchedSize after "
                    f"{timeout:.0f} s"
                )
            time.sleep(0.2)

    def wait_fetched(self, count: int, timeout: float) -> list[dict[str, object]]:
        """Waits until ``count`` lazy layers report 100 % fetched (every span cached); returns
        their status. Raises AssertionError with the status and log tail after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            layers = self.layer_status()
            if len(layers) >= count and all(s.get("fetchedPercent") == 100 for s in layers):
                return layers
            if time.monotonic() > deadline:
                brief = [{k: s.get(k) for k in LAYER_SUMMARY_KEYS if k in s} for s in layers]
                raise AssertionError(
                    f"node {self.index}: {count} layers not fully fetched in {timeout:.0f} s: "
                    f"{brief}\n--- daemon log ---\n{self.daemon.log_tail(20)}"
                )
            time.sleep(0.3)

    # -- network

    def link_down(self) -> None:
        """Takes the node's veth (its bridge port) down: the node is cut off."""
        _run(["ip", "link", "set", "dev", self.ns.host_if, "down"])

    def link_up(self) -> None:
        _run(["ip", "link", "set", "dev", self.ns.host_if, "up"])

    # -- logs

    def daemon_log(self, lines: int | None = None) -> str:
        """The daemon's log (JSON lines), or its last ``lines`` lines."""
        text = self.daemon.log.read_text(errors="replace") if self.daemon.log.exists() else ""
        return text if lines is None else "\n".join(text.splitlines()[-lines:])

    def daemon_events(self) -> list[dict[str, object]]:
        """The daemon's log records as dicts (lines that are not JSON skipped)."""
        out = []
        for line in self.daemon_log().splitlines():
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict):
                    out.append(doc)
        return out

    def describe(self, lines: int = 30) -> str:
        """The tails of the node's daemon and containerd logs (for assertion messages)."""
        ctd = self.containerd.log_tail(lines) if self.containerd else "(no containerd)"
        return (
            f"--- node {self.index} daemon log ---\n{self.daemon_log(lines)}\n"
            f"--- node {self.index} containerd log ---\n{ctd}"
        )


def parse_sha256sum(output: str) -> dict[str, str]:
    """``{path: hex digest}`` from ``sha256sum`` output."""
    sums = {}
    for line in output.splitlines():
        digest, _, path = line.strip().partition("  ")
        if len(digest) == 64 and path:
            sums[path] = digest
    return sums


# ---------------------------------------------------------------------------------------------
# The test image


DATA_LAYERS: tuple[tuple[int, ...], ...] = (
    (5 << 20, 1536 << 10, 300 << 10, 40 << 10),
    (6 << 20, 2 << 20, 700 << 10),
    (4 << 20, 4 << 20, 100 << 10, 1 << 10),
    (7 << 20, 1 << 20, 10 << 10),
)
"""File sizes of the data layers (about 31 MiB in all, incompressible)."""


@dataclass(frozen=True)
class PeerImage:
    """An image for the cluster: busybox, then :data:`DATA_LAYERS`. ``sha256`` maps every
    data file (and ``/bin/busybox``) to its sha256."""

    image: images.Image
    sha256: Mapping[str, str]

    @property
    def paths(self) -> list[str]:
        return sorted(self.sha256)

    @property
    def layer_digests(self) -> list[str]:
        return [layer.digest for layer in self.image.layers]

    @property
    def layer_bytes(self) -> int:
        """Compressed bytes of all layers: what one node alone fetches to have every span."""
        return sum(layer.size for layer in self.image.layers)


def _incompressible(seed: str, size: int) -> bytes:
    return hashlib.shake_256(f"sociable-cluster:{seed}".encode()).digest(size)


def build_peer_image(layout: Path, *, tag: str = "v1") -> PeerImage:
    """Writes the image of :class:`PeerImage` as an OCI layout at ``layout`` (deterministic:
    the same blobs every time). Raises :class:`~tests.support.images.ImageBuildError`."""
    specs: list[images.LayerSpec] = [images.busybox_layer()]
    sums = {"/bin/busybox": hashlib.sha256(images.BUSYBOX.read_bytes()).hexdigest()}
    for n, sizes in enumerate(DATA_LAYERS, start=1):
        entries: list[images.Entry] = [images.Dir(path="data"), images.Dir(path=f"data/l{n}")]
        for j, size in enumerate(sizes):
            path = f"data/l{n}/f{j}.bin"
            data = _incompressible(path, size)
            entries.append(images.File(path=path, data=data))
            sums[f"/{path}"] = hashlib.sha256(data).hexdigest()
        specs.append(entries)
    image = images.write_oci_layout(layout, specs, tag=tag, cmd=("/bin/sh",))
    return PeerImage(image, sums)


# ---------------------------------------------------------------------------------------------
# The cluster


@dataclass
class Cluster:
    """What :func:`open_cluster` yields."""

    base: Path
    names: ClusterNames
    subnet: int
    registry: ClusterRegistry
    nodes: list[Node]

    @property
    def bridge_ip(self) -> str:
        return f"{SUBNET_PREFIX}.{self.subnet}.1"

    @property
    def peer_addresses(self) -> list[str]:
        return [n.peer_address for n in self.nodes]

    def push(
        self,
        image: PeerImage,
        *,
        repository: str = "peers/data",
        convert_root: Path | None = None,
        rate: str | None = None,
        span_bytes: int = SPAN_BYTES,
    ) -> str:
        """Indexes ``image`` (SOCI v2, ``span_bytes`` spans, every layer) and pushes it to
        the registry with ``sociable convert``; returns the reference to pull. The link limit
        is lifted during the push and set to ``rate`` again afterwards when given.
        ``convert_root`` (the CLI's store) can be shared between clusters: built zTOCs are
        reused."""
        ref = f"{self.registry.host}/{repository}:{image.image.tag}"
        self.registry.unlimit()
        try:
            sociable(
                "-q",
                "convert",
                "--plain-http",
                "--span-size",
                str(span_bytes),
                "--min-layer-size",
                "0",
                f"oci-layout:{image.image.layout}:{image.image.tag}",
                ref,
                root=convert_root or self.base / "convert-root",
            )
        finally:
            if rate:
                self.registry.limit(rate)
        return ref

    def push_unindexed(self, image: PeerImage, *, repository: str = "peers/plain") -> str:
        """Pushes ``image`` as it is (skopeo, no SOCI index, with the registry's credentials
        when it has them); returns the reference to pull. Raises
        :class:`~tests.support.images.PushError` with skopeo's stderr."""
        ref = f"{self.registry.host}/{repository}:{image.image.tag}"
        creds = self.registry.credentials
        cmd = ["skopeo", "copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false"]
        cmd += ["--dest-creds", ":".join(creds)] if creds else []
        cmd += [f"oci:{image.image.layout}:{image.image.tag}", f"docker://{ref}"]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
        except subprocess.CalledProcessError as e:
            raise images.PushError(f"pushing to {ref}: {e.stderr.strip()}") from e
        except (OSError, subprocess.TimeoutExpired) as e:
            raise images.PushError(f"pushing to {ref}: {e}") from e
        return ref

    def describe(self, lines: int = 30) -> str:
        """Every node's log tails and the registry's (for assertion messages)."""
        return "\n".join(
            [
                *(n.describe(lines) for n in self.nodes),
                "--- registry log ---",
                self.registry.log_tail(lines),
            ]
        )


class _Teardown:
    """Cleanup steps run in reverse order of registration; a failing step is recorded and the
    next one runs."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], object]]] = []
        self.errors: list[str] = []

    def add(self, label: str, fn: Callable[[], object]) -> None:
        self._steps.append((label, fn))

    def run(self) -> None:
        while self._steps:
            label, fn = self._steps.pop()
            try:
                fn()
            except Exception as e:
                self.errors.append(f"{label}: {e!r}")


def _remove_state(paths: Sequence[Path]) -> None:
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)


def _check_no_mounts(base: Path) -> None:
    left = mounts_under(base)
    if left:
        raise ClusterError(f"mounts left under {base}: {left}")


@contextlib.contextmanager
def open_cluster(
    base: Path,
    n_nodes: int,
    *,
    registry_rate: str | None = "200mbit",
    peers: bool,
    node_config: Callable[[int, list[str]], str] | None = None,
    subnet: int | None = None,
    registry_storage: Path | None = None,
    mirror: bool = False,
    registry_auth: bool = False,
) -> Iterator[Cluster]:
    """Builds the cluster described in the module docstring under ``base`` and yields it;
    tears everything down on exit, also when the body raises.

    ``registry_rate``: tc rate of the registry's link (None: unlimited). ``peers``: give each
    daemon the ``[peers]`` table. ``node_config(i, addresses)``: TOML text merged over node
    ``i``'s config (``addresses``: every node's peer address). ``subnet``: the third octet of
    ``10.232.<k>.0/24`` (default: a free one). ``registry_storage``: the registry's storage
    directory, kept after teardown (default: under ``base``), so clusters opened one after
    another can serve what an earlier one pushed. ``mirror``: each daemon's registry mirror
    reads its own node's containerd. ``registry_auth``: the registry requires token auth
    (:attr:`ClusterRegistry.credentials`). Raises :class:`ClusterError` when a part does not
    start (after tearing down what was built).
    """
    if n_nodes < 1 or n_nodes > 9:
        raise ClusterError(f"n_nodes={n_nodes}: 1 to 9 nodes")
    longest = base / "n0" / "ctd" / "containerd.sock.ttrpc"
    if len(str(longest.absolute())) > MAX_SOCKET_PATH:
        raise ClusterError(
            f"base {base}: too long for containerd's sockets ({longest} over "
            f"{MAX_SOCKET_PATH} characters)"
        )
    seq = next(_sequence)
    tag = f"{os.getpid() % 1000}{seq % 10}"
    names = ClusterNames(tag, n_nodes)
    teardown = _Teardown()
    body_failed = False
    try:
        leftovers = _cleanup_network(names)
        if leftovers:
            raise ClusterError(f"cannot remove leftovers of an earlier run: {leftovers}")
        k = subnet if subnet is not None else _free_subnet(os.getpid() % 250 + seq)
        bridge_ip = f"{SUBNET_PREFIX}.{k}.1"
        base.mkdir(parents=True, exist_ok=True)
        teardown.add("network", functools.partial(_cleanup_all, names))

        _run(["ip", "link", "add", names.bridge, "type", "bridge"])
        _run(["ip", "addr", "add", f"{bridge_ip}/24", "dev", names.bridge])
        _run(["ip", "link", "set", names.bridge, "up"])
        reg_ns = _add_namespace(
            names.registry_ns,
            names.registry_if,
            names.bridge,
            f"{SUBNET_PREFIX}.{k}.{REGISTRY_HOST_OCTET}",
            bridge_ip,
        )
        token: TokenServer | None = None
        if registry_auth:
            token = ClusterTokenServer(address=bridge_ip)
            token.start()
            teardown.add("token server", token.stop)
        registry = _start_registry(reg_ns, base / "registry", registry_storage, token)
        teardown.add("registry", registry.stop)
        if registry_rate:
            registry.limit(registry_rate)

        nodes = [
            Node(
                index=i,
                tag=tag,
                ns=_add_namespace(
                    names.node_ns(i),
                    names.node_if(i),
                    names.bridge,
                    f"{SUBNET_PREFIX}.{k}.{FIRST_NODE_OCTET + i}",
                    bridge_ip,
                ),
                base=base / f"n{i}",
                daemon=SnapDaemon(
                    root=base / f"n{i}" / "snap" / "root",
                    address=base / f"n{i}" / "snap" / "snap.sock",
                    log=base / f"n{i}" / "snap" / "daemon.log",
                    config=base / f"n{i}" / "snap" / "config.toml",
                ),
            )
            for i in range(n_nodes)
        ]
        addresses = [n.peer_address for n in nodes]
        for node in nodes:
            teardown.add(
                f"node {node.index} mounts", functools.partial(_check_no_mounts, node.base)
            )
            state = [
                node.daemon.root,
                *(node.base / "ctd" / d for d in ("root", "state")),
            ]
            teardown.add(f"node {node.index} state", functools.partial(_remove_state, state))
            teardown.add(f"node {node.index} unmount", functools.partial(unmount_all, node.base))
            certs_d = ContainerdPaths(node.base / "ctd").certs_d
            write_certs_d(certs_d, [registry.host])
            assert node.daemon.config is not None
            node.daemon.config.parent.mkdir(parents=True, exist_ok=True)
            node.daemon.config.write_text(
                daemon_config(
                    root=node.daemon.root,
                    address=node.daemon.address,
                    hosts_dir=certs_d,
                    peers=peers,
                    listen=node.peer_address,
                    addresses=addresses,
                    extra=node_config(node.index, list(addresses)) if node_config else "",
                    containerd=ContainerdPaths(node.base / "ctd") if mirror else None,
                )
            )
            teardown.add(f"node {node.index} daemon", node.stop_daemon)
            node.start_daemon()
            teardown.add(f"node {node.index} containerd", functools.partial(_stop_containerd, node))
            node._start_containerd(registry.host)
            teardown.add(f"node {node.index} containers", node.kill_containers)

        cluster = Cluster(base, names, k, registry, nodes)
        print(
            f"cluster {tag}: bridge {names.bridge} {bridge_ip}/24, registry {registry.host} "
            f"(rate {registry_rate or 'unlimited'}), nodes {[n.ip for n in nodes]}, "
            f"peers {'on' if peers else 'off'}",
            file=sys.stderr,
        )
        yield cluster
    except BaseException:
        body_failed = True
        raise
    finally:
        teardown.run()
        if teardown.errors:
            report = "cluster teardown: " + "; ".join(teardown.errors)
            print(report, file=sys.stderr)
            if not body_failed:
                raise ClusterError(report)


def _cleanup_all(names: ClusterNames) -> None:
    errors = _cleanup_network(names)
    if errors:
        raise ClusterError("; ".join(errors))


def _stop_containerd(node: Node) -> None:
    if node.containerd is not None:
        node._cri = None
        node.containerd.stop()


# ---------------------------------------------------------------------------------------------
# Running calls side by side

T = TypeVar("T")


def call_in_thread(fn: Callable[[], T], name: str = "cluster-call") -> concurrent.futures.Future[T]:
    """Runs ``fn`` in a daemon thread; its future holds the result or exception. A call still
    running when the test ends does not keep the interpreter alive (the cluster's teardown
    kills what it waits on)."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def target() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as e:
            future.set_exception(e)

    threading.Thread(target=target, name=name, daemon=True).start()
    return future


def wait_until(
    predicate: Callable[[], bool], *, timeout: float, interval: float = 0.2, what: str
) -> None:
    """Polls ``predicate`` until it is true. Raises AssertionError naming ``what`` after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached in {timeout} s")
        time.sleep(interval)


__all__ = [
    "CHUNK_BYTES",
    "DATA_LAYERS",
    "PEER_PORT",
    "SPAN_BYTES",
    "Cluster",
    "ClusterError",
    "ClusterNames",
    "ClusterRegistry",
    "ClusterTokenServer",
    "Node",
    "PeerImage",
    "RegistryMark",
    "RegistryTraffic",
    "build_peer_image",
    "call_in_thread",
    "daemon_config",
    "missing_binaries",
    "nsenter_args",
    "open_cluster",
    "parse_sha256sum",
    "render_toml",
    "wait_until",
]
