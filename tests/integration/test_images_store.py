"""`ImageStore` against a real containerd (Debian's 1.6) that pulled an image from a local
registry into namespace `k8s.io`, with `ctr images pull` and with CRI's PullImage.

The tests show: the target of the image named as pulled is the registry's manifest (its
digest, media type and size, as the registry answers the tag); CRI stores the image under
the name `image_name` builds for the mirror; an unknown name, or another namespace, is None;
the mirror resolves the tag end to end from this containerd (image store, content store,
the anonymous check at the real registry), and a second containerd whose CRI pull of the tag
asks that mirror first gets this containerd's image even after the tag moved at the registry
(the tag was resolved by the mirror, with the staleness docs/mirror.md describes); a stopped
(SIGSTOP) containerd costs one deadline, and an exited one is UNAVAILABLE at once, each one
line.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import trio

from index.digest import Digest
from index.oci.client import AsyncRegistryClient
from index.oci.reference import Reference
from snapshotter.mirror.access import PublicRepositories
from snapshotter.mirror.serve import MirrorError, MirrorService
from snapshotter.peers.content import ContentStore
from snapshotter.peers.images import ImageStore, ImageStoreError, image_name
from tests.support import images
from tests.support.containerd import Containerd, require_containerd, start_containerd, stopped
from tests.support.lazylayer import Layer
from tests.support.peers import open_listener
from tests.support.registry import RegistryServer

pytestmark = [pytest.mark.root]

REPO = "sociable-test/images-store"
NAMESPACE = "k8s.io"


@dataclass(frozen=True)
class Pushed:
    """The image pushed as REPO:v1 (pulled with ctr) and REPO:v2 (pulled through CRI), and
    what the registry answers for the tag."""

    image: images.Image
    registry: RegistryServer
    digest: Digest
    media_type: str
    size: int

    def ref(self, tag: str) -> str:
        return f"{self.registry.host}/{REPO}:{tag}"


@pytest.fixture(scope="module")
def pushed(registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> Pushed:
    require_containerd()
    layout = tmp_path_factory.mktemp("images-store-image")
    image = images.write_oci_layout(
        layout, [[images.File(path="data/hello.txt", data=b"hello images\n")]], cmd=("/x",)
    )
    for tag in ("v1", "v2"):
        images.push(image, registry.host, REPO, tag)
    answer = httpx.head(
        f"{registry.url}/v2/{REPO}/manifests/v1",
        headers={
            "Accept": ", ".join(
                [
                    "application/vnd.oci.image.index.v1+json",
                    "application/vnd.oci.image.manifest.v1+json",
                    "application/vnd.docker.distribution.manifest.v2+json",
                ]
            )
        },
    )
    assert answer.status_code == 200
    return Pushed(
        image=image,
        registry=registry,
        digest=Digest(answer.headers["docker-content-digest"]),
        media_type=answer.headers["content-type"],
        size=int(answer.headers["content-length"]),
    )


@contextlib.contextmanager
def pulled_containerd(pushed: Pushed, base: Path) -> Iterator[Containerd]:
    """A private containerd (no proxy snapshotter) that pulled REPO:v1 with `ctr` into k8s.io
    and REPO:v2 through CRI."""
    with start_containerd(
        base, proxy_address=None, cri_snapshotter="overlayfs", registry_hosts=[pushed.registry.host]
    ) as ctd:
        ctd.pull(pushed.ref("v1"), snapshotter="overlayfs", namespace=NAMESPACE)
        ctd.cri().pull_image(pushed.ref("v2"))
        yield ctd


@pytest.fixture(scope="module")
def ctd(pushed: Pushed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    with pulled_containerd(pushed, tmp_path_factory.mktemp("images-ctd")) as running:
        yield running


@contextlib.contextmanager
def open_store(ctd: Containerd, namespace: str = NAMESPACE, **kwargs: Any) -> Iterator[ImageStore]:
    store = ImageStore(str(ctd.address), namespace, **kwargs)
    try:
        yield store
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------


async def test_the_target_is_the_registrys_manifest(pushed: Pushed, ctd: Containerd) -> None:
    assert pushed.digest == pushed.image.manifest_digest  # skopeo kept the digest
    with open_store(ctd) as store:
        for tag in ("v1", "v2"):
            name = image_name(pushed.registry.host, REPO, tag)
            assert name == pushed.ref(tag)
            assert await store.target(name) == (pushed.digest, pushed.media_type, pushed.size)


async def test_cri_stores_the_image_under_that_name(pushed: Pushed, ctd: Containerd) -> None:
    status = ctd.cri().image_status(pushed.ref("v2"))
    assert status is not None
    assert pushed.ref("v2") in status.repo_tags
    names = ctd.ctr("images", "list", "--quiet", namespace=NAMESPACE).stdout.split()
    assert pushed.ref("v2") in names
    assert pushed.ref("v1") in names


async def test_unknown_names_and_other_namespaces_are_none(pushed: Pushed, ctd: Containerd) -> None:
    with open_store(ctd) as store:
        assert await store.target(pushed.ref("v3")) is None
        assert await store.target(f"{pushed.registry.host}/no/such:v1") is None
        assert await store.target("docker.io/library/busybox:1.36") is None
    with open_store(ctd, namespace="default") as store:  # images are per namespace
        assert await store.target(pushed.ref("v1")) is None


async def test_the_mirror_resolves_the_tag_from_containerd(pushed: Pushed, ctd: Containerd) -> None:
    """MirrorService over this containerd's image and content stores, the anonymous check at
    the real (anonymous) registry: the tag is the registry's manifest, byte for byte."""
    manifest = (pushed.image.layout / "blobs" / "sha256" / pushed.digest[7:]).read_bytes()
    anonymous = AsyncRegistryClient(credentials=None)
    content = ContentStore(str(ctd.address), namespace=NAMESPACE)
    try:
        with open_store(ctd) as store:
            mirror = MirrorService(
                content=content, peers=None, public=PublicRepositories(anonymous), images=store
            )
            ref = Reference(pushed.registry.host, REPO)
            data, media_type, digest = await mirror.manifest(ref, "v1")
            assert (data, media_type, digest) == (manifest, pushed.media_type, pushed.digest)
            with pytest.raises(MirrorError, match="no such image on this node") as e:
                await mirror.manifest(ref, "v3")
            assert e.value.status == 404
    finally:
        content.close()
        await anonymous.aclose()


def hosts_toml_with_mirror(registry_host: str, mirror: str) -> str:
    """containerd's hosts.toml for `registry_host` asking the mirror at `mirror` first, as
    `mirror configure` writes it (pull and resolve)."""
    return (
        f'server = "http://{registry_host}"\n\n'
        f'[host."http://{mirror}"]\n'
        '  capabilities = ["pull", "resolve"]\n\n'
        f'[host."http://{registry_host}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
    )


async def test_a_pull_through_the_mirror_gets_this_nodes_tag(
    registry: RegistryServer, tmp_path: Path
) -> None:
    """Node A pulled REPO:v1; the tag then moves at the registry. Node B's CRI pull of v1,
    with A's mirror first in its hosts.toml, gets A's image: the mirror resolved the tag.
    With `resolve_tags` off, B's pull of v1 gets the registry's image."""
    require_containerd()
    repo = "sociable-test/images-moved"
    old = images.write_oci_layout(
        tmp_path / "old", [[images.File(path="v.txt", data=b"old\n")]], cmd=("/x",)
    )
    new = images.write_oci_layout(
        tmp_path / "new", [[images.File(path="v.txt", data=b"new\n")]], cmd=("/x",)
    )
    ref = images.push(old, registry.host, repo, "v1")
    anonymous = AsyncRegistryClient(credentials=None)
    with (
        start_containerd(
            tmp_path / "a",
            proxy_address=None,
            cri_snapshotter="overlayfs",
            registry_hosts=[registry.host],
        ) as node_a,
        start_containerd(
            tmp_path / "b",
            proxy_address=None,
            cri_snapshotter="overlayfs",
            registry_hosts=[registry.host],
        ) as node_b,
        open_store(node_a) as store_a,
        open_store(node_b) as store_b,
    ):
        await trio.to_thread.run_sync(node_a.cri().pull_image, ref)
        images.push(new, registry.host, repo, "v1")  # the tag moves
        content_a = ContentStore(str(node_a.address), namespace=NAMESPACE)
        mirror = MirrorService(
            content=content_a, peers=None, public=PublicRepositories(anonymous), images=store_a
        )
        (tmp_path / "cache").mkdir()
        try:
            async with open_listener(
                Layer(files=1, size=1000), tmp_path / "cache", mirror=mirror
            ) as listener:
                hosts = node_b.paths.certs_d / registry.host / "hosts.toml"
                hosts.write_text(hosts_toml_with_mirror(registry.host, listener.address))
                await trio.to_thread.run_sync(node_b.cri().pull_image, ref)
                got = await store_b.target(ref)
                assert got is not None
                assert got[0] == old.manifest_digest != new.manifest_digest
                assert mirror.stats.manifests >= 1  # the tag, and the manifest by digest
                assert mirror.stats.from_content > 0  # the config and layer came from node A
                # the control: with tags left to the registry, the same pull gets its image
                mirror.resolve_tags = False
                await trio.to_thread.run_sync(node_b.cri().remove_image, ref)
                await trio.to_thread.run_sync(node_b.cri().pull_image, ref)
                got = await store_b.target(ref)
                assert got is not None
                assert got[0] == new.manifest_digest
        finally:
            content_a.close()
            await anonymous.aclose()


async def test_a_stopped_or_exited_containerd_is_one_line(pushed: Pushed, tmp_path: Path) -> None:
    limiter = trio.CapacityLimiter(1)
    with (
        pulled_containerd(pushed, tmp_path / "ctd") as ctd,
        open_store(ctd, timeout_sec=1.0, limiter=limiter) as store,
    ):
        name = pushed.ref("v1")
        assert await store.target(name) == (pushed.digest, pushed.media_type, pushed.size)
        with stopped(ctd):
            start = time.monotonic()
            with pytest.raises(ImageStoreError, match="DEADLINE_EXCEEDED") as e:
                await store.target(name)
            assert e.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - start < 5
            # a caller that gives up sooner frees the thread at once (the call is cancelled)
            with trio.move_on_after(0.2) as scope:
                await store.target(name)
            assert scope.cancelled_caught
            with trio.fail_after(2):
                while limiter.statistics().borrowed_tokens:
                    await trio.sleep(0.02)
        assert await store.target(name) == (pushed.digest, pushed.media_type, pushed.size)
        ctd.stop()
        start = time.monotonic()
        with pytest.raises(ImageStoreError, match=f"image {name} .*: UNAVAILABLE") as e:
            await store.target(name)
        assert e.value.code is grpc.StatusCode.UNAVAILABLE
        assert "\n" not in str(e.value)
        assert time.monotonic() - start < 5
