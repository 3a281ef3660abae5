"""sociable-snapshotter under a real containerd (issue 3).

Each test starts the daemon and a private Debian containerd 1.6 whose
``[proxy_plugins.sociable]`` points at it, with images from a local registry:

- ``ctr images pull --snapshotter sociable`` unpacks a three-layer image (whiteouts, opaque
  dirs, hard links, devices, xattrs...) into the daemon, and ``ctr run`` shows the merged tree;
- the CRI plugin (``snapshotter = "sociable"``, annotations on) pulls the same image, the
  layer snapshots carry the CRI labels, and ``ctr -n k8s.io run`` runs the image's ``Cmd``;
- removing the image makes containerd's GC call Remove and Cleanup on the daemon, which ends
  with no snapshot and an empty ``<root>/snapshots``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.support import images
from tests.support.containerd import (
    Containerd,
    SnapshotsClient,
    SociableDaemon,
    capabilities,
    start_containerd,
    start_sociable,
)

pytestmark = pytest.mark.root

PROXY = "sociable"


@dataclass(frozen=True)
class Pushed:
    host: str
    ref: str
    image: images.Image
    sandbox_ref: str


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pushed]:
    caps = capabilities()
    print(caps.describe())
    missing = caps.missing_for_containerd()
    if missing:
        pytest.skip(f"SKIPPED LOUDLY: containerd integration needs {', '.join(missing)}")
    base = tmp_path_factory.mktemp("registry")
    with images.local_registry(base / "registry") as host:
        image = images.busybox_image(base / "busybox")
        ref = images.push(image, host, "sociable/busybox", "v1")
        pause = images.pause_image(base / "pause")
        sandbox_ref = images.push(pause, host, "sociable/pause", "v1")
        yield Pushed(host=host, ref=ref, image=image, sandbox_ref=sandbox_ref)


@dataclass
class Stack:
    daemon: SociableDaemon
    containerd: Containerd
    backend: SnapshotsClient
    """Talks to the daemon directly (backend names, not containerd's)."""

    def snapshots_dir(self) -> Path:
        return self.daemon.root / "snapshots"

    def wait_backend_empty(self, timeout_s: float = 30.0) -> None:
        """Waits until the daemon lists no snapshot and ``<root>/snapshots`` is empty
        (containerd's GC runs Remove then Cleanup asynchronously)."""
        deadline = time.monotonic() + timeout_s
        while True:
            names = [i.name for i in self.backend.list()]
            left = sorted(p.name for p in self.snapshots_dir().iterdir())
            if not names and not left:
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"after image removal and GC: snapshots {names}, dirs {left} remain\n"
                    f"--- containerd log ---\n{self.containerd.log_tail()}\n"
                    f"--- daemon log ---\n{self.daemon.log_tail()}"
                )
            time.sleep(0.2)


@pytest.fixture
def stack(pushed: Pushed, tmp_path: Path) -> Iterator[Stack]:
    with (
        start_sociable(tmp_path / "sociable") as daemon,
        start_containerd(
            tmp_path / "containerd",
            proxy_address=daemon.address,
            proxy_name=PROXY,
            cri_snapshotter=PROXY,
            registry_hosts=[pushed.host],
            sandbox_image=pushed.sandbox_ref,
        ) as ctd,
    ):
        channel = grpc.insecure_channel(f"unix://{daemon.address}")
        try:
            yield Stack(daemon, ctd, SnapshotsClient(channel, PROXY))
        finally:
            channel.close()


# What the standard image must look like from inside a container (layer 3 over 2 over 1).
INSPECT = (
    "cat /data/hello.txt; "
    "test -e /data/doomed.txt && echo doomed-present || echo doomed-gone; "
    "ls /data/opaque; "
    "cat /data/hello-sym; "
    "cat /data/hello-link.txt; "
    "stat -c '%i' /data/hello-link.txt /data/hello.txt | uniq | wc -l; "
    "stat -c '%u:%g %a' /data/owned.txt; "
    "stat -c '%F' /data/fifo /data/null-dev /data/blk-dev; "
    "stat -c '%t,%T' /data/null-dev; "
    "readlink /data/dangling; "
    "stat -c '%s' /data/big.bin /data/empty; "
    "/data/exec.sh; "
    "ls /data/nnnnn*/ | wc -c; "
    "cat /etc/motd"
)
EXPECTED = [
    "hello from layer 3",
    "doomed-gone",
    "new.txt",
    "hello from layer 3",  # the symlink follows the replaced file
    "hello from layer 2",  # the hard link keeps layer 2's inode
    "2",
    "1234:5678 640",
    "fifo",
    "character special file",
    "block special file",
    "1,3",
    "/nonexistent/target",
    str(3 * 1024 * 1024 + 17),
    "0",
    "script-ran",
    str(len("long-name-" + "x" * 150) + 1),
    "sociable test image",
]


def _check_layers_in_backend(stack: Stack, image: images.Image, namespace: str) -> list[Any]:
    """Every layer of ``image`` is a COMMITTED snapshot in the daemon, named by containerd's
    metadata layer ``<namespace>/<seq>/<chain id>`` and parented like the layer chain; returns
    their Infos, bottom first. (containerd 1.6 passes no labels to a backend Commit, so the
    chain id is only in the name.)"""
    infos = stack.backend.list()
    found = []
    parent_name = ""
    for chain_id in image.chain_ids:
        matches = [
            i
            for i in infos
            if i.name.startswith(f"{namespace}/") and i.name.endswith(f"/{chain_id}")
        ]
        assert len(matches) == 1, f"backend snapshots for layer {chain_id}: {matches} in {infos}"
        info = matches[0]
        assert info.kind == 3, f"layer {chain_id} is not committed: {info}"
        assert info.parent == parent_name, f"layer {chain_id}: parent {info.parent!r}"
        parent_name = info.name
        found.append(info)
    return found


def _ctr_snapshot_labels(ctd: Containerd, key: str, namespace: str) -> dict[str, str]:
    out = ctd.ctr("snapshots", "--snapshotter", PROXY, "info", key, namespace=namespace).stdout
    labels = json.loads(out).get("Labels") or {}
    return {str(k): str(v) for k, v in labels.items()}


def test_ctr_pull_and_run_through_sociable(stack: Stack, pushed: Pushed) -> None:
    ctd = stack.containerd
    ctd.pull(pushed.ref)
    listed = ctd.ctr("snapshots", "--snapshotter", PROXY, "ls").stdout
    for chain_id in pushed.image.chain_ids:
        assert chain_id in listed, f"containerd does not list {chain_id}:\n{listed}"
    _check_layers_in_backend(stack, pushed.image, "default")

    out = ctd.run(pushed.ref, "inspect-1", "sh", "-c", INSPECT).splitlines()
    assert out == EXPECTED
    # The container's own snapshot was an active one on top of the image's chain.
    assert ctd.run(pushed.ref, "cmd-1").strip() == "hello from layer 3"


def test_cri_pull_labels_and_k8s_run(stack: Stack, pushed: Pushed) -> None:
    cri = stack.containerd.cri()
    image_ref = cri.pull_image(pushed.ref)
    assert image_ref == pushed.image.config_digest
    status = cri.image_status(pushed.ref)
    assert status is not None and pushed.ref in status.repo_tags
    # The sandbox image is reachable offline from the same registry.
    assert cri.pull_image(pushed.sandbox_ref).startswith("sha256:")

    _check_layers_in_backend(stack, pushed.image, "k8s.io")
    # CRI put its snapshot labels on the layers (disable_snapshot_annotations = false).
    for chain_id, layer in zip(pushed.image.chain_ids, pushed.image.layers, strict=True):
        labels = _ctr_snapshot_labels(stack.containerd, chain_id, "k8s.io")
        assert labels.get("containerd.io/snapshot/cri.image-ref") == pushed.ref
        assert labels.get("containerd.io/snapshot/cri.layer-digest") == layer.digest
        assert labels.get("containerd.io/snapshot/cri.manifest-digest") == (
            pushed.image.manifest_digest
        )
        assert layer.digest in labels.get("containerd.io/snapshot/cri.image-layers", "")

    out = stack.containerd.run(pushed.ref, "k8s-cmd", namespace="k8s.io")
    assert out.strip() == "hello from layer 3"


def test_image_removal_and_gc_remove_and_cleanup_everything(stack: Stack, pushed: Pushed) -> None:
    ctd = stack.containerd
    ctd.pull(pushed.ref)
    assert ctd.run(pushed.ref, "gc-1", "cat", "/etc/motd").strip() == "sociable test image"
    cri = ctd.cri()
    cri.pull_image(pushed.ref)
    assert len(stack.backend.list()) >= 2 * len(pushed.image.layers)
    assert any(stack.snapshots_dir().iterdir())

    ctd.ctr("images", "rm", "--sync", pushed.ref)
    cri.remove_image(pushed.ref)
    assert cri.image_status(pushed.ref) is None
    ctd.gc("k8s.io")
    stack.wait_backend_empty()
    # containerd's view agrees.
    assert ctd.ctr("snapshots", "--snapshotter", PROXY, "ls").stdout.count("\n") <= 1
