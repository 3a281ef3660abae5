"""A private image pulled lazily through the CRI image-service proxy (root).

A token-auth registry (behind a counting proxy that records every Range read) holds an image
indexed with `sociable convert --user`. The daemon serves the CRI proxy (`[cri] enable`) in
front of a private containerd whose proxy snapshotter it is, and has no docker config: the
only credentials it can use are those a CRI client playing kubelet sends with `PullImage`.
The scenarios run in order on one stack:

- without credentials, `PullImage` through the proxy fails as it fails at containerd, and no
  layer is mounted or read;
- with credentials, the image is pulled lazily (every indexed layer mounted, not one byte of
  it fetched) and a container reads files with the right checksums through Range reads;
- after `kill -9` and a restart on the same root the layers are restored and a container
  reads files it had not read before, with no new `PullImage`: the captured credentials file
  authorises the Range reads;
- the password is in no log line of the daemon and not in the `status` output.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from snapshotter.api import cri_images_pb2 as cri
from snapshotter.api import cri_images_pb2_grpc
from snapshotter.credentials.captured import credentials_path
from tests.support import images
from tests.support.cli import sociable
from tests.support.containerd import (
    Containerd,
    ContainerdPaths,
    CtrError,
    PushedImages,
    require_containerd,
    start_containerd,
)
from tests.support.registry import (
    CountingProxy,
    RegistryServer,
    TokenServer,
    registry_available,
    start_proxy,
    start_registry,
)
from tests.support.snapclient import SnapDaemon, run_daemon

pytestmark = [pytest.mark.root, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
K8S = "k8s.io"
TIMEOUT_S = 300.0
MIN_LAYER_SIZE = 100_000
"""The 250-byte whiteout layer is below it: the daemon unpacks it locally (a full GET)."""
REPOSITORY = "private/bulk"
FIRST_FILES = ("os.py", "json/decoder.py")
"""Read by the first container (paths under /usr/lib/python3.11)."""
LATER_FILES = ("email/message.py", "_bulk_padding.bin")
"""Read only after the restart: their spans must come from the registry then."""


@dataclass
class RangeLog:
    """The Range header of every blob request the counting proxy saw, in order."""

    reads: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, path: str, range_header: str) -> float:
        if "/blobs/sha256:" in path:
            with self.lock:
                self.reads.append((path.rsplit("/", 1)[-1], range_header))
        return 0.0  # never hold the request

    def of(self, digest: str) -> list[str]:
        with self.lock:
            return [r for d, r in self.reads if d == digest]


@dataclass
class Stack:
    registry: RegistryServer
    proxy: CountingProxy
    ranges: RangeLog
    daemon: SnapDaemon
    containerd: Containerd
    cri_socket: Path
    image: images.Image
    ref: str
    """The image through the counting proxy (the host the credentials are captured for)."""

    def proxied(self) -> tuple[grpc.Channel, Any]:
        channel = grpc.insecure_channel(f"unix://{self.cri_socket}")
        return channel, cri_images_pb2_grpc.ImageServiceStub(channel)

    def direct(self) -> Any:
        return cri_images_pb2_grpc.ImageServiceStub(self.containerd.channel())

    def auth(self) -> Any:
        assert self.registry.username and self.registry.password
        return cri.AuthConfig(username=self.registry.username, password=self.registry.password)

    def run(self, name: str, script: str) -> str:
        return self.containerd.run(self.ref, name, "/bin/sh", "-c", script, namespace=K8S)

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.daemon.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    out.append(event)
        return out

    def count(self, msg: str) -> int:
        return sum(1 for e in self.events() if e.get("msg") == msg)

    def status(self) -> str:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "snapshotter.cli",
                "--root",
                str(self.daemon.root),
                "status",
                "--json",
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        ).stdout

    def blob_bytes(self, digest: str) -> int:
        return sum(n for k, n in self.proxy.bytes_sent.items() if k.endswith(digest))


def layer_sums(image: images.Image, names: tuple[str, ...]) -> dict[str, str]:
    """sha256 of the files `names` (under usr/lib/python3.11) as stored in the bulk layer."""
    want = {f"usr/lib/python3.11/{n}" for n in names}
    out: dict[str, str] = {}
    with gzip.open(image.layers[-1].path) as gz, tarfile.open(fileobj=gz, mode="r|") as tf:
        for member in tf:
            name = member.name.lstrip("./")
            if name in want and member.isreg():
                f = tf.extractfile(member)
                assert f is not None
                out["/" + name] = hashlib.sha256(f.read()).hexdigest()
    assert len(out) == len(want), f"the bulk layer lacks some of {sorted(want)}"
    return out


def parse_sums(output: str) -> dict[str, str]:
    sums = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 2 and len(parts[0]) == 64:
            sums[parts[1]] = parts[0]
    return sums


def sha256sum(names: tuple[str, ...]) -> str:
    return "sha256sum " + " ".join(f"/usr/lib/python3.11/{n}" for n in names)


@pytest.fixture(scope="module")
def stack(pushed_images: PushedImages, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require_containerd()
    if not registry_available():
        pytest.skip("PREREQUISITE MISSING: docker-registry is not installed")
    base = tmp_path_factory.mktemp("private-lazy")
    image = images.bulk_image()
    with start_registry(base / "registry", "token", token_server=TokenServer()) as registry:
        pushed = f"{registry.host}/{REPOSITORY}:v1-soci"
        sociable(
            "convert",
            "--user",
            registry.user,
            "--min-layer-size",
            str(MIN_LAYER_SIZE),
            f"oci-layout:{image.layout}:{image.tag}",
            pushed,
            root=base / "convert-root",
        )
        ranges = RangeLog()
        ctd_paths = ContainerdPaths(base / "containerd")
        cri_socket = base / "run" / "cri.sock"
        config = base / "sociable.toml"
        # No docker config: the daemon's only credentials are those captured by the proxy.
        config.write_text(
            "[remote]\n"
            'hosts_dir = ""\n'
            f'docker_config = "{base / "no-docker" / "config.json"}"\n'
            "background_fetch = false\n"
            "[cri]\n"
            "enable = true\n"
            f'address = "{cri_socket}"\n'
            f'containerd_address = "{ctd_paths.address}"\n'
        )
        with (
            start_proxy(registry, hold=ranges) as proxy,
            run_daemon(base / "sociable", config=config) as daemon,
            start_containerd(
                ctd_paths.base,
                proxy_address=daemon.address,
                registry_hosts=[proxy.host, registry.host, pushed_images.host],
                sandbox_image=pushed_images.pause_ref,
            ) as ctd,
        ):
            yield Stack(
                registry=registry,
                proxy=proxy,
                ranges=ranges,
                daemon=daemon,
                containerd=ctd,
                cri_socket=cri_socket,
                image=image,
                ref=pushed.replace(registry.host, proxy.host),
            )


def restart_daemon(stack: Stack) -> None:
    """kill -9 and start the daemon on the same root; wait until containerd talks to it
    again (it re-dials the proxy snapshotter with backoff)."""
    stack.daemon.kill9()
    stack.daemon.start()
    deadline = time.monotonic() + 30
    while True:
        res = stack.containerd.ctr(
            "snapshots", "--snapshotter", "sociable", "ls", namespace=K8S, check=False
        )
        if res.returncode == 0:
            return
        assert time.monotonic() < deadline, res.stderr
        time.sleep(0.5)


def test_pull_without_credentials_fails_as_at_containerd(stack: Stack) -> None:
    request = cri.PullImageRequest(image=cri.ImageSpec(image=stack.ref))
    with pytest.raises(grpc.RpcError) as direct:
        stack.direct().PullImage(request, timeout=TIMEOUT_S)
    channel, proxied = stack.proxied()
    with channel, pytest.raises(grpc.RpcError) as through:
        proxied.PullImage(request, timeout=TIMEOUT_S)
    assert through.value.code() == direct.value.code() != grpc.StatusCode.OK
    assert through.value.details() == direct.value.details()
    assert "authorization failed" in (direct.value.details() or ""), direct.value.details()
    # Nothing captured, nothing mounted, not one blob read.
    assert not credentials_path(stack.daemon.root).exists()
    assert stack.count("lazy layer mounted") == 0
    assert stack.status().strip() == ""
    assert stack.ranges.reads == []


def test_pull_with_credentials_is_lazy_and_a_container_reads(stack: Stack) -> None:
    busybox, features, whiteout, bulk = stack.image.layers
    channel, proxied = stack.proxied()
    start = time.monotonic()
    with channel:
        request = cri.PullImageRequest(image=cri.ImageSpec(image=stack.ref), auth=stack.auth())
        pulled = proxied.PullImage(request, timeout=TIMEOUT_S)
    pull_s = time.monotonic() - start
    assert pulled.image_ref == stack.image.config_digest
    assert credentials_path(stack.daemon.root).exists()

    # Every indexed layer is mounted lazily: not one byte of it crossed the wire.
    assert stack.count("lazy layer mounted") == 3, stack.daemon.log_tail(60)
    for layer in (busybox, features, bulk):
        assert stack.blob_bytes(layer.digest) == 0, f"layer {layer.digest} was fetched"
    assert stack.blob_bytes(whiteout.digest) == whiteout.size  # unpacked locally
    status = [json.loads(line) for line in stack.status().splitlines()]
    assert {s["digest"] for s in status} == {busybox.digest, features.digest, bulk.digest}

    output = stack.run("private-1", f"{sha256sum(FIRST_FILES)}; cat /data/hello.txt")
    sums = parse_sums(output)
    for path, digest in layer_sums(stack.image, FIRST_FILES).items():
        assert sums.get(path) == digest, f"{path}: {sums.get(path)} != {digest}\n{output}"
    assert "hello from layer 3" in output
    reads = stack.ranges.of(bulk.digest)
    assert reads and all(r.startswith("bytes=") for r in reads), reads
    fetched = stack.blob_bytes(bulk.digest)
    assert 0 < fetched < bulk.size
    print(
        f"\nprivate lazy pull {pull_s:.2f} s; the container read {fetched} of {bulk.size} bytes "
        f"of the bulk layer in {len(reads)} Range reads; token requests "
        f"{dict(stack.registry.token_server.requests) if stack.registry.token_server else {}}"
    )


def test_restart_restores_layers_with_captured_credentials(stack: Stack) -> None:
    bulk = stack.image.layers[-1]
    before_reads = len(stack.ranges.of(bulk.digest))
    restart_daemon(stack)
    restored = [e for e in stack.events() if e.get("msg") == "lazy layer restored"]
    assert len(restored) >= 3, stack.daemon.log_tail(60)

    output = stack.run("private-2", sha256sum(LATER_FILES))
    sums = parse_sums(output)
    for path, digest in layer_sums(stack.image, LATER_FILES).items():
        assert sums.get(path) == digest, f"{path}: {sums.get(path)} != {digest}\n{output}"
    # Those files' spans came from the registry after the restart, with no new PullImage.
    after = stack.ranges.of(bulk.digest)[before_reads:]
    assert after and all(r.startswith("bytes=") for r in after), after
    assert stack.count("credentials captured") == 1
    print(f"\nafter the restart: {len(after)} Range reads of the bulk layer")


def test_no_secret_in_logs_or_status(stack: Stack) -> None:
    password = stack.registry.password
    assert password
    assert password in credentials_path(stack.daemon.root).read_text()
    assert stack.registry.user
    basic = base64.b64encode(stack.registry.user.encode()).decode()
    log = stack.daemon.log.read_text(errors="replace")
    assert "credentials captured" in log and "lazy layer restored" in log
    status = stack.status()
    assert status.count("\n") == 3
    for text in (log, status):
        assert password not in text
        assert basic not in text


def test_without_the_captured_file_the_reads_are_refused(stack: Stack) -> None:
    """The control: the Range reads after the restart were authorised by the captured file.
    Without it (and with no docker config) the registry refuses the daemon's reads."""
    bulk = stack.image.layers[-1]
    credentials_path(stack.daemon.root).unlink()
    restart_daemon(stack)
    before = len(stack.ranges.of(bulk.digest))
    start = time.monotonic()
    with pytest.raises(CtrError, match="Input/output error"):
        # Stops at the first file whose spans are not local.
        stack.run(
            "private-3",
            "for f in $(find /usr/lib/python3.11 -type f); do cat $f > /dev/null || exit 3; done",
        )
    refused_s = time.monotonic() - start
    refused = [e for e in stack.events() if "401" in str(e.get("msg"))]
    assert refused, stack.daemon.log_tail(20)
    print(f"\nwithout the captured file: refused in {refused_s:.1f} s ({len(refused)} log lines)")
    assert len(stack.ranges.of(bulk.digest)) > before  # it did ask the registry
    assert stack.count("credentials captured") == 1
