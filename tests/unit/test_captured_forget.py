"""Captured credentials are forgotten when the last lazy layer of their repository is unmounted."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

import pytest

from index.oci.reference import Reference
from snapshotter.credentials.captured import CapturedCredentials
from snapshotter.remote.compose import _forget_captured
from snapshotter.remote.layers import LazyLayers, _Layer, released_repository
from snapshotter.remote.records import LayerRecord, RecordStore

DIGEST = "sha256:" + "1" * 64
OTHER_DIGEST = "sha256:" + "2" * 64


def record(image: str, layer: str = DIGEST) -> LayerRecord:
    return LayerRecord(
        image_ref=image,
        manifest_digest="sha256:" + "3" * 64,
        layer_digest=layer,
        index_digest="sha256:" + "4" * 64,
        ztoc_digest="sha256:" + "5" * 64,
    )


def test_released_repository_only_when_no_other_layer_of_the_repository() -> None:
    gone = record("reg.example.com/team/app:v1")
    ref = released_repository(gone, [])
    assert ref is not None and (ref.registry, ref.repository) == ("reg.example.com", "team/app")
    # Another tag or digest of the same repository still mounted: nothing released.
    assert released_repository(gone, [record("reg.example.com/team/app:v2")]) is None
    assert released_repository(gone, [record("reg.example.com/team/app@" + DIGEST)]) is None
    # Other repositories, or the same repository at another registry, do not count.
    assert released_repository(gone, [record("reg.example.com/team/other:v1")]) is not None
    assert released_repository(gone, [record("mirror.example.com/team/app:v1")]) is not None
    # Docker Hub references are normalised before comparing.
    hub = released_repository(record("busybox:1.36"), [record("docker.io/library/busybox:1")])
    assert hub is None
    assert released_repository(record("not a reference"), []) is None


class _Scope:
    def __init__(self) -> None:
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True


class _Fuse:
    def __init__(self) -> None:
        self.removed: list[str] = []

    def remove_layer(self, name: str) -> None:
        self.removed.append(name)

    async def finish_pushes(self) -> None:
        pass


class _Background:
    def unregister(self, name: str) -> None:
        pass


class _Cache:
    def release_layer(self, digest: object) -> None:
        pass


def lazy_layers(tmp_path: Path, calls: list[Reference], fail: bool = False) -> LazyLayers:
    async def on_last_layer(ref: Reference) -> None:
        calls.append(ref)
        if fail:
            raise RuntimeError("callback broke")

    return LazyLayers(
        fuse=cast(Any, _Fuse()),
        tasks=cast(Any, None),
        trees=cast(Any, None),
        sources=cast(Any, None),
        records=RecordStore(tmp_path / "records"),
        cache=cast(Any, _Cache()),
        background=cast(Any, _Background()),
        tracker=cast(Any, None),
        on_last_layer=on_last_layer,
    )


def add(layers: LazyLayers, tmp_path: Path, snap: int, image: str, layer: str = DIGEST) -> Path:
    """A layer as `mount` leaves it (minus FUSE and the bind mount, which unmount tolerates)."""
    mountpoint = tmp_path / "snapshots" / str(snap) / "fs"
    mountpoint.mkdir(parents=True)
    name = f"snap-{snap}"
    rec = record(image, layer)
    layers.records.write(name, rec)
    layers._layers[name] = _Layer(name, mountpoint, rec, cast(Any, None), cast(Any, _Scope()))
    return mountpoint


async def test_unmount_calls_back_after_the_last_layer_of_the_repository(tmp_path: Path) -> None:
    calls: list[Reference] = []
    layers = lazy_layers(tmp_path, calls)
    a1 = add(layers, tmp_path, 1, "reg.example.com/team/app:v1")
    a2 = add(layers, tmp_path, 2, "reg.example.com/team/app:v2", OTHER_DIGEST)
    b = add(layers, tmp_path, 3, "reg.example.com/team/other:v1")

    await layers.unmount(a1)
    assert calls == []  # app:v2 is still mounted
    assert len(layers) == 2
    await layers.unmount(b)
    assert [(r.registry, r.repository) for r in calls] == [("reg.example.com", "team/other")]
    await layers.unmount(a2)
    assert [(r.registry, r.repository) for r in calls[1:]] == [("reg.example.com", "team/app")]
    assert len(layers) == 0
    # Unmounting what is not (or no longer) a lazy layer calls nothing.
    await layers.unmount(a2)
    await layers.unmount(tmp_path / "not-a-snapshot")
    assert len(calls) == 2


async def test_close_forgets_nothing_and_a_failing_callback_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[Reference] = []
    layers = lazy_layers(tmp_path, calls, fail=True)
    add(layers, tmp_path, 1, "reg.example.com/team/app:v1")
    mountpoint = add(layers, tmp_path, 2, "reg.example.com/team/other:v1")
    await layers.close()  # shutdown: the layers are restored at the next start
    assert calls == []

    layers = lazy_layers(tmp_path / "again", calls, fail=True)
    mountpoint = add(layers, tmp_path / "again", 2, "reg.example.com/team/other:v1")
    with caplog.at_level(logging.WARNING, logger="snapshotter.remote.layers"):
        await layers.unmount(mountpoint)  # never raises
    assert len(calls) == 1
    failed = [r for r in caplog.records if r.getMessage() == "last layer callback failed"]
    assert failed and "callback broke" in failed[0].__dict__["error"]


async def test_forget_callback_drops_the_captured_entry_for_good(tmp_path: Path) -> None:
    path = tmp_path / "credentials" / "cri.json"
    proxy = CapturedCredentials(path)  # the CRI proxy's instance
    keychain = CapturedCredentials(path)  # the lazy layers' (and keychain's) instance
    proxy.capture("reg.example.com/team/app:v1", username="u", password="p")
    proxy.capture("reg.example.com/team/other:v1", username="u2", password="p2")

    forget = _forget_captured(keychain)
    await forget(Reference.parse("reg.example.com/team/app:v1"))
    assert keychain.get("reg.example.com", "team/app") is None
    assert proxy.get("reg.example.com", "team/app") is None
    assert CapturedCredentials(path).get("reg.example.com", "team/app") is None
    assert keychain.get("reg.example.com", "team/other") is not None
    # A later capture by the proxy's instance does not bring the forgotten entry back.
    proxy.capture("reg.example.com/team/third:v1", username="u3", password="p3")
    reopened = CapturedCredentials(path)
    assert reopened.get("reg.example.com", "team/app") is None
    assert reopened.get("reg.example.com", "team/third") is not None
    # Forgetting what is not there is harmless.
    await forget(Reference.parse("reg.example.com/team/app:v1"))
    assert CapturedCredentials(path).get("reg.example.com", "team/other") is not None


def test_forget_keeps_what_another_instance_captured_since(tmp_path: Path) -> None:
    path = tmp_path / "cri.json"
    proxy = CapturedCredentials(path)
    keychain = CapturedCredentials(path)
    proxy.capture("reg.example.com/team/app:v1", username="u", password="p")
    proxy.capture("reg.example.com/team/new:v1", username="n", password="q")
    # keychain never read the file since opening (it was absent): its write must not drop `new`.
    assert keychain.forget("reg.example.com", "team/app") is True
    reopened = CapturedCredentials(path)
    assert reopened.get("reg.example.com", "team/app") is None
    assert reopened.get("reg.example.com", "team/new") is not None
    assert keychain.forget("reg.example.com", "team/app") is False


async def test_forget_callback_logs_a_failed_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    store = CapturedCredentials(tmp_path / "dir" / "cri.json")
    store.capture("reg.example.com/team/app:v1", username="u", password="p")
    (tmp_path / "dir" / "cri.json").unlink()
    (tmp_path / "dir").rmdir()
    (tmp_path / "dir").symlink_to(blocker)  # the directory is now a file: the write fails
    with caplog.at_level(logging.WARNING, logger="snapshotter.remote.compose"):
        await _forget_captured(store)(Reference.parse("reg.example.com/team/app:v1"))
    lines = [r for r in caplog.records if r.getMessage() == "cannot forget credentials"]
    assert lines and lines[0].__dict__["repository"] == "team/app"
