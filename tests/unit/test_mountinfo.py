"""The one mountinfo parser: fields, octal escapes as the kernel writes them, non-UTF-8 bytes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from snapshotter.mountinfo import MountEntry, mount_table, parse_mountinfo, unescape

# What the kernel writes for a root under "/var/lib/søciable dir" (UTF-8 bytes raw, space as
# \040), a tab, a newline and a backslash in names, optional fields, and a non-UTF-8 name.
SAMPLE = (
    b"22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
    b"45 22 0:52 / /var/lib/s\xc3\xb8ciable\\040dir/fuse rw,nosuid shared:7 master:2"
    b" - fuse.sociable sociable ro,user_id=0\n"
    b"46 45 0:52 /layer\\011one /var/lib/s\xc3\xb8ciable\\040dir/snapshots/1/fs ro"
    b" - fuse.sociable sociable ro\n"
    b"47 22 254:0 /a\\134b /mnt/new\\012line rw - ext4 /dev/vda rw\n"
    b"48 22 254:0 / /mnt/\xff\xfe rw - ext4 /dev/vda rw\n"
)


def test_parse_decodes_paths_as_the_kernel_escapes_them() -> None:
    entries = parse_mountinfo(SAMPLE)
    assert [e.mount_id for e in entries] == [22, 45, 46, 47, 48]
    fuse = entries[1]
    assert fuse == MountEntry(
        mount_id=45,
        parent_id=22,
        device="0:52",
        root="/",
        mountpoint="/var/lib/søciable dir/fuse",
        fstype="fuse.sociable",
        source="sociable",
    )
    assert entries[2].root == "/layer\tone"
    assert entries[2].mountpoint == "/var/lib/søciable dir/snapshots/1/fs"
    assert (entries[3].root, entries[3].mountpoint) == ("/a\\b", "/mnt/new\nline")
    assert os.fsencode(entries[4].mountpoint) == b"/mnt/\xff\xfe"


def test_unescape_leaves_raw_bytes_and_lone_backslashes() -> None:
    assert unescape("søciable".encode()) == "søciable"
    assert unescape(b"a\\040b\\134\\040") == "a b\\ "
    assert unescape(b"not\\08an-escape") == "not\\08an-escape"


def test_malformed_line_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="line 2"):
        parse_mountinfo(SAMPLE.splitlines(keepends=True)[0] + b"garbage line\n")


def test_mount_table_reads_this_process_mounts(tmp_path: Path) -> None:
    table = mount_table()
    assert any(e.mountpoint == "/" for e in table)
    sample = tmp_path / "mountinfo"
    sample.write_bytes(SAMPLE)
    assert mount_table(sample) == parse_mountinfo(SAMPLE)
    sample.write_bytes(b"not mountinfo\n")
    with pytest.raises(OSError, match="malformed") as info:
        mount_table(sample)
    assert isinstance(info.value.__cause__, ValueError)
