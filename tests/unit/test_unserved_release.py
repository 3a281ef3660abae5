"""Cached spans of a lazy layer whose snapshot was removed before a restart that did not put
the layer back: `LazyLayers.unmount` (the service's Cleanup) releases them through the
layer's restore record, unless a mounted layer or another record is of the same blob.

A real `SpanCache` and `RecordStore` on disk; the FUSE host, task scopes and background
fetcher are fakes (nothing is mounted).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

import pytest

from index.digest import Digest
from index.model import SpanId
from snapshotter.lazy.cache import RELEASED_MARK, SpanCache
from snapshotter.remote.layers import LazyLayers, _Layer
from snapshotter.remote.records import LayerRecord, RecordStore

BLOB_A = Digest("sha256:" + "a" * 64)
BLOB_B = Digest("sha256:" + "b" * 64)


class _Scope:
    async def aclose(self) -> None:
        pass


class _Fuse:
    def remove_layer(self, name: str) -> None:
        pass


class _Background:
    def unregister(self, name: str) -> None:
        pass


def record(blob: Digest) -> LayerRecord:
    return LayerRecord(
        image_ref="reg.example.com/team/app:v1",
        manifest_digest="sha256:" + "3" * 64,
        layer_digest=str(blob),
        index_digest="sha256:" + "4" * 64,
        ztoc_digest="sha256:" + "5" * 64,
    )


def layers_with_cache(tmp_path: Path) -> tuple[LazyLayers, SpanCache]:
    cache = SpanCache(tmp_path / "cache")
    for blob in (BLOB_A, BLOB_B):
        cache.put(blob, SpanId(0), b"span 0 of " + blob.encode())
        cache.put(blob, SpanId(1), b"span 1 of " + blob.encode())
    layers = LazyLayers(
        fuse=cast(Any, _Fuse()),
        tasks=cast(Any, None),
        trees=cast(Any, None),
        sources=cast(Any, None),
        records=RecordStore(tmp_path / "records"),
        cache=cache,
        background=cast(Any, _Background()),
        tracker=cast(Any, None),
    )
    return layers, cache


def unserved(layers: LazyLayers, tmp_path: Path, snap: int, blob: Digest) -> Path:
    """What a restart leaves of a snapshot removed before it: a record and a trash directory."""
    layers.records.write(f"snap-{snap}", record(blob))
    mountpoint = tmp_path / "snapshots" / f"trash-{snap}-1" / "fs"
    mountpoint.mkdir(parents=True)
    return mountpoint


def served(layers: LazyLayers, tmp_path: Path, snap: int, blob: Digest) -> Path:
    """A mounted layer as `mount` leaves it (minus FUSE and the bind mount)."""
    mountpoint = tmp_path / "snapshots" / str(snap) / "fs"
    mountpoint.mkdir(parents=True)
    name = f"snap-{snap}"
    layers.records.write(name, record(blob))
    layers._layers[name] = _Layer(
        name, mountpoint, record(blob), cast(Any, None), cast(Any, _Scope())
    )
    return mountpoint


def marked(cache: SpanCache, blob: Digest) -> bool:
    return (cache.root / "spans" / f"sha256-{blob.hex}" / RELEASED_MARK).exists()


async def test_the_last_record_of_a_blob_releases_its_spans(tmp_path: Path) -> None:
    layers, cache = layers_with_cache(tmp_path)
    first_a = unserved(layers, tmp_path, 1, BLOB_A)
    second_a = unserved(layers, tmp_path, 2, BLOB_A)
    only_b = unserved(layers, tmp_path, 3, BLOB_B)

    await layers.unmount(only_b)
    assert cache.is_released(BLOB_B) and marked(cache, BLOB_B)
    assert not cache.is_released(BLOB_A)
    await layers.unmount(first_a)  # snap-2's record is of the same blob
    assert not cache.is_released(BLOB_A) and not marked(cache, BLOB_A)
    await layers.unmount(second_a)
    assert cache.is_released(BLOB_A) and marked(cache, BLOB_A)
    assert not list(layers.records.dir.iterdir())
    # Released, not dropped: the spans stay until the size bound needs the room, and the
    # mark survives a restart.
    assert cache.spans_of(BLOB_A) == frozenset({SpanId(0), SpanId(1)})
    assert SpanCache(tmp_path / "cache").stats().released_layers == 2


async def test_a_mounted_layer_of_the_blob_keeps_its_spans(tmp_path: Path) -> None:
    layers, cache = layers_with_cache(tmp_path)
    mounted = served(layers, tmp_path, 1, BLOB_A)
    gone = unserved(layers, tmp_path, 2, BLOB_A)
    layers.records.remove("snap-1")  # the mounted layer alone still refers to the blob
    await layers.unmount(gone)
    assert not cache.is_released(BLOB_A)
    await layers.unmount(mounted)  # the ordinary release, on unmount
    assert cache.is_released(BLOB_A)


async def test_a_damaged_record_releases_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    layers, cache = layers_with_cache(tmp_path)
    gone = unserved(layers, tmp_path, 1, BLOB_A)
    path = layers.records.dir / "snap-1.json"
    path.write_bytes(path.read_bytes()[:20])
    with caplog.at_level(logging.INFO, logger="snapshotter.remote.layers"):
        await layers.unmount(gone)  # never raises
    assert not cache.is_released(BLOB_A) and not cache.is_released(BLOB_B)
    assert not path.exists()  # the record is reclaimed all the same
    assert not [r for r in caplog.records if r.getMessage() == "cached spans released"]
