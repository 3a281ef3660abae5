"""The tar header check's fast path (`snapshotter.fs.verify`: one plain 512-byte header read
without `tarfile`) accepts exactly what the full check accepts: headers written by `tarfile` in
the ustar, GNU and PAX formats (long names in the ustar prefix, base-256 numbers, non-UTF-8
names), and every one-byte change of them is accepted by the fast path only where the full
check accepts it too."""

from __future__ import annotations

import io
import random
import stat
import tarfile
from pathlib import Path

import pytest

from snapshotter.fs import build_tree, verify
from snapshotter.fs.errors import HeaderMismatch
from snapshotter.fs.tree import LayerTree, NodeId
from tests.support.fuselayers import entries_from_tar

NAMES = [
    "plain.txt",
    "dir/" + "long-component-" * 6 + "file.txt",  # > 100 bytes: ustar prefix
    "caf\xe9-latin1-\udce9.bin",  # not UTF-8: surrogate escapes
]


def write_tar(path: Path, fmt: int, uid: int) -> None:
    with tarfile.open(path, "w", format=fmt, encoding="utf-8", errors="surrogateescape") as tf:
        for i, name in enumerate(NAMES):
            data = bytes(range(i + 1)) * 100
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.uid, info.gid = len(data), 0o640 + i, uid + i, 7
            info.mtime = 1_700_000_000 + i
            tf.addfile(info, io.BytesIO(data))


def files_of(path: Path) -> tuple[LayerTree, bytes, list[NodeId]]:
    entries, _ = entries_from_tar(path)
    tree = build_tree(entries)
    regular = [NodeId(n) for n in range(tree.node_count) if stat.S_ISREG(tree.attr(NodeId(n)).mode)]
    return tree, path.read_bytes(), regular


def full_check(
    header: bytes, tree: LayerTree, node: NodeId, monkeypatch: pytest.MonkeyPatch
) -> bool:
    with monkeypatch.context() as m:
        m.setattr(verify, "_plain_header_matches", lambda *a: False)
        try:
            verify.check_header(header, tree, node, "l")
        except HeaderMismatch:
            return False
    return True


@pytest.mark.parametrize(
    ("fmt", "uid", "fast"),
    [
        (tarfile.USTAR_FORMAT, 1000, True),
        (tarfile.GNU_FORMAT, 1000, True),
        (tarfile.GNU_FORMAT, 8**7 + 5, True),  # base-256 uid
        (tarfile.PAX_FORMAT, 1000, None),  # PAX records before some headers: full check
    ],
)
def test_the_fast_path_accepts_what_the_full_check_accepts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: int, uid: int, fast: bool | None
) -> None:
    path = tmp_path / "layer.tar"
    write_tar(path, fmt, uid)
    tree, tar, nodes = files_of(path)
    assert nodes
    rng = random.Random(fmt * 31 + uid)
    for node in nodes:
        start, end = tree.header_range(node)
        header = tar[start:end]
        verify.check_header(header, tree, node, "l")  # the real header passes
        plain = verify._plain_header_matches(header, tree, node, tree.path_of(node))
        if fast is not None:
            assert plain is (fast and len(header) == 512), (tree.path_of(node), len(header))
        # one-byte changes: the fast path never accepts what the full check refuses
        for _ in range(150):
            at = rng.randrange(len(header))
            bad = bytearray(header)
            bad[at] = rng.randrange(256)
            changed = bytes(bad)
            if verify._plain_header_matches(changed, tree, node, tree.path_of(node)):
                assert full_check(changed, tree, node, monkeypatch), at
