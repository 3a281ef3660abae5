"""Reads answered at once, without a task or a wait: the lazy reader's `read_now` (spans in
memory, small reads from the inflated tier's page cache), the host's (verified headers only)
and the FUSE server's READ answer built from it. Real span cache and tier in a temp
directory, an in-memory blob source."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from index.model import SpanId, UncompressedOffset
from snapshotter.fs import LayerHost, build_tree
from snapshotter.fs import protocol as p
from snapshotter.fs.fuse import FuseOperations
from snapshotter.fs.inodes import FUSE_ROOT_INODE
from snapshotter.lazy import ReadConfig, RemoteLayerReader
from snapshotter.lazy.cache import CacheConfig, SpanCache
from snapshotter.lazy.inflater import INLINE_TIER_READ_BYTES
from tests.support.fuserequests import Client, parse_reply, request
from tests.support.lazylayer import Layer, MemorySource


@pytest.fixture(scope="module")
def layer() -> Layer:
    return Layer()


def make_reader(
    layer: Layer, source: MemorySource, tmp_path: Path, readahead_spans: int = 0
) -> RemoteLayerReader:
    cache = SpanCache(tmp_path / "cache", CacheConfig(inflated_max_bytes=1 << 30))
    return RemoteLayerReader(
        layer.digest,
        layer.ztoc,
        source,
        cache,
        config=ReadConfig(readahead_spans=readahead_spans),
    )


async def test_reader_answers_now_only_what_is_in_memory_or_the_page_cache(
    layer: Layer, tmp_path: Path
) -> None:
    source = MemorySource(layer.blob)
    reader = make_reader(layer, source, tmp_path)
    name, (offset, content) = sorted(layer.files().items())[3]
    at = UncompressedOffset(offset)
    assert reader.read_now(at, 100) is None  # nothing local, and nothing fetched for it
    assert source.calls == []
    assert await reader.read(at, 100) == content[:100]
    requests = len(source.calls)
    assert reader.read_now(at, 100) == content[:100]  # its span is in memory now
    assert reader.read_now(UncompressedOffset(offset + 50), 30) == content[50:80]
    # out of memory, the span is in the inflated tier: small reads come from its page cache
    span = reader.span_map.span_for_offset(at)
    tier = reader.inflater.tier
    assert tier is not None
    tier.flush()
    reader.inflater.drop(span)
    assert reader.read_now(at, 100) == content[:100]
    assert reader.read_now(at, INLINE_TIER_READ_BYTES + 1) is None  # large: a worker thread
    assert reader.read_now(UncompressedOffset(reader.span_map.uncompressed_archive_size), 9) is None
    assert len(source.calls) == requests  # nothing fetched by any of these
    assert name


async def test_a_read_answered_now_counts_for_read_ahead(layer: Layer, tmp_path: Path) -> None:
    reader = make_reader(layer, MemorySource(layer.blob), tmp_path, readahead_spans=4)
    first, second = (reader.span_map.uncompressed_range(SpanId(i))[0] for i in (0, 1))
    await reader.read(first, 10)
    await reader.read(second, 10)  # both spans in memory, read-ahead at span 1
    assert reader.read_now(first, 10) is not None
    assert reader.read_ahead.observe(SpanId(1), SpanId(1)) is not None  # after span 0: sequential


async def test_host_and_server_answer_at_once_after_the_header_is_verified(
    layer: Layer, tmp_path: Path
) -> None:
    host = LayerHost()
    reader = make_reader(layer, MemorySource(layer.blob), tmp_path)
    host.add_layer("l", build_tree(list(layer.ztoc.files)), reader, digest=str(layer.digest))
    ops = Client(FuseOperations(host))
    files = layer.files()
    name = sorted(files)[2]
    _, content = files[name]
    node = ops.lookup(FUSE_ROOT_INODE, b"l")
    for part in name.split("/"):
        node = ops.lookup(node.nodeid, part.encode())
    assert stat.S_ISREG(node.mode)
    raw = request(p.READ, node.nodeid, p.READ_IN.pack(0, 0, 4096, 0, 0, 0, 0))
    assert host.read_now(node.nodeid, 0, 4096) is None  # nothing local yet
    assert ops.ops.read_now(raw) is None
    assert await ops.read(node.nodeid, 0, 4096) == content[:4096]  # verifies, fetches
    assert host.read_now(node.nodeid, 0, 4096) == content[:4096]
    # the next file in the layer starts in the last span of this one: read this one to its
    # end, and the next one's header is checked here, at once, from memory
    await ops.read(node.nodeid, 0, len(content))
    by_offset = sorted(files, key=lambda n: files[n][0])
    other = by_offset[by_offset.index(name) + 1]
    node2 = ops.lookup(FUSE_ROOT_INODE, b"l")
    for part in other.split("/"):
        node2 = ops.lookup(node2.nodeid, part.encode())
    assert host.read_now(node2.nodeid, 10, 20) is None  # unverified, not from 0: `read`
    assert host.read_now(node2.nodeid, 0, 100) == files[other][1][:100]
    assert host.read_now(node2.nodeid, 10, 20) == files[other][1][10:30]  # verified now
    answer = ops.ops.read_now(raw)
    assert answer is not None
    reply = parse_reply(b"".join(answer))
    assert reply.error == 0 and reply.payload == content[:4096]
    assert host.read_now(node.nodeid, len(content), 10) == b""  # past the end
    assert host.read_now(FUSE_ROOT_INODE, 0, 10) is None  # not a file: `read` raises
    host.remove_layer("l")
    assert host.read_now(node.nodeid, 0, 10) is None  # removed: `read` raises
