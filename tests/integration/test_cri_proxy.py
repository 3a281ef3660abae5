"""The CRI image-service proxy in front of a real containerd (CRI plugin, root).

Every ImageService RPC answered through the proxy is compared, field by field, with the answer
containerd gives directly; errors too (same code, same details). A PullImage with credentials
against a token-auth registry is captured to `<root>/credentials/cri.json` (0600, nothing in
the logs); a pull without credentials captures nothing.
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from snapshotter.api import cri_images_pb2 as cri
from snapshotter.api import cri_images_pb2_grpc
from snapshotter.credentials.captured import CapturedCredentials, credentials_path
from snapshotter.cri.proxy import NO_DEADLINE_SEC, CriProxy
from tests.support import images
from tests.support.containerd import Containerd, PushedImages, start_containerd
from tests.support.registry import RegistryServer
from tests.support.snapclient import run_daemon

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="containerd's CRI needs root")

TIMEOUT_S = 120.0


@dataclass
class Stack:
    containerd: Containerd
    proxy: CriProxy
    credentials: CapturedCredentials
    root: Path
    direct: Any
    proxied: Any
    proxied_channel: grpc.Channel


@pytest.fixture
def stack(
    pushed_images: PushedImages, auth_registry: RegistryServer, tmp_path: Path
) -> Iterator[Stack]:
    with start_containerd(
        tmp_path / "containerd",
        proxy_address=None,
        cri_snapshotter="overlayfs",
        registry_hosts=[pushed_images.host, auth_registry.host],
        sandbox_image=pushed_images.pause_ref,
    ) as ctd:
        root = tmp_path / "root"
        root.mkdir(mode=0o700)
        credentials = CapturedCredentials(credentials_path(root))
        proxy = CriProxy(tmp_path / "cri.sock", ctd.address, credentials, threads=4)
        proxy.open()
        channel = grpc.insecure_channel(f"unix://{proxy.address}")
        try:
            yield Stack(
                ctd,
                proxy,
                credentials,
                root,
                cri_images_pb2_grpc.ImageServiceStub(ctd.channel()),
                cri_images_pb2_grpc.ImageServiceStub(channel),
                channel,
            )
        finally:
            channel.close()
            proxy.stop(1.0)


def both(stack: Stack, method: str, request: Any) -> tuple[Any, Any]:
    """(direct answer, proxied answer) of `method`."""
    direct = getattr(stack.direct, method)(request, timeout=TIMEOUT_S)
    proxied = getattr(stack.proxied, method)(request, timeout=TIMEOUT_S)
    return direct, proxied


def both_fail(stack: Stack, method: str, request: Any) -> tuple[grpc.RpcError, grpc.RpcError]:
    errors = []
    for stub in (stack.direct, stack.proxied):
        with pytest.raises(grpc.RpcError) as info:
            getattr(stub, method)(request, timeout=TIMEOUT_S)
        errors.append(info.value)
    return errors[0], errors[1]


def sorted_images(resp: Any) -> list[Any]:
    return sorted(resp.images, key=lambda i: i.id)


def assert_same_image(direct: Any, proxied: Any) -> None:
    for field in cri.Image.DESCRIPTOR.fields:
        assert getattr(direct, field.name) == getattr(proxied, field.name), field.name
    assert direct == proxied


def spec(image: str) -> Any:
    return cri.ImageSpec(image=image)


def test_every_rpc_through_the_proxy_answers_as_containerd(
    stack: Stack, pushed_images: PushedImages, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ref = pushed_images.busybox_ref

    direct, proxied = both(stack, "PullImage", cri.PullImageRequest(image=spec(ref)))
    assert direct.image_ref.startswith("sha256:")
    assert proxied.image_ref == direct.image_ref

    direct, proxied = both(stack, "ListImages", cri.ListImagesRequest())
    assert [i.id for i in sorted_images(direct)] == [i.id for i in sorted_images(proxied)]
    assert ref in [t for i in direct.images for t in i.repo_tags]
    for d, p in zip(sorted_images(direct), sorted_images(proxied), strict=True):
        assert_same_image(d, p)
    filtered = cri.ListImagesRequest(filter=cri.ImageFilter(image=spec(ref)))
    direct, proxied = both(stack, "ListImages", filtered)
    assert len(direct.images) == 1 and list(proxied.images) == list(direct.images)

    for verbose in (False, True):
        req = cri.ImageStatusRequest(image=spec(ref), verbose=verbose)
        direct, proxied = both(stack, "ImageStatus", req)
        assert direct.image.repo_tags == [ref]
        assert_same_image(direct.image, proxied.image)
        assert dict(proxied.info) == dict(direct.info)
        assert bool(direct.info) is verbose
    absent = cri.ImageStatusRequest(image=spec(pushed_images.host + "/no/such:image"))
    direct, proxied = both(stack, "ImageStatus", absent)
    assert not direct.HasField("image") and not proxied.HasField("image")

    # containerd stamps the answer with the time of its last sample, or now when it has none:
    # every field but the time equals the direct answers around it, and the time lies between.
    before, proxied = both(stack, "ImageFsInfo", cri.ImageFsInfoRequest())
    after = stack.direct.ImageFsInfo(cri.ImageFsInfoRequest(), timeout=TIMEOUT_S)
    assert len(proxied.image_filesystems) == len(before.image_filesystems) >= 1
    assert proxied.image_filesystems[0].fs_id.mountpoint
    for b, p, a in zip(
        before.image_filesystems, proxied.image_filesystems, after.image_filesystems, strict=True
    ):
        assert b.timestamp <= p.timestamp <= a.timestamp
        for field in ("fs_id", "used_bytes", "inodes_used"):
            assert getattr(p, field) == getattr(b, field) == getattr(a, field), field

    # The older API version is forwarded too (containerd 1.6 serves both; same messages).
    v1alpha2 = stack.proxied_channel.unary_unary("/runtime.v1alpha2.ImageService/ImageStatus")
    raw = v1alpha2(cri.ImageStatusRequest(image=spec(ref)).SerializeToString(), timeout=TIMEOUT_S)
    direct_status = stack.direct.ImageStatus(cri.ImageStatusRequest(image=spec(ref)))
    assert cri.ImageStatusResponse.FromString(raw) == direct_status

    # RemoveImage through the proxy removes it for containerd; removing again is a no-op.
    removed = stack.proxied.RemoveImage(cri.RemoveImageRequest(image=spec(ref)), timeout=TIMEOUT_S)
    assert removed == cri.RemoveImageResponse()
    status = stack.direct.ImageStatus(cri.ImageStatusRequest(image=spec(ref)), timeout=TIMEOUT_S)
    assert not status.HasField("image")
    direct, proxied = both(stack, "RemoveImage", cri.RemoveImageRequest(image=spec(ref)))
    assert direct == proxied == cri.RemoveImageResponse()

    # A pull without credentials captures nothing.
    assert stack.credentials.entries() == []
    assert not credentials_path(stack.root).exists()
    assert "credentials captured" not in caplog.text


def test_errors_pass_through_with_code_and_details(
    stack: Stack, pushed_images: PushedImages
) -> None:
    # containerd 1.6 answers ImageStatus of a malformed name with "no image", not an error;
    # pulling it is an error (UNKNOWN, "invalid reference format").
    name = "Not//A Valid:Name"
    direct, proxied = both(stack, "ImageStatus", cri.ImageStatusRequest(image=spec(name)))
    assert not direct.HasField("image") and proxied == direct
    direct_err, proxied_err = both_fail(stack, "PullImage", cri.PullImageRequest(image=spec(name)))
    assert "invalid reference format" in (direct_err.details() or "")
    assert (proxied_err.code(), proxied_err.details()) == (direct_err.code(), direct_err.details())

    missing = cri.PullImageRequest(image=spec(pushed_images.host + "/sociable-test/missing:v1"))
    direct, proxied = both_fail(stack, "PullImage", missing)
    assert "not found" in (direct.details() or "")
    assert (proxied.code(), proxied.details()) == (direct.code(), direct.details())

    # A method containerd's image service does not have is UNIMPLEMENTED at the proxy too.
    unknown = stack.proxied_channel.unary_unary("/runtime.v1.RuntimeService/Version")
    with pytest.raises(grpc.RpcError) as info:
        unknown(b"", timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


class Upstream:
    """A stand-in for containerd's CRI socket that records what each call arrived with and
    answers PullImage only once it is cancelled (or after 30 s)."""

    def __init__(self, path: Path) -> None:
        self.remaining: list[float | None] = []
        self.metadata: list[dict[str, str]] = []
        self.cancelled = threading.Event()
        upstream = self

        def status(request: bytes, context: grpc.ServicerContext) -> bytes:
            upstream.remaining.append(context.time_remaining())
            upstream.metadata.append({k: v for k, v in context.invocation_metadata()})
            req = cri.ImageStatusRequest.FromString(request)
            if req.image.image == "fail":
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "upstream says no")
            return cri.ImageStatusResponse(info={"seen": req.image.image}).SerializeToString()

        def pull(request: bytes, context: grpc.ServicerContext) -> bytes:
            context.add_callback(upstream.cancelled.set)
            upstream.cancelled.wait(30)
            return cri.PullImageResponse(image_ref="sha256:late").SerializeToString()

        self.server = grpc.server(ThreadPoolExecutor(max_workers=4))
        self.server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    "runtime.v1.ImageService",
                    {
                        "ImageStatus": grpc.unary_unary_rpc_method_handler(status),
                        "PullImage": grpc.unary_unary_rpc_method_handler(pull),
                    },
                )
            ]
        )
        self.server.add_insecure_port(f"unix:{path}")
        self.server.start()


def test_deadline_metadata_and_cancellation_are_forwarded(tmp_path: Path) -> None:
    upstream = Upstream(tmp_path / "upstream.sock")
    proxy = CriProxy(tmp_path / "cri.sock", tmp_path / "upstream.sock", None, threads=4)
    proxy.open()
    channel = grpc.insecure_channel(f"unix://{proxy.address}")
    try:
        assert stat.S_IMODE(proxy.address.stat().st_mode) == 0o660
        stub = cri_images_pb2_grpc.ImageServiceStub(channel)
        req = cri.ImageStatusRequest(image=spec("x"))
        answer = stub.ImageStatus(req, timeout=7.0, metadata=[("x-trace", "abc")])
        assert dict(answer.info) == {"seen": "x"}
        remaining = upstream.remaining[-1]
        assert remaining is not None and 5.0 < remaining <= 7.1  # (gRPC rounds deadlines)
        assert upstream.metadata[-1]["x-trace"] == "abc"
        # No deadline: none upstream either (grpcio reports about 2**63 seconds left).
        stub.ImageStatus(req)
        assert upstream.remaining[-1] is not None and upstream.remaining[-1] > NO_DEADLINE_SEC

        with pytest.raises(grpc.RpcError) as info:
            stub.ImageStatus(cri.ImageStatusRequest(image=spec("fail")), timeout=5)
        assert (info.value.code(), info.value.details()) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "upstream says no",
        )

        future = stub.PullImage.future(cri.PullImageRequest(image=spec("busybox")), timeout=30)
        time.sleep(0.3)
        assert not upstream.cancelled.is_set()
        future.cancel()
        assert upstream.cancelled.wait(5), "cancelling at the proxy did not cancel upstream"
    finally:
        channel.close()
        proxy.stop(0)
        upstream.server.stop(0)
    assert not proxy.address.exists()


def push_with_credentials(image: images.Image, registry: RegistryServer, repo: str) -> str:
    ref = f"{registry.host}/{repo}:{image.tag}"
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--quiet",
            "--all",
            "--preserve-digests",
            "--dest-tls-verify=false",
            "--dest-creds",
            registry.user,
            f"oci:{image.layout}:{image.tag}",
            f"docker://{ref}",
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return ref


@pytest.fixture(scope="module")
def private_ref(
    auth_registry: RegistryServer,
    pushed_images: PushedImages,
    tmp_path_factory: pytest.TempPathFactory,
) -> str:
    return push_with_credentials(
        pushed_images.busybox, auth_registry, "sociable-test/private-busybox"
    )


def test_pull_with_auth_captures_credentials(
    stack: Stack,
    auth_registry: RegistryServer,
    private_ref: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    assert auth_registry.username and auth_registry.password
    password = auth_registry.password

    # Without credentials the token-auth registry refuses, both ways alike.
    direct_err, proxied_err = both_fail(
        stack, "PullImage", cri.PullImageRequest(image=spec(private_ref))
    )
    assert (proxied_err.code(), proxied_err.details()) == (direct_err.code(), direct_err.details())
    assert stack.credentials.entries() == []

    # containerd 1.6 parses server_address as a URL: a bare "host:port" is refused.
    server = f"http://{auth_registry.host}"
    auth = cri.AuthConfig(username=auth_registry.username, password=password, server_address=server)
    resp = stack.proxied.PullImage(
        cri.PullImageRequest(image=spec(private_ref), auth=auth), timeout=TIMEOUT_S
    )
    assert resp.image_ref.startswith("sha256:")
    status = stack.direct.ImageStatus(cri.ImageStatusRequest(image=spec(private_ref)))
    assert status.image.id == resp.image_ref

    path = credentials_path(stack.root)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    text = path.read_text()
    assert password in text and auth_registry.username in text
    cred = stack.credentials.get(auth_registry.host, "sociable-test/private-busybox")
    assert cred is not None
    assert cred.basic() == (auth_registry.username, password)
    assert cred.server_address == server
    # Loaded again by a restarted daemon.
    again = CapturedCredentials(path).get(auth_registry.host, "sociable-test/private-busybox")
    assert again == cred

    assert "credentials captured" in caplog.text
    assert password not in caplog.text
    for record in caplog.records:
        assert password not in repr(record.__dict__)


def test_daemon_serves_the_proxy_when_enabled(
    pushed_images: PushedImages,
    auth_registry: RegistryServer,
    private_ref: str,
    tmp_path: Path,
) -> None:
    """`[cri] enable` makes the daemon serve the proxy (socket 0660), capture a pull's
    credentials under its root, log none of them, and remove the socket when it stops."""
    with start_containerd(
        tmp_path / "containerd",
        proxy_address=None,
        cri_snapshotter="overlayfs",
        registry_hosts=[auth_registry.host],
        sandbox_image=pushed_images.pause_ref,
    ) as ctd:
        cri_sock = tmp_path / "run" / "cri.sock"
        config = tmp_path / "config.toml"
        config.write_text(
            f'[cri]\nenable = true\naddress = "{cri_sock}"\ncontainerd_address = "{ctd.address}"\n'
        )
        with run_daemon(tmp_path / "sociable", config=config) as daemon:
            assert stat.S_IMODE(cri_sock.stat().st_mode) == 0o660
            with grpc.insecure_channel(f"unix://{cri_sock}") as channel:
                stub = cri_images_pb2_grpc.ImageServiceStub(channel)
                assert auth_registry.username and auth_registry.password
                auth = cri.AuthConfig(
                    username=auth_registry.username, password=auth_registry.password
                )
                pulled = stub.PullImage(
                    cri.PullImageRequest(image=spec(private_ref), auth=auth), timeout=TIMEOUT_S
                )
                listed = stub.ListImages(cri.ListImagesRequest(), timeout=TIMEOUT_S)
            direct = ctd.cri().list_images()
            assert pulled.image_ref in [i.id for i in listed.images]
            assert sorted(i.id for i in listed.images) == sorted(i.id for i in direct)
            path = credentials_path(daemon.root)
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            assert auth_registry.password in path.read_text()
        assert daemon.log.read_text().count("credentials captured") == 1
        assert auth_registry.password not in daemon.log.read_text()
        assert not cri_sock.exists()
