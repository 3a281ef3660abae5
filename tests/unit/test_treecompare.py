"""tests.support.treecompare: two real trees that differ in one attribute per path, and every
difference is reported (and nothing else)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.treecompare import (
    ATTRIBUTES,
    Difference,
    TreeMismatch,
    assert_same_tree,
    compare_trees,
    scan_tree,
)

MTIME_NS = 1_700_000_000_123_456_789
IS_ROOT = os.geteuid() == 0


def _touch_times(root: Path) -> None:
    """Fixed mtimes everywhere, directories after their children."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), ns=(MTIME_NS, MTIME_NS), follow_symlinks=False)


def _build(root: Path, side: str) -> None:
    """The tree of one side; ``side`` is ``"left"`` or ``"right"``."""
    left = side == "left"
    root.mkdir()
    (root / "same.txt").write_bytes(b"same\n")
    (root / "sub").mkdir()
    (root / "sub" / "nested.txt").write_bytes(b"nested\n")
    os.symlink("../same.txt", root / "sub" / "same-link")
    os.mkfifo(root / "fifo")
    if left:
        (root / "only-left.txt").write_bytes(b"x")
        (root / "kind").write_bytes(b"")
    else:
        (root / "kind").mkdir()
    (root / "mode").write_bytes(b"m")
    os.chmod(root / "mode", 0o644 if left else 0o4755)
    (root / "size").write_bytes(b"abc" if left else b"abcd")
    (root / "content").write_bytes(b"abc" if left else b"abd")
    os.symlink("aa" if left else "bb", root / "target")
    (root / "xattr").write_bytes(b"x")
    os.setxattr(root / "xattr", "user.k", b"1" if left else b"2")
    # overlayfs' own attributes are not part of the image: ignored.
    (root / "overlay-internal").mkdir()
    if not left:
        os.setxattr(root / "overlay-internal", "user.overlay.opaque", b"y")
    (root / "h1").write_bytes(b"linked\n")
    if left:
        os.link(root / "h1", root / "h2")
    else:
        (root / "h2").write_bytes(b"linked\n")
    (root / "sticky").mkdir(mode=0o755)
    os.chmod(root / "sticky", 0o1777 if left else 0o777)
    if IS_ROOT:
        (root / "uid").write_bytes(b"u")
        os.chown(root / "uid", 1000 if left else 1001, 0)
        (root / "gid").write_bytes(b"g")
        os.chown(root / "gid", 0, 4_000_000 if left else 4_000_001)
        os.mknod(root / "rdev", 0o600 | 0o020000, os.makedev(1, 3 if left else 5))
        (root / "trusted").write_bytes(b"t")
        os.setxattr(root / "trusted", "trusted.sociable", b"a" if left else b"b")
    _touch_times(root)
    if not left:
        os.utime(root / "same.txt", ns=(MTIME_NS, MTIME_NS + 1))


def test_each_attribute_difference_is_reported(tmp_path: Path) -> None:
    _build(tmp_path / "l", "left")
    _build(tmp_path / "r", "right")
    left, right = scan_tree(tmp_path / "l"), scan_tree(tmp_path / "r")
    got = {(d.path, d.attribute) for d in compare_trees(left, right)}
    expected = {
        ("only-left.txt", "presence"),
        ("kind", "kind"),
        ("mode", "mode"),
        ("sticky", "mode"),
        ("size", "size"),
        ("size", "sha256"),
        ("content", "sha256"),
        ("target", "target"),
        ("xattr", "xattrs"),
        ("same.txt", "mtime_ns"),
        ("h1", "nlink"),
        ("h2", "nlink"),
        ("h1", "hardlinks"),
        ("h2", "hardlinks"),
    }
    if IS_ROOT:
        expected |= {
            ("uid", "uid"),
            ("gid", "gid"),
            ("rdev", "rdev"),
            ("trusted", "xattrs"),
        }
    assert got == expected
    by_key = {(d.path, d.attribute): d for d in compare_trees(left, right)}
    assert by_key[("only-left.txt", "presence")] == Difference(
        "only-left.txt", "presence", True, False
    )
    assert by_key[("h1", "hardlinks")].left == ("h1", "h2")
    assert by_key[("h1", "hardlinks")].right == ()
    assert by_key[("xattr", "xattrs")].left == {"user.k": b"1"}
    assert by_key[("mode", "mode")].right == 0o4755
    assert by_key[("same.txt", "mtime_ns")].right == MTIME_NS + 1
    if IS_ROOT:
        assert by_key[("rdev", "rdev")] == Difference("rdev", "rdev", (1, 3), (1, 5))
        assert by_key[("gid", "gid")].left == 4_000_000


def test_identical_trees_and_scan_contents(tmp_path: Path) -> None:
    _build(tmp_path / "a", "left")
    _build(tmp_path / "b", "left")
    tree = assert_same_tree(tmp_path / "a", tmp_path / "b")
    assert tree.nodes["sub/same-link"].target == "../same.txt"
    assert tree.nodes["fifo"].kind == "fifo"
    assert tree.nodes["sub"].size is None and tree.nodes["sub"].nlink is None
    assert tree.nodes["h1"].nlink == 2
    assert tree.hardlink_peers()["h2"] == ("h1", "h2")
    assert tree.nodes["same.txt"].mtime_ns == MTIME_NS
    assert tree.total_file_bytes() > 0
    # The root directory itself is not a node.
    assert "" not in tree.nodes and "." not in tree.nodes


def test_assert_same_tree_message_skip_and_limit(tmp_path: Path) -> None:
    _build(tmp_path / "l", "left")
    _build(tmp_path / "r", "right")
    with pytest.raises(TreeMismatch) as info:
        assert_same_tree(tmp_path / "l", tmp_path / "r", show=3)
    message = str(info.value)
    assert "differences" in message and "more" in message
    assert str(info.value.differences[0]) in message
    left, right = scan_tree(tmp_path / "l"), scan_tree(tmp_path / "r")
    assert len(compare_trees(left, right, limit=2)) == 2
    rest = compare_trees(left, right, skip=ATTRIBUTES)
    assert rest == []
    with pytest.raises(ValueError, match="unknown attributes"):
        compare_trees(left, right, skip=["colour"])
