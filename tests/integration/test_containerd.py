"""sociable-snapshotter under a real containerd.

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

import pytest

from tests.support import images
from tests.support.containerd import PROXY_NAME, Containerd, PushedImages, SociableStack
from tests.support.snapclient import SnapInfo

pytestmark = pytest.mark.root


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


def _check_layers_in_backend(
    stack: SociableStack, image: images.Image, namespace: str
) -> list[SnapInfo]:
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
        assert info.kind == "committed", f"layer {chain_id} is not committed: {info}"
        assert info.parent == parent_name, f"layer {chain_id}: parent {info.parent!r}"
        parent_name = info.name
        found.append(info)
    return found


def _ctr_snapshot_labels(ctd: Containerd, key: str, namespace: str) -> dict[str, str]:
    out = ctd.ctr("snapshots", "--snapshotter", PROXY_NAME, "info", key, namespace=namespace).stdout
    labels = json.loads(out).get("Labels") or {}
    return {str(k): str(v) for k, v in labels.items()}


def test_ctr_pull_and_run_through_sociable(
    sociable_stack: SociableStack, pushed_images: PushedImages
) -> None:
    stack, pushed = sociable_stack, pushed_images
    ctd = stack.containerd
    ctd.pull(pushed.busybox_ref)
    listed = ctd.ctr("snapshots", "--snapshotter", PROXY_NAME, "ls").stdout
    for chain_id in pushed.busybox.chain_ids:
        assert chain_id in listed, f"containerd does not list {chain_id}:\n{listed}"
    _check_layers_in_backend(stack, pushed.busybox, "default")

    out = ctd.run(pushed.busybox_ref, "inspect-1", "sh", "-c", INSPECT).splitlines()
    assert out == EXPECTED
    # The container's own snapshot was an active one on top of the image's chain.
    assert ctd.run(pushed.busybox_ref, "cmd-1").strip() == "hello from layer 3"


def test_cri_pull_labels_and_k8s_run(
    sociable_stack: SociableStack, pushed_images: PushedImages
) -> None:
    stack, pushed = sociable_stack, pushed_images
    cri = stack.containerd.cri()
    image_ref = cri.pull_image(pushed.busybox_ref)
    assert image_ref == pushed.busybox.config_digest
    status = cri.image_status(pushed.busybox_ref)
    assert status is not None and pushed.busybox_ref in status.repo_tags
    # The sandbox image is reachable offline from the same registry.
    assert cri.pull_image(pushed.pause_ref).startswith("sha256:")

    _check_layers_in_backend(stack, pushed.busybox, "k8s.io")
    # CRI put its snapshot labels on the layers (disable_snapshot_annotations = false).
    for chain_id, layer in zip(pushed.busybox.chain_ids, pushed.busybox.layers, strict=True):
        labels = _ctr_snapshot_labels(stack.containerd, chain_id, "k8s.io")
        assert labels.get("containerd.io/snapshot/cri.image-ref") == pushed.busybox_ref
        assert labels.get("containerd.io/snapshot/cri.layer-digest") == layer.digest
        assert labels.get("containerd.io/snapshot/cri.manifest-digest") == (
            pushed.busybox.manifest_digest
        )
        assert layer.digest in labels.get("containerd.io/snapshot/cri.image-layers", "")

    out = stack.containerd.run(pushed.busybox_ref, "k8s-cmd", namespace="k8s.io")
    assert out.strip() == "hello from layer 3"


def test_image_removal_and_gc_remove_and_cleanup_everything(
    sociable_stack: SociableStack, pushed_images: PushedImages
) -> None:
    stack, pushed = sociable_stack, pushed_images
    ctd = stack.containerd
    ctd.pull(pushed.busybox_ref)
    assert ctd.run(pushed.busybox_ref, "gc-1", "cat", "/etc/motd").strip() == "sociable test image"
    cri = ctd.cri()
    cri.pull_image(pushed.busybox_ref)
    assert len(stack.backend.list()) >= 2 * len(pushed.busybox.layers)
    assert any(stack.snapshots_dir().iterdir())

    ctd.ctr("images", "rm", "--sync", pushed.busybox_ref)
    cri.remove_image(pushed.busybox_ref)
    assert cri.image_status(pushed.busybox_ref) is None
    ctd.gc("k8s.io")
    stack.wait_backend_empty()
    # containerd's view agrees.
    assert ctd.ctr("snapshots", "--snapshotter", PROXY_NAME, "ls").stdout.count("\n") <= 1
