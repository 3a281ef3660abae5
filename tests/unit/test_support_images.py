"""The deterministic image builder of tests/support/images.py and the containerd config it
feeds: same specs give the same digests, every tar feature lands in the layer as specified."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import time
import tomllib
from pathlib import Path

import pytest

from tests.support import images
from tests.support.containerd import ContainerdPaths, hosts_toml, render_config


def _members(layer: images.Layer) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(layer.path, "r:gz") as tf:
        return {m.name: m for m in tf.getmembers()}


def test_same_specs_give_same_digests(tmp_path: Path) -> None:
    a = images.write_oci_layout(tmp_path / "a", [images.FEATURES_LAYER, images.WHITEOUT_LAYER])
    b = images.write_oci_layout(tmp_path / "b", [images.FEATURES_LAYER, images.WHITEOUT_LAYER])
    assert a.manifest_digest == b.manifest_digest
    assert [x.digest for x in a.layers] == [x.digest for x in b.layers]
    raw = a.layers[0].path.read_bytes()
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == a.layers[0].digest
    assert len(raw) == a.layers[0].size
    # gzip header: no file name flag, mtime 0
    assert raw[:4] == b"\x1f\x8b\x08\x00" and raw[4:8] == b"\0\0\0\0"
    diff = "sha256:" + hashlib.sha256(gzip.decompress(raw)).hexdigest()
    assert diff == a.layers[0].diff_id


def test_changed_content_changes_digest(tmp_path: Path) -> None:
    a = images.write_layer([images.File(path="f", data=b"1")], tmp_path)
    b = images.write_layer([images.File(path="f", data=b"2")], tmp_path)
    assert a.digest != b.digest


def test_every_entry_kind_is_written_as_specified(tmp_path: Path) -> None:
    layer = images.write_layer(images.FEATURES_LAYER + images.WHITEOUT_LAYER, tmp_path)
    m = _members(layer)
    assert m["data/hello-link.txt"].islnk() and m["data/hello-link.txt"].linkname == (
        "data/hello.txt"
    )
    assert m["data/hello-sym"].issym() and m["data/hello-sym"].linkname == "hello.txt"
    assert m["data/fifo"].isfifo()
    assert m["data/null-dev"].ischr() and (
        m["data/null-dev"].devmajor,
        m["data/null-dev"].devminor,
    ) == (1, 3)
    assert m["data/blk-dev"].isblk()
    assert m["data/big.bin"].size == 3 * 1024 * 1024 + 17
    assert m["data/empty"].size == 0
    assert m["data/xattr.txt"].pax_headers["SCHILY.xattr.user.sociable.test"] == "value-1"
    owned = m["data/owned.txt"]
    assert (owned.uid, owned.gid, owned.mode) == (1234, 5678, 0o640)
    assert any(len(name) > 255 for name in m)  # PAX long names
    assert "data/.wh.doomed.txt" in m
    assert "data/opaque/.wh..wh..opq" in m
    assert {t.mtime for t in m.values()} == {images.FIXED_MTIME}


def test_large_file_padding_is_deterministic(tmp_path: Path) -> None:
    spec = [images.File(path="big", data=b"head", size=200_000)]
    a = images.write_layer(spec, tmp_path / "a")
    b = images.write_layer(spec, tmp_path / "b")
    assert a.digest == b.digest
    with tarfile.open(a.path, "r:gz") as tf:
        f = tf.extractfile("big")
        assert f is not None
        data = f.read()
    assert len(data) == 200_000 and data.startswith(b"head")


def test_tree_source_copies_a_directory(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.txt").write_text("A")
    (src / "skip").mkdir()
    (src / "link").symlink_to("sub/a.txt")
    layer = images.write_layer(
        [images.TreeSource(src=src, dest="opt/app", exclude=frozenset({"skip"}))],
        tmp_path / "blobs",
    )
    m = _members(layer)
    assert {"opt", "opt/app", "opt/app/sub", "opt/app/sub/a.txt", "opt/app/link"} <= set(m)
    assert "opt/app/skip" not in m
    assert m["opt/app/link"].linkname == "sub/a.txt"


def test_bad_paths_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(images.ImageBuildError, match=r"\.\."):
        images.write_layer([images.File(path="../escape")], tmp_path)
    assert not list(tmp_path.glob(".layer-*")), "a failed build left a temp file"


def test_oci_layout_has_ref_name_config_and_chain_ids(tmp_path: Path) -> None:
    img = images.busybox_image(tmp_path / "img", tag="v9")
    index = json.loads((img.layout / "index.json").read_text())
    desc = index["manifests"][0]
    assert desc["annotations"][images.REF_NAME_ANNOTATION] == "v9"
    blobs = img.layout / "blobs" / "sha256"
    config = json.loads((blobs / img.config_digest.split(":")[1]).read_text())
    assert config["config"]["Cmd"] == list(images.BUSYBOX_CMD)
    assert config["rootfs"]["diff_ids"] == [x.diff_id for x in img.layers]
    assert len(img.chain_ids) == 3 and img.chain_ids[0] == img.layers[0].diff_id
    expected = hashlib.sha256(f"{img.chain_ids[0]} {img.layers[1].diff_id}".encode()).hexdigest()
    assert img.chain_ids[1] == "sha256:" + expected
    again = images._image_from_layout(img.layout, "v9")
    assert again == img
    names = _members(img.layers[0])
    assert names["bin/sh"].issym() and names["bin/busybox"].size > 100_000


def test_containerd_config_wires_proxy_cri_and_registry(tmp_path: Path) -> None:
    paths = ContainerdPaths(tmp_path)
    text = render_config(
        paths,
        proxy_name="sociable",
        proxy_address=tmp_path / "s.sock",
        cri_snapshotter="sociable",
        sandbox_image="127.0.0.1:5000/pause:1",
    )
    cfg = tomllib.load(io.BytesIO(text.encode()))
    assert cfg["version"] == 2
    assert cfg["proxy_plugins"]["sociable"] == {
        "type": "snapshot",
        "address": str(tmp_path / "s.sock"),
    }
    cri = cfg["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["containerd"]["snapshotter"] == "sociable"
    assert cri["containerd"]["disable_snapshot_annotations"] is False
    assert cri["registry"]["config_path"] == str(paths.certs_d)
    assert cri["sandbox_image"] == "127.0.0.1:5000/pause:1"
    assert cfg["grpc"]["address"] == str(paths.address)
    assert cfg["root"].startswith(str(tmp_path)) and cfg["state"].startswith(str(tmp_path))
    hosts = tomllib.loads(hosts_toml("127.0.0.1:5000"))
    assert hosts["host"]["http://127.0.0.1:5000"]["capabilities"] == ["pull", "resolve", "push"]


@pytest.mark.slow
def test_bulk_image_is_over_100_mb_and_cached() -> None:
    img = images.bulk_image()
    assert len(img.layers) == 4
    with tarfile.open(img.layers[3].path, "r:gz") as tf:
        members = tf.getmembers()
    assert sum(m.size for m in members) > 100 * 1024 * 1024
    assert any(m.name.startswith("usr/lib/python3.11/") for m in members)
    t0 = time.monotonic()
    again = images.bulk_image()
    assert again == img
    assert time.monotonic() - t0 < 5, "the cached bulk image was rebuilt"
