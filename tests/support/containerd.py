"""A private containerd for integration tests, and a tiny CRI ImageService client.

:func:`start_containerd` runs Debian's containerd (1.6) as a subprocess with its own root, state
directory and sockets under a base directory, and a generated ``config.toml`` (version 2) that

- registers the proxy snapshotter ``[proxy_plugins.<name>]`` at the daemon's socket,
- enables the CRI plugin with ``snapshotter = <cri_snapshotter>`` and
  ``disable_snapshot_annotations = false``,
- points the CRI registry ``config_path`` at a ``certs.d`` with a ``hosts.toml`` per local
  registry (plain HTTP on loopback),
- sets ``sandbox_image`` to a local image and an empty CNI config dir (CRI starts offline;
  image pulls and ``ctr -n k8s.io run`` need no pod network).

It never touches ``/run/containerd`` or ``/var/lib/containerd`` of the system (containerd's
shims still put their sockets under ``/run/containerd/s/<hash>``: that path is hard-wired in
1.6 and unique per address). Teardown always kills containerd and the shims it started,
unmounts everything under the base directory (lazily, deepest first) and removes it.

Errors: :class:`ContainerdError` (start failure, carrying the log tail) and
:class:`CtrError` (a ``ctr`` command failed, carrying its output).
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from snapshotter import mountinfo
from snapshotter.api import snapshots_pb2_grpc as pb_grpc
from tests.support import images
from tests.support.registry import RegistryServer
from tests.support.snapclient import MountSpec, SnapClient, SnapDaemon, run_daemon

CONTAINERD_BIN = "containerd"
CTR_BIN = "ctr"
START_TIMEOUT_S = 30.0


class ContainerdError(Exception):
    """containerd could not be started or stopped; the message carries the log tail."""


class CtrError(ContainerdError):
    """A ``ctr`` command exited non-zero; ``stdout``/``stderr`` hold its output."""

    def __init__(self, message: str, stdout: str, stderr: str) -> None:
        super().__init__(message)
        self.stdout = stdout
        self.stderr = stderr


# ---------------------------------------------------------------------------------------------
# Capabilities


@dataclass(frozen=True)
class Capabilities:
    """What this machine offers the integration tests."""

    root: bool
    overlay: bool
    fuse: bool
    containerd: str | None
    runc: str | None
    skopeo: str | None
    registry: str | None

    def missing_for_containerd(self) -> list[str]:
        """The prerequisites of a containerd test that are absent (empty when all present)."""
        missing = []
        if not self.root:
            missing.append("root")
        if not self.overlay:
            missing.append("overlay filesystem")
        for name in ("containerd", "runc", "skopeo", "registry"):
            if getattr(self, name) is None:
                missing.append(name)
        return missing

    def describe(self) -> str:
        def flag(ok: object) -> str:
            return "yes" if ok else "NO"

        return (
            f"capabilities: root={flag(self.root)} overlay={flag(self.overlay)} "
            f"fuse={flag(self.fuse)} containerd={self.containerd or 'NO'} "
            f"runc={self.runc or 'NO'} skopeo={self.skopeo or 'NO'} "
            f"docker-registry={self.registry or 'NO'}"
        )


def capabilities() -> Capabilities:
    """Probes the machine (no side effects)."""
    try:
        filesystems = Path("/proc/filesystems").read_text()
    except OSError:
        filesystems = ""
    return Capabilities(
        root=os.geteuid() == 0,
        overlay="overlay" in filesystems.split(),
        fuse=Path("/dev/fuse").exists() and "fuse" in filesystems.split(),
        containerd=shutil.which(CONTAINERD_BIN),
        runc=shutil.which("runc"),
        skopeo=shutil.which("skopeo"),
        registry=shutil.which("docker-registry") or shutil.which("registry"),
    )


# ---------------------------------------------------------------------------------------------
# Mount and process cleanup


def mounts_under(base: Path) -> list[str]:
    """Mount points at or below ``base`` (from /proc/self/mountinfo), deepest first."""
    found = [m.mountpoint for m in mountinfo.mounts_under(base.resolve())]
    return sorted(found, key=lambda p: (p.count("/"), p), reverse=True)


def unmount_all(base: Path) -> None:
    """Lazily unmounts every mount below ``base``, deepest first; repeats until none is left
    (stacked mounts). Errors are ignored: teardown must go on."""
    for _ in range(10):
        mps = mounts_under(base)
        if not mps:
            return
        for mp in mps:
            subprocess.run(["umount", "-l", mp], capture_output=True, check=False)


def pids_with_arg(needle: str) -> list[int]:
    """Pids of processes whose command line contains ``needle`` as an argument substring
    (used to find the shims started for one containerd address)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(needle.encode() in a for a in args):
            pids.append(int(entry.name))
    return pids


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# Configuration


def hosts_toml(host: str) -> str:
    """A ``hosts.toml`` for a plain-HTTP registry at ``host`` (``127.0.0.1:PORT``). containerd
    1.6 needs at least one ``[host]`` table."""
    return (
        f'server = "http://{host}"\n\n'
        f'[host."http://{host}"]\n'
        '  capabilities = ["pull", "resolve", "push"]\n'
        "  skip_verify = true\n"
    )


def write_certs_d(certs_d: Path, registry_hosts: Sequence[str]) -> None:
    """Writes ``certs_d/<host>/hosts.toml`` for every registry host."""
    for host in registry_hosts:
        d = certs_d / host
        d.mkdir(parents=True, exist_ok=True)
        (d / "hosts.toml").write_text(hosts_toml(host))


def _q(s: object) -> str:
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class ContainerdPaths:
    """Every path of one private containerd, all under ``base``."""

    base: Path

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def state(self) -> Path:
        return self.base / "state"

    @property
    def address(self) -> Path:
        return self.base / "containerd.sock"

    @property
    def config(self) -> Path:
        return self.base / "config.toml"

    @property
    def certs_d(self) -> Path:
        return self.base / "certs.d"

    @property
    def cni_conf(self) -> Path:
        return self.base / "cni"

    @property
    def log(self) -> Path:
        return self.base / "containerd.log"


def render_config(
    paths: ContainerdPaths,
    *,
    proxy_name: str | None,
    proxy_address: Path | None,
    cri_snapshotter: str,
    sandbox_image: str,
    disable_snapshot_annotations: bool = False,
) -> str:
    """The ``config.toml`` (version 2) text for a private containerd."""
    lines = [
        "version = 2",
        f"root = {_q(paths.root)}",
        f"state = {_q(paths.state)}",
        "",
        "[grpc]",
        f"  address = {_q(paths.address)}",
        "[ttrpc]",
        f"  address = {_q(str(paths.address) + '.ttrpc')}",
        "[debug]",
        '  address = ""',
        '  level = "info"',
        "[metrics]",
        '  address = ""',
        "",
    ]
    if proxy_name and proxy_address is not None:
        lines += [
            f"[proxy_plugins.{proxy_name}]",
            '  type = "snapshot"',
            f"  address = {_q(proxy_address)}",
            "",
        ]
    annotations = "true" if disable_snapshot_annotations else "false"
    lines += [
        '[plugins."io.containerd.internal.v1.opt"]',
        f"  path = {_q(paths.base / 'opt')}",
        '[plugins."io.containerd.grpc.v1.cri"]',
        f"  sandbox_image = {_q(sandbox_image)}",
        "  disable_tcp_service = true",
        '  stream_server_address = "127.0.0.1"',
        '  stream_server_port = "0"',
        '[plugins."io.containerd.grpc.v1.cri".containerd]',
        f"  snapshotter = {_q(cri_snapshotter)}",
        f"  disable_snapshot_annotations = {annotations}",
        '[plugins."io.containerd.grpc.v1.cri".cni]',
        '  bin_dir = "/usr/lib/cni"',
        f"  conf_dir = {_q(paths.cni_conf)}",
        '[plugins."io.containerd.grpc.v1.cri".registry]',
        f"  config_path = {_q(paths.certs_d)}",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The running containerd


@dataclass
class Containerd:
    """A running private containerd. Use :func:`start_containerd` to get one."""

    paths: ContainerdPaths
    proc: subprocess.Popen[bytes]
    proxy_name: str | None
    registry_hosts: tuple[str, ...]
    _channel: grpc.Channel | None = field(default=None, repr=False)

    @property
    def address(self) -> Path:
        return self.paths.address

    def ctr(
        self,
        *args: str,
        namespace: str = "default",
        check: bool = True,
        timeout: float = 300.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Runs ``ctr --address <sock> --namespace <ns> <args>``. Raises :class:`CtrError`
        (with stdout/stderr and the containerd log tail) if ``check`` and it fails."""
        cmd = [CTR_BIN, "--address", str(self.address), "--namespace", namespace, *args]
        try:
            res = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout, input=input, check=False
            )
        except subprocess.TimeoutExpired as e:
            raise CtrError(
                f"{' '.join(cmd)}: timed out after {timeout}s\n{self.log_tail()}",
                str(e.stdout or ""),
                str(e.stderr or ""),
            ) from e
        if check and res.returncode != 0:
            raise CtrError(
                f"{' '.join(cmd)}: exit {res.returncode}: {res.stderr.strip()}\n"
                f"--- containerd log tail ---\n{self.log_tail()}",
                res.stdout,
                res.stderr,
            )
        return res

    def pull(self, ref: str, *, snapshotter: str | None = None, namespace: str = "default") -> None:
        """``ctr images pull`` of ``ref`` from a local plain-HTTP registry, unpacking into
        ``snapshotter`` (default: the proxy plugin)."""
        self.ctr(
            "images",
            "pull",
            "--plain-http",
            "--hosts-dir",
            str(self.paths.certs_d),
            "--snapshotter",
            snapshotter or self.proxy_name or "overlayfs",
            ref,
            namespace=namespace,
        )

    def run(
        self,
        ref: str,
        container_id: str,
        *cmd: str,
        snapshotter: str | None = None,
        namespace: str = "default",
        timeout: float = 120.0,
    ) -> str:
        """``ctr run --rm`` of ``ref`` as ``container_id``; returns the container's stdout.
        Raises :class:`CtrError` if the container fails or exits non-zero."""
        res = self.ctr(
            "run",
            "--rm",
            "--runc-root",
            str(self.paths.state / "runc"),
            "--snapshotter",
            snapshotter or self.proxy_name or "overlayfs",
            ref,
            container_id,
            *cmd,
            namespace=namespace,
            timeout=timeout,
        )
        return res.stdout

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.paths.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no containerd log)"

    def channel(self) -> grpc.Channel:
        """A gRPC channel to containerd's socket (shared, closed at teardown)."""
        if self._channel is None:
            self._channel = grpc.insecure_channel(
                f"unix://{self.address}",
                options=[
                    ("grpc.max_receive_message_length", 16 << 20),
                    ("grpc.max_send_message_length", 16 << 20),
                ],
            )
        return self._channel

    def cri(self) -> CriImageClient:
        """A CRI ``runtime.v1.ImageService`` client on containerd's socket."""
        return CriImageClient(self.channel())

    def gc(self, namespace: str = "default") -> None:
        """Triggers a synchronous garbage collection (``ctr content prune`` style): removes a
        throwaway lease with ``--sync``, which makes containerd run GC and wait for it."""
        lease = f"sociable-gc-{time.monotonic_ns()}"
        self.ctr("leases", "create", "--id", lease, namespace=namespace)
        self.ctr("leases", "delete", "--sync", lease, namespace=namespace)

    def stop(self) -> None:
        """Stops containerd (SIGTERM, then SIGKILL after 10 s) and kills its shims. Idempotent."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for pid in pids_with_arg(str(self.address)):
            if pid != os.getpid():
                _kill(pid)


def wait_for_socket(
    path: Path, proc: subprocess.Popen[bytes] | None, timeout: float, what: str
) -> None:
    """Waits until a gRPC server answers on unix socket ``path``. Raises
    :class:`ContainerdError` if ``proc`` exits first or ``timeout`` (seconds) passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ContainerdError(f"{what} exited with status {proc.returncode} while starting")
        if path.exists():
            ch = grpc.insecure_channel(f"unix://{path}")
            try:
                grpc.channel_ready_future(ch).result(timeout=1)
                return
            except grpc.FutureTimeoutError:
                pass
            finally:
                ch.close()
        time.sleep(0.05)
    raise ContainerdError(f"{what}: no gRPC server on {path} after {timeout}s")


@contextlib.contextmanager
def start_containerd(
    base: Path,
    *,
    proxy_address: Path | None,
    proxy_name: str = "sociable",
    cri_snapshotter: str = "sociable",
    registry_hosts: Sequence[str] = (),
    sandbox_image: str = "127.0.0.1:1/pause:none",
    disable_snapshot_annotations: bool = False,
) -> Iterator[Containerd]:
    """Starts a private containerd under ``base`` (created; removed at exit) and yields it.

    Always tears down on exit, also when the body raises: containerd and its shims are killed,
    every mount under ``base`` is lazily unmounted, and ``base`` is deleted. Raises
    :class:`ContainerdError` (with the log tail) if containerd does not serve within
    :data:`START_TIMEOUT_S` seconds.
    """
    print(capabilities().describe(), file=sys.stderr)
    paths = ContainerdPaths(base)
    base.mkdir(parents=True, exist_ok=True)
    for d in (paths.root, paths.state, paths.cni_conf):
        d.mkdir(parents=True, exist_ok=True)
    write_certs_d(paths.certs_d, registry_hosts)
    # CRI 1.6 reports image-fs usage for this path.
    (paths.root / f"io.containerd.snapshotter.v1.{proxy_name}").mkdir(exist_ok=True)
    paths.config.write_text(
        render_config(
            paths,
            proxy_name=proxy_name if proxy_address is not None else None,
            proxy_address=proxy_address,
            cri_snapshotter=cri_snapshotter,
            sandbox_image=sandbox_image,
            disable_snapshot_annotations=disable_snapshot_annotations,
        )
    )
    log = open(paths.log, "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [CONTAINERD_BIN, "--config", str(paths.config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    ctd = Containerd(
        paths=paths,
        proc=proc,
        proxy_name=proxy_name if proxy_address is not None else None,
        registry_hosts=tuple(registry_hosts),
    )
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
            unmount_all(base)
            shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# A minimal CRI ImageService client (messages built from a descriptor: no generated code)


def _cri_file() -> descriptor_pb2.FileDescriptorProto:
    """The subset of ``runtime.v1`` (cri-api) messages the tests use, with the upstream field
    numbers (those of the CRI v1 API). Unknown fields in answers are skipped by protobuf."""
    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(
        name="sociable_tests/cri_image_service.proto", package="runtime.v1", syntax="proto3"
    )

    def msg(name: str, *fields: tuple[str, int, int, int, str]) -> None:
        m = fdp.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            f = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = type_name

    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    s, b, u64, m_ = F.TYPE_STRING, F.TYPE_BOOL, F.TYPE_UINT64, F.TYPE_MESSAGE
    msg("ImageSpec", ("image", 1, s, opt, ""))
    msg(
        "AuthConfig",
        ("username", 1, s, opt, ""),
        ("password", 2, s, opt, ""),
        ("auth", 3, s, opt, ""),
        ("server_address", 4, s, opt, ""),
        ("identity_token", 5, s, opt, ""),
        ("registry_token", 6, s, opt, ""),
    )
    msg(
        "Image",
        ("id", 1, s, opt, ""),
        ("repo_tags", 2, s, rep, ""),
        ("repo_digests", 3, s, rep, ""),
        ("size", 4, u64, opt, ""),
    )
    msg(
        "PullImageRequest",
        ("image", 1, m_, opt, ".runtime.v1.ImageSpec"),
        ("auth", 2, m_, opt, ".runtime.v1.AuthConfig"),
    )
    msg("PullImageResponse", ("image_ref", 1, s, opt, ""))
    msg("RemoveImageRequest", ("image", 1, m_, opt, ".runtime.v1.ImageSpec"))
    msg("RemoveImageResponse")
    msg(
        "ImageStatusRequest",
        ("image", 1, m_, opt, ".runtime.v1.ImageSpec"),
        ("verbose", 2, b, opt, ""),
    )
    msg("ImageStatusResponse", ("image", 1, m_, opt, ".runtime.v1.Image"))
    msg("ImageFilter", ("image", 1, m_, opt, ".runtime.v1.ImageSpec"))
    msg("ListImagesRequest", ("filter", 1, m_, opt, ".runtime.v1.ImageFilter"))
    msg("ListImagesResponse", ("images", 1, m_, rep, ".runtime.v1.Image"))
    return fdp


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_cri_file())


def cri_message(name: str) -> Any:
    """The message class ``runtime.v1.<name>`` of the CRI subset."""
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"runtime.v1.{name}"))


@dataclass(frozen=True)
class CriImage:
    id: str
    repo_tags: tuple[str, ...]
    repo_digests: tuple[str, ...]
    size: int


class CriImageClient:
    """Calls ``runtime.v1.ImageService`` over a gRPC channel. gRPC errors propagate as
    ``grpc.RpcError`` (the caller owns the channel)."""

    SERVICE = "/runtime.v1.ImageService/"

    def __init__(self, channel: grpc.Channel, timeout_s: float = 300.0) -> None:
        self._channel = channel
        self._timeout = timeout_s

    def _call(self, method: str, request: Any, response_name: str) -> Any:
        resp_cls = cri_message(response_name)
        stub = self._channel.unary_unary(
            self.SERVICE + method,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=resp_cls.FromString,
        )
        return stub(request, timeout=self._timeout)

    def _spec(self, image: str) -> Any:
        return cri_message("ImageSpec")(image=image)

    def pull_image(self, image: str) -> str:
        """PullImage; returns the image ref (``sha256:<config digest>``)."""
        req = cri_message("PullImageRequest")(image=self._spec(image))
        return str(self._call("PullImage", req, "PullImageResponse").image_ref)

    def remove_image(self, image: str) -> None:
        """RemoveImage (idempotent on the CRI side)."""
        req = cri_message("RemoveImageRequest")(image=self._spec(image))
        self._call("RemoveImage", req, "RemoveImageResponse")

    def image_status(self, image: str) -> CriImage | None:
        """ImageStatus; ``None`` when the image is not present."""
        req = cri_message("ImageStatusRequest")(image=self._spec(image))
        resp = self._call("ImageStatus", req, "ImageStatusResponse")
        if not resp.HasField("image"):
            return None
        img = resp.image
        return CriImage(
            id=img.id,
            repo_tags=tuple(img.repo_tags),
            repo_digests=tuple(img.repo_digests),
            size=int(img.size),
        )

    def list_images(self) -> list[CriImage]:
        resp = self._call("ListImages", cri_message("ListImagesRequest")(), "ListImagesResponse")
        return [
            CriImage(
                id=i.id,
                repo_tags=tuple(i.repo_tags),
                repo_digests=tuple(i.repo_digests),
                size=int(i.size),
            )
            for i in resp.images
        ]


# ---------------------------------------------------------------------------------------------
# containerd's own snapshots service, through the same typed client as the daemon


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,  # type: ignore[misc]
):
    pass


class _NamespaceHeader(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """Adds ``containerd-namespace: <namespace>`` to every call (containerd's services need
    it; a proxy snapshotter must not)."""

    def __init__(self, namespace: str) -> None:
        self._header = ("containerd-namespace", namespace)

    def _details(self, d: Any) -> _CallDetails:
        return _CallDetails(
            d.method,
            d.timeout,
            [*(d.metadata or ()), self._header],
            d.credentials,
            d.wait_for_ready,
            d.compression,
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)


class ContainerdSnapshots(SnapClient):
    """:class:`~tests.support.snapclient.SnapClient` pointed at containerd's socket: calls
    ``containerd.services.snapshots.v1.Snapshots`` for snapshotter ``snapshotter`` (e.g.
    ``"overlayfs"`` or the proxy plugin's name) in ``namespace``. Keys are containerd's client
    keys; containerd's metadata layer sits in front of the backend."""

    def __init__(self, address: Path, snapshotter: str, namespace: str) -> None:
        self.address = address
        self.snapshotter = snapshotter
        self.channel = grpc.intercept_channel(
            grpc.insecure_channel(f"unix:{address}"), _NamespaceHeader(namespace)
        )
        self.stub = pb_grpc.SnapshotsStub(self.channel)


def snapshot_dir_of(mounts: Sequence[MountSpec]) -> Path:
    """The ``snapshots/<id>`` directory whose ``fs`` a Prepare/Mounts answer writes to (upperdir
    of an overlay, source of a bind). Raises ``ValueError`` for an answer without one."""
    for m in mounts:
        if m.type == "bind":
            return Path(m.source).parent
        for opt in m.options:
            if opt.startswith("upperdir="):
                return Path(opt.split("=", 1)[1]).parent
    raise ValueError(f"no writable snapshot dir in mounts {mounts!r}")


# ---------------------------------------------------------------------------------------------
# Fixtures: test images in the session registry, and daemon + containerd per test

PROXY_NAME = "sociable"


@dataclass(frozen=True)
class PushedImages:
    """The standard images in the session registry (``host`` is ``127.0.0.1:PORT``)."""

    host: str
    busybox_ref: str
    busybox: images.Image
    pause_ref: str


@dataclass
class SociableStack:
    """A daemon, a containerd using it as proxy snapshotter :data:`PROXY_NAME`, and a client
    talking to the daemon directly (backend names such as ``default/3/sha256:...``)."""

    daemon: SnapDaemon
    containerd: Containerd
    backend: SnapClient

    def snapshots_dir(self) -> Path:
        return self.daemon.root / "snapshots"

    def wait_backend_empty(self, timeout_s: float = 30.0) -> None:
        """Waits until the daemon lists no snapshot and ``<root>/snapshots`` is empty
        (containerd's GC calls Remove, then Cleanup, asynchronously). Raises AssertionError
        with both logs after ``timeout_s`` seconds."""
        deadline = time.monotonic() + timeout_s
        while True:
            names = [i.name for i in self.backend.list()]
            d = self.snapshots_dir()
            left = sorted(p.name for p in d.iterdir()) if d.exists() else []
            if not names and not left:
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"daemon still has snapshots {names} and dirs {left}\n"
                    f"--- containerd log ---\n{self.containerd.log_tail()}\n"
                    f"--- daemon log ---\n{self.daemon.log_tail()}"
                )
            time.sleep(0.2)


def require_containerd() -> None:
    """Skips (loudly) when a prerequisite of the containerd tests is absent."""
    caps = capabilities()
    print(caps.describe())
    missing = caps.missing_for_containerd()
    if missing:
        pytest.skip(f"PREREQUISITE MISSING for containerd tests: {', '.join(missing)}")


@pytest.fixture(scope="session")
def pushed_images(
    registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory
) -> PushedImages:
    """Builds the standard busybox and pause images and pushes them to the session registry
    as ``sociable-test/busybox:v1`` and ``sociable-test/pause:v1``."""
    require_containerd()
    base = tmp_path_factory.mktemp("images")
    busybox = images.busybox_image(base / "busybox")
    pause = images.pause_image(base / "pause")
    return PushedImages(
        host=registry.host,
        busybox_ref=images.push(busybox, registry.host, "sociable-test/busybox", "v1"),
        busybox=busybox,
        pause_ref=images.push(pause, registry.host, "sociable-test/pause", "v1"),
    )


@pytest.fixture
def sociable_stack(pushed_images: PushedImages, tmp_path: Path) -> Iterator[SociableStack]:
    """A fresh daemon and a private containerd (CRI ``snapshotter = "sociable"``, sandbox image
    and registry from :func:`pushed_images`), torn down after the test."""
    with (
        run_daemon(tmp_path / "sociable") as daemon,
        start_containerd(
            tmp_path / "containerd",
            proxy_address=daemon.address,
            proxy_name=PROXY_NAME,
            cri_snapshotter=PROXY_NAME,
            registry_hosts=[pushed_images.host],
            sandbox_image=pushed_images.pause_ref,
        ) as ctd,
    ):
        client = daemon.client()
        try:
            yield SociableStack(daemon, ctd, client)
        finally:
            client.close()


def _all_threads_stopped(pid: int) -> bool:
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except FileNotFoundError:  # the thread ended
            continue
        if stat[stat.rindex(")") + 2] not in "Tt":
            return False
    return True


@contextlib.contextmanager
def stopped(ctd: Containerd) -> Iterator[None]:
    """containerd stopped with SIGSTOP for the body (its socket accepts, nothing answers).
    kill(2) returns before every thread has stopped: wait until each one has (state T), or a
    thread still running could answer the first call."""
    os.kill(ctd.proc.pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 10
        while not _all_threads_stopped(ctd.proc.pid):
            assert time.monotonic() < deadline, "containerd did not stop within 10 s"
            time.sleep(0.01)
        yield
    finally:
        os.kill(ctd.proc.pid, signal.SIGCONT)
