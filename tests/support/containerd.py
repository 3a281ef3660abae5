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
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

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


def _unescape_mountinfo(path: str) -> str:
    return (
        path.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
    )


def mounts_under(base: Path) -> list[str]:
    """Mount points at or below ``base`` (from /proc/self/mountinfo), deepest first."""
    prefix = str(base.resolve())
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = _unescape_mountinfo(line.split()[4])
            if mp == prefix or mp.startswith(prefix + "/"):
                found.append(mp)
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
    1.6 needs at least one ``[host]`` table (spec/containerd.md §6.3)."""
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
    # CRI 1.6 reports image-fs usage for this path (spec/containerd.md §2.8).
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
    numbers (spec/containerd.md §4.2). Unknown fields in answers are skipped by protobuf."""
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
# The sociable daemon as a subprocess


@dataclass
class SociableDaemon:
    """``python -m snapshotter.cli --address <address> --root <root>`` as a subprocess.

    :meth:`start` waits until the gRPC socket answers; :meth:`kill9` simulates a crash;
    :meth:`stop` sends SIGTERM and waits. The log (stdout+stderr) is appended to ``log``.
    """

    root: Path
    address: Path
    log: Path
    extra_args: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Starts the daemon and waits for its socket. Raises :class:`ContainerdError`
        (with the log tail) if it exits or does not serve within ``timeout`` seconds."""
        if self.proc is not None and self.proc.poll() is None:
            raise ContainerdError(f"sociable daemon at {self.address} already running")
        self.root.mkdir(parents=True, exist_ok=True)
        self.address.parent.mkdir(parents=True, exist_ok=True)
        repo = Path(__file__).resolve().parents[2]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "snapshotter.cli",
                    "--address",
                    str(self.address),
                    "--root",
                    str(self.root),
                    *self.extra_args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=repo,
                start_new_session=True,
            )
        try:
            wait_for_socket(self.address, self.proc, timeout, "sociable-snapshotter")
        except ContainerdError as e:
            self.kill9()
            raise ContainerdError(f"{e}\n--- daemon log tail ---\n{self.log_tail()}") from e

    def kill9(self) -> None:
        """SIGKILL the daemon (no cleanup on its side) and reap it. Idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` seconds (then SIGKILL). Returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        return self.proc.returncode

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no daemon log)"


@contextlib.contextmanager
def start_sociable(base: Path, *extra_args: str) -> Iterator[SociableDaemon]:
    """Runs a sociable daemon with root ``base/root`` and socket ``base/sociable.sock``; at
    exit stops it, unmounts everything under ``base`` and removes ``base``."""
    base.mkdir(parents=True, exist_ok=True)
    d = SociableDaemon(
        root=base / "root",
        address=base / "sociable.sock",
        log=base / "sociable.log",
        extra_args=tuple(extra_args),
    )
    try:
        d.start()
        yield d
    finally:
        try:
            d.stop()
        finally:
            unmount_all(base)
            shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# A thin Snapshots v1 client (for containerd's snapshots service or a daemon socket)


@dataclass(frozen=True)
class MountSpec:
    type: str
    source: str
    options: tuple[str, ...]


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


class SnapshotsClient:
    """Calls ``containerd.services.snapshots.v1.Snapshots`` on ``channel``.

    ``snapshotter`` fills every request's ``snapshotter`` field; ``namespace`` (when given) is
    sent as the ``containerd-namespace`` metadata header, which containerd's own service needs.
    Errors propagate as ``grpc.RpcError``.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        snapshotter: str,
        namespace: str | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        from snapshotter.api import snapshots_pb2, snapshots_pb2_grpc

        self.pb: Any = snapshots_pb2
        self._stub: Any = snapshots_pb2_grpc.SnapshotsStub(channel)
        self.snapshotter = snapshotter
        self._md = (("containerd-namespace", namespace),) if namespace else ()
        self._timeout = timeout_s

    def _kw(self) -> dict[str, Any]:
        return {"metadata": self._md, "timeout": self._timeout}

    @staticmethod
    def _mounts(resp: Any) -> list[MountSpec]:
        return [MountSpec(m.type, m.source, tuple(m.options)) for m in resp.mounts]

    def prepare(
        self, key: str, parent: str = "", labels: dict[str, str] | None = None
    ) -> list[MountSpec]:
        req = self.pb.PrepareSnapshotRequest(
            snapshotter=self.snapshotter, key=key, parent=parent, labels=labels or {}
        )
        return self._mounts(self._stub.Prepare(req, **self._kw()))

    def view(
        self, key: str, parent: str = "", labels: dict[str, str] | None = None
    ) -> list[MountSpec]:
        req = self.pb.ViewSnapshotRequest(
            snapshotter=self.snapshotter, key=key, parent=parent, labels=labels or {}
        )
        return self._mounts(self._stub.View(req, **self._kw()))

    def mounts(self, key: str) -> list[MountSpec]:
        req = self.pb.MountsRequest(snapshotter=self.snapshotter, key=key)
        return self._mounts(self._stub.Mounts(req, **self._kw()))

    def commit(self, name: str, key: str, labels: dict[str, str] | None = None) -> None:
        req = self.pb.CommitSnapshotRequest(
            snapshotter=self.snapshotter, name=name, key=key, labels=labels or {}
        )
        self._stub.Commit(req, **self._kw())

    def remove(self, key: str) -> None:
        self._stub.Remove(
            self.pb.RemoveSnapshotRequest(snapshotter=self.snapshotter, key=key), **self._kw()
        )

    def stat(self, key: str) -> Any:
        """The ``Info`` message of ``key``."""
        req = self.pb.StatSnapshotRequest(snapshotter=self.snapshotter, key=key)
        return self._stub.Stat(req, **self._kw()).info

    def list(self, *filters: str) -> list[Any]:
        """Every ``Info`` the List stream yields (all batches)."""
        req = self.pb.ListSnapshotsRequest(snapshotter=self.snapshotter, filters=list(filters))
        return [info for batch in self._stub.List(req, **self._kw()) for info in batch.info]

    def usage(self, key: str) -> tuple[int, int]:
        """(size in bytes, inodes)."""
        resp = self._stub.Usage(
            self.pb.UsageRequest(snapshotter=self.snapshotter, key=key), **self._kw()
        )
        return int(resp.size), int(resp.inodes)

    def cleanup(self) -> None:
        self._stub.Cleanup(self.pb.CleanupRequest(snapshotter=self.snapshotter), **self._kw())
