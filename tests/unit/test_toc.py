"""TocBuilder against Python's tarfile (generated archives), GNU tar, and hand-made headers
that exercise the corners of Go's archive/tar reader."""

from __future__ import annotations

import datetime
import io
import json
import os
import random
import shutil
import subprocess
import tarfile
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from index import tartime
from index.model import EntryType, FileMetadata
from index.toc import TarError, TarFormatError, TocBuilder, UnsupportedTarEntry
from tests.support import tar_go_corpus
from tests.support.tar_go_corpus import END, base256, header, octal, pad, pax

_TYPE_OF = {
    tarfile.REGTYPE: EntryType.REG,
    tarfile.AREGTYPE: EntryType.REG,
    tarfile.LNKTYPE: EntryType.HARDLINK,
    tarfile.SYMTYPE: EntryType.SYMLINK,
    tarfile.CHRTYPE: EntryType.CHAR,
    tarfile.BLKTYPE: EntryType.BLOCK,
    tarfile.DIRTYPE: EntryType.DIR,
    tarfile.FIFOTYPE: EntryType.FIFO,
}


def scan(data: bytes, chunks: random.Random | int | None = None) -> tuple[list[FileMetadata], int]:
    """Feed `data` to a TocBuilder in random chunks (or one int size) and finish."""
    builder = TocBuilder()
    view = memoryview(data)
    pos = 0
    while pos < len(data):
        if isinstance(chunks, random.Random):
            step = chunks.choice((1, 7, 511, 512, 513, 1000, 4096, chunks.randint(1, 3000)))
        else:
            step = chunks or len(data)
        builder.feed(view[pos : pos + step])
        pos += step
    return builder.finish()


def expected_mod_time(member: tarfile.TarInfo) -> str:
    """Go's MarshalText of the member's mtime in UTC, computed with Decimal and datetime."""
    text = member.pax_headers.get("mtime")
    if text:
        whole, _, frac = text.partition(".")
        value = Decimal(whole + "." + (frac[:9] or "0"))  # Go truncates to nanoseconds
    else:
        value = Decimal(int(member.mtime))
    seconds = int(value.to_integral_value(rounding="ROUND_FLOOR"))
    nanos = int((value - seconds) * 10**9)
    if seconds >= 253_402_300_800:  # year 10000 and later: MarshalText fails, "" is stored
        return ""
    when = datetime.datetime(1970, 1, 1) + datetime.timedelta(seconds=seconds)
    out = when.isoformat()
    if nanos:
        out += "." + f"{nanos:09d}".rstrip("0")
    return out + "Z"


def assert_matches_tarfile(data: bytes, entries: list[FileMetadata], size: int) -> None:
    with tarfile.open(fileobj=io.BytesIO(data), encoding="utf-8", errors="surrogateescape") as tf:
        members = tf.getmembers()
        end = tf.offset
    assert size == end + 1024  # two zero blocks; tarfile's record padding is not counted
    assert len(entries) == len(members)
    for got, member in zip(entries, members, strict=True):
        name = member.name + "/" if member.isdir() else member.name
        assert got.name == name
        assert got.type == _TYPE_OF[member.type]
        assert got.uncompressed_offset == member.offset_data
        assert got.uncompressed_size == member.size
        assert got.linkname == member.linkname
        assert got.mode == member.mode
        assert (got.uid, got.gid) == (member.uid, member.gid)
        assert (got.uname, got.gname) == (member.uname, member.gname)
        assert (got.devmajor, got.devminor) == (member.devmajor, member.devminor)
        assert dict(got.xattrs) == member.pax_headers
        keys = list(got.xattrs)
        assert keys == sorted(keys, key=lambda k: k.encode("utf-8", "surrogateescape"))
        assert got.mod_time == expected_mod_time(member)


# --- generated archives --------------------------------------------------------------------------

_SEGMENT_CHARS = st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/")
_KINDS = ("reg", "dir", "symlink", "hardlink", "char", "block", "fifo")


@st.composite
def archives(draw: st.DrawFn, fmt: int) -> bytes:
    ascii_only = fmt == tarfile.USTAR_FORMAT
    alphabet = st.sampled_from("abcdefgh_.-0123456789") if ascii_only else _SEGMENT_CHARS
    segment = st.text(alphabet, min_size=1, max_size=60 if ascii_only else 120)
    n_entries = draw(st.integers(0, 7))
    max_id = 0o7777777 if fmt == tarfile.USTAR_FORMAT else (1 << 32) - 1
    if fmt == tarfile.GNU_FORMAT:
        mtimes = st.integers(-(1 << 35), 1 << 38)
    elif fmt == tarfile.USTAR_FORMAT:
        mtimes = st.integers(0, 8**11 - 1)
    else:
        mtimes = st.integers(-(1 << 35), 1 << 35)
    buf = io.BytesIO()
    names: list[str] = []
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8") as tf:
        for i in range(n_entries):
            kind = draw(st.sampled_from(_KINDS))
            parts = draw(st.lists(segment, min_size=1, max_size=4))
            name = "/".join(parts) + f"{i}"
            info = tarfile.TarInfo(name)
            info.mode = draw(st.integers(0, 0o7777))
            info.uid = draw(st.integers(0, max_id))
            info.gid = draw(st.integers(0, max_id))
            info.uname = draw(st.text(st.sampled_from("abcxyz"), max_size=20))
            info.gname = draw(st.text(st.sampled_from("abcxyz"), max_size=20))
            info.mtime = draw(mtimes)
            payload = b""
            if kind == "reg":
                size = draw(st.sampled_from((0, 1, 511, 512, 513, 1024, 1500)))
                payload = bytes(size) if draw(st.booleans()) else random.Random(i).randbytes(size)
                info.size = size
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind in ("symlink", "hardlink"):
                info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
                target = draw(st.sampled_from(names)) if names else "missing"
                info.linkname = target if kind == "hardlink" else "../" + target
            elif kind in ("char", "block"):
                info.type = tarfile.CHRTYPE if kind == "char" else tarfile.BLKTYPE
                info.devmajor = draw(st.integers(0, 0o7777777))
                info.devminor = draw(st.integers(0, 0o7777777))
            else:
                info.type = tarfile.FIFOTYPE
            if fmt == tarfile.PAX_FORMAT:
                pax: dict[str, str] = {}
                for _ in range(draw(st.integers(0, 3))):
                    key = "SCHILY.xattr.user." + draw(st.text(st.sampled_from("kqz.w"), min_size=1))
                    pax[key] = draw(st.text(_SEGMENT_CHARS | st.just("\n"), max_size=40))
                if draw(st.booleans()):
                    pax["LIBARCHIVE.creationtime"] = str(draw(st.integers(0, 1 << 33)))
                if draw(st.booleans()):
                    whole = draw(st.integers(-(1 << 34), 1 << 38))
                    frac = draw(st.text(st.sampled_from("0123456789"), min_size=1, max_size=12))
                    pax["mtime"] = f"{whole}.{frac}"
                    info.mtime = 0
                info.pax_headers = pax
            try:
                tf.addfile(info, io.BytesIO(payload) if kind == "reg" else None)
            except ValueError:
                reject()  # USTAR cannot hold this name; tarfile refuses it
            names.append(name)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(data=st.data(), seed=st.integers(0, 1 << 32))
def test_generated_archives_match_tarfile(fmt: int, data: st.DataObject, seed: int) -> None:
    archive = data.draw(archives(fmt))
    entries, size = scan(archive, random.Random(seed))
    assert_matches_tarfile(archive, entries, size)
    assert scan(archive) == (entries, size)  # chunking never changes the result


def test_long_names_links_and_unicode_in_gnu_and_pax() -> None:
    long_dir = "d" * 150 + "/" + "é" * 60
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
            info = tarfile.TarInfo(long_dir + "/file-" + "x" * 120)
            info.size = 3
            tf.addfile(info, io.BytesIO(b"abc"))
            link = tarfile.TarInfo("link")
            link.type = tarfile.SYMTYPE
            link.linkname = "/" + "t" * 300
            tf.addfile(link)
        entries, size = scan(buf.getvalue(), 100)
        assert_matches_tarfile(buf.getvalue(), entries, size)
        assert entries[0].name == long_dir + "/file-" + "x" * 120
        assert entries[1].linkname == "/" + "t" * 300
        if fmt == tarfile.GNU_FORMAT:
            assert entries[0].uncompressed_offset == 512 * 3  # L header + payload + header
            assert entries[0].xattrs == {}
        else:
            assert set(entries[0].xattrs) == {"path"}


def test_python_stdlib_tree_matches_tarfile() -> None:
    """A real tree (the stdlib json package, with dirs, files and pyc caches)."""
    src = Path(tarfile.__file__).parent / "json"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.add(src, arcname="json")
    entries, size = scan(buf.getvalue(), 1 << 20)
    assert len(entries) > 5
    assert_matches_tarfile(buf.getvalue(), entries, size)


# --- GNU tar -------------------------------------------------------------------------------------


def _make_tree(root: Path) -> None:
    (root / "dir" / ("sub" * 40)).mkdir(parents=True)
    (root / "dir" / "small.txt").write_bytes(b"hello\n")
    (root / "dir" / ("sub" * 40) / ("long-" * 30 + ".bin")).write_bytes(os.urandom(5000))
    (root / "empty").write_bytes(b"")
    (root / "zeros").write_bytes(bytes(4096))
    (root / "ünïcode-名前").write_bytes(b"u")
    os.symlink("dir/small.txt", root / "sym")
    os.symlink("x" * 200, root / "longsym")
    os.link(root / "dir" / "small.txt", root / "hard")
    os.mkfifo(root / "fifo")
    (root / ".wh.deleted").write_bytes(b"")
    (root / "dir" / ".wh..wh..opq").write_bytes(b"")
    for path in root.rglob("*"):
        os.utime(
            path, ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789), follow_symlinks=False
        )


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar (`tar`) is not installed")
@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_gnu_tar_output_matches_tarfile(tmp_path: Path, fmt: str) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    _make_tree(tree)
    archive = tmp_path / f"{fmt}.tar"
    cmd = ["tar", f"--format={fmt}", "--sort=name", "-cf", str(archive), "-C", str(tree), "."]
    result = subprocess.run(cmd, capture_output=True, check=False)
    assert result.returncode == 0, result.stderr
    data = archive.read_bytes()
    entries, size = scan(data, random.Random(7))
    assert_matches_tarfile(data, entries, size)
    by_name = {e.name: e for e in entries}
    assert by_name["./hard"].type == EntryType.HARDLINK
    assert by_name["./hard"].linkname == "./dir/small.txt"
    assert by_name["./fifo"].type == EntryType.FIFO
    assert by_name["./dir/"].type == EntryType.DIR
    assert by_name["./.wh.deleted"].type == EntryType.REG
    assert by_name["./dir/.wh..wh..opq"].type == EntryType.REG
    assert by_name["./longsym"].linkname == "x" * 200
    assert by_name["./ünïcode-名前"].uncompressed_size == 1
    if fmt == "posix":
        assert by_name["./empty"].mod_time == "2023-11-14T22:13:20.123456789Z"
        assert "mtime" in by_name["./empty"].xattrs
    else:
        assert by_name["./empty"].mod_time == "2023-11-14T22:13:20Z"


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar (`tar`) is not installed")
def test_gnu_and_posix_formats_agree(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    _make_tree(tree)
    results = {}
    for fmt in ("gnu", "posix"):
        archive = tmp_path / f"{fmt}.tar"
        subprocess.run(
            ["tar", f"--format={fmt}", "--sort=name", "-cf", str(archive), "-C", str(tree), "."],
            check=True,
        )
        entries, _ = scan(archive.read_bytes())
        results[fmt] = [(e.name, e.type, e.uncompressed_size, e.linkname, e.mode) for e in entries]
    assert results["gnu"] == results["posix"]


# --- hand-made headers ---------------------------------------------------------------------------


def one(stream: bytes) -> FileMetadata:
    entries, _ = scan(stream)
    assert len(entries) == 1
    return entries[0]


def test_offsets_and_end_of_archive_position() -> None:
    stream = header(b"a", size=5) + pad(b"hello") + header(b"b/", typeflag=b"5") + END
    entries, size = scan(stream + bytes(9000), 3)  # record padding after the end is ignored
    assert [(e.name, e.uncompressed_offset, e.uncompressed_size) for e in entries] == [
        ("a", 512, 5),
        ("b/", 1536, 0),
    ]
    assert size == len(stream)


def test_stream_without_end_marker_ends_at_block_boundary() -> None:
    stream = header(b"a", size=5) + pad(b"hello")
    assert scan(stream)[1] == len(stream)
    assert scan(stream + bytes(512))[1] == len(stream) + 512  # a single zero block, then EOF
    # EOF inside the padding after an entry's data is a clean end for Go's reader too
    assert scan(stream[:-100])[1] == len(stream) - 100


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (header(b"a", size=5) + b"hel", "bytes short in the data"),
        (header(b"a")[:300], "inside a header block"),
        (header(b"a") + bytes(512) + header(b"b"), "followed by a non-zero block"),
        (header(b"a") + bytes(512) + b"\0" * 100, "inside a header block"),
        (header(b"P", typeflag=b"x", size=30) + b"30 path=", "extension header"),
    ],
)
def test_truncated_and_corrupt_streams(stream: bytes, message: str) -> None:
    with pytest.raises(TarFormatError, match=message):
        scan(stream, 64)


def test_checksum_signed_and_unsigned_are_accepted_bad_is_not() -> None:
    name = "naïve-€".encode()
    assert one(header(name) + END).name == "naïve-€"
    assert one(header(name, signed_checksum=True) + END).name == "naïve-€"
    with pytest.raises(TarFormatError, match="checksum"):
        scan(header(name, checksum=b"0000001\0") + END)
    with pytest.raises(TarFormatError, match="invalid header"):
        scan(header(name, checksum=b"12x4\0   ") + END)


def test_v7_legacy_typeflag_and_trailing_slash() -> None:
    v7 = header(b"old/dir/", typeflag=b"\0", magic=b"")
    entry = one(v7 + END)
    assert (entry.type, entry.uname, entry.gname) == (EntryType.DIR, "", "")
    assert one(header(b"plain", typeflag=b"\0", size=3) + pad(b"abc") + END).type == EntryType.REG


def test_numeric_fields_octal_spaces_and_base256() -> None:
    fields = {
        100: b"  755 \0\0",  # mode padded with spaces and NULs
        108: base256(4_000_000_000, 8),  # uid beyond octal range
        116: base256(-1, 8),  # gid -1: Go's uint32 conversion gives 4294967295
        136: base256(-86_400, 12),  # mtime before the epoch
        329: base256(300, 8),
        337: b"7\0\0\0\0\0\0\0",
    }
    entry = one(header(b"dev", typeflag=b"3", fields=fields) + END)
    assert entry.mode == 0o755
    assert (entry.uid, entry.gid) == (4_000_000_000, 0xFFFF_FFFF)
    assert entry.mod_time == "1969-12-31T00:00:00Z"
    assert (entry.devmajor, entry.devminor) == (300, 7)
    assert one(header(b"d/", typeflag=b"5", size=base256(1 << 40, 12)) + END).uncompressed_size == (
        1 << 40
    )
    builder = TocBuilder()
    builder.feed(header(b"big", size=base256(1 << 40, 12)) + bytes(4096))
    with pytest.raises(TarFormatError, match="bytes short in the data of 'big'"):
        builder.finish()


def test_bad_numbers_are_format_errors() -> None:
    for field in (b"0o17\0\0\0\0", b"+17\0\0\0\0\0", b"1_7\0\0\0\0\0", b"9\0\0\0\0\0\0\0"):
        with pytest.raises(TarFormatError, match="invalid header"):
            scan(header(fields={100: field}) + END)
    with pytest.raises(TarFormatError, match="overflows"):
        scan(header(fields={136: b"\x80" + b"\xff" * 11}) + END)
    with pytest.raises(TarFormatError, match="negative size"):
        scan(header(size=base256(-5, 12)) + END)
    # a header-only type may carry any size, even a negative one, as in Go
    assert one(header(typeflag=b"5", size=base256(-5, 12)) + END).uncompressed_size == -5


def test_header_only_types_have_no_data_but_keep_their_size() -> None:
    stream = header(b"hl", typeflag=b"1", linkname=b"target", size=1000) + header(b"next") + END
    entries, _ = scan(stream)
    assert [(e.name, e.uncompressed_offset, e.uncompressed_size) for e in entries] == [
        ("hl", 512, 1000),
        ("next", 1024, 0),
    ]
    assert entries[0].linkname == "target"


def test_ustar_prefix_star_and_gnu_fallback() -> None:
    ustar = header(b"name", fields={345: b"some/prefix"})
    assert one(ustar + END).name == "some/prefix/name"
    star = header(b"name", fields={345: b"star/pre", 476: octal(5, 12), 508: b"tar\0"})
    assert one(star + END).name == "star/pre/name"
    with pytest.raises(TarFormatError):
        scan(header(b"n", fields={345: b"p", 476: b"zz\0", 508: b"tar\0"}) + END)
    gnu_magic = b"ustar  \0"
    gnu = header(b"name", magic=gnu_magic, fields={345: octal(5, 12)})
    assert one(gnu + END).name == "name"  # a valid atime, not a prefix
    buggy = header(b"name", magic=gnu_magic, fields={345: b"old/go/prefix"})
    assert one(buggy + END).name == "old/go/prefix/name"  # pre-Go-1.8 writer
    v7 = header(b"name", magic=b"", fields={345: b"ignored"})
    assert one(v7 + END).name == "name"


def test_pax_records_override_and_are_all_kept() -> None:
    records = {
        b"path": b"from/pax",
        b"linkpath": b"",  # empty: the header value stays
        b"uid": b"70000000000",
        b"gid": b"+5",
        b"uname": b"\xff\xfe",  # not UTF-8: kept as surrogate escapes
        b"size": b"3",
        b"mtime": b"-1.5",
        b"atime": b"12.000000000001",
        b"SCHILY.xattr.security.capability": b"\x01\x00\x00\x02\n=",
        b"LIBARCHIVE.xattr.user.k": b"dmFs",
    }
    stream = pax(records) + header(b"short", typeflag=b"2", linkname=b"tgt") + END
    entry = one(stream)
    assert entry.name == "from/pax"
    assert entry.linkname == "tgt"
    assert (entry.uid, entry.gid) == (70000000000 & 0xFFFF_FFFF, 5)
    assert entry.uname == "\udcff\udcfe"
    assert entry.uncompressed_size == 3
    assert entry.mod_time == "1969-12-31T23:59:58.5Z"
    assert list(entry.xattrs) == sorted(k.decode() for k in records)
    assert entry.xattrs["SCHILY.xattr.security.capability"] == "\x01\x00\x00\x02\n="
    assert entry.uncompressed_offset == 3 * 512


def test_pax_size_moves_the_next_header() -> None:
    stream = pax({b"size": b"600"}) + header(b"f", size=0) + pad(bytes(600)) + header(b"g") + END
    entries, _ = scan(stream)
    assert [e.uncompressed_offset for e in entries] == [1536, 1536 + 1024 + 512]


def test_only_the_last_pax_header_applies_and_gnu_names_win() -> None:
    long_name = header(b"././@LongLink", typeflag=b"L", size=9) + pad(b"gnu/name\0")
    stream = pax({b"path": b"first"}) + pax({b"path": b"second"}) + header(b"h") + END
    assert one(stream).name == "second"
    assert one(stream).xattrs == {"path": "second"}
    stream = long_name + pax({b"path": b"pax/name"}) + header(b"h") + END
    assert one(stream).name == "gnu/name"
    long_link = header(b"././@LongLink", typeflag=b"K", size=4) + pad(b"lnk\0")
    assert one(long_link + header(b"s", typeflag=b"2") + END).linkname == "lnk"


@pytest.mark.parametrize(
    "body",
    [
        b"5 a=\ngarbage",
        b"x",
        b"10 path\n\n\n\n",
        b"6 =ab\n",
        b"3 a=\n",
        b"99 path=x\n",
        b"9 path=\0\n",
        b"7 a\0=b\n",
        b"8 a=bcd ",
    ],
)
def test_malformed_pax_records(body: bytes) -> None:
    with pytest.raises(TarFormatError, match="PAX header"):
        scan(pax(body) + header() + END)


@pytest.mark.parametrize(
    "records",
    [
        {b"mtime": b"x"},
        {b"atime": b"1.x"},
        {b"ctime": b""},  # empty values are skipped: this one is fine
        {b"uid": b"a"},
        {b"gid": b"1 "},
        {b"size": b"99999999999999999999"},
        {b"GNU.sparse.numbytes": b"1"},
        {b"GNU.sparse.offset": b"1,2"},
    ],
)
def test_invalid_pax_values(records: dict[bytes, bytes]) -> None:
    stream = pax(records) + header() + END
    if records == {b"ctime": b""}:
        assert one(stream).xattrs == {"ctime": ""}
        return
    with pytest.raises(TarFormatError, match="PAX"):
        scan(stream)


def test_unsupported_entry_types_name_the_entry() -> None:
    for flag in (b"S", b"7", b"V", b"D", b"M", b"Z"):
        with pytest.raises(UnsupportedTarEntry, match=rf"'weird'.*type '{flag.decode()}'"):
            scan(header(b"weird", typeflag=flag) + END)
    with pytest.raises(UnsupportedTarEntry, match=r"pax_global_header.*'g'"):
        scan(pax({b"comment": b"git"}, typeflag=b"g", name=b"pax_global_header") + END)
    sparse = pax({b"GNU.sparse.major": b"1", b"GNU.sparse.minor": b"0"})
    with pytest.raises(UnsupportedTarEntry, match="sparse"):
        scan(sparse + header(b"holes", size=512) + pad(b"x") + END)
    # an unknown sparse version is not a sparse file to Go either
    other = pax({b"GNU.sparse.major": b"7"})
    assert one(other + header(b"fine") + END).xattrs == {"GNU.sparse.major": "7"}


def test_special_payload_limit() -> None:
    with pytest.raises(TarFormatError, match="more than"):
        scan(header(b"././@LongLink", typeflag=b"L", size=(1 << 20) + 1))


def test_builder_is_single_use() -> None:
    builder = TocBuilder()
    builder.feed(END)
    assert builder.finish() == ([], 1024)
    with pytest.raises(TarError):
        builder.feed(b"")
    with pytest.raises(TarError):
        builder.finish()
    broken = TocBuilder()
    with pytest.raises(TarFormatError):
        broken.feed(header(checksum=b"1\0      "))
    with pytest.raises(TarError):
        broken.feed(END)
    assert "TocBuilder" in repr(broken)


def test_empty_stream_and_bytearray_input() -> None:
    assert scan(b"") == ([], 0)
    builder = TocBuilder()
    builder.feed(bytearray(header(b"x") + END))
    assert builder.finish()[1] == 1536


# --- time formatting -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "nanos", "text"),
    [
        (0, 0, "1970-01-01T00:00:00Z"),
        (-1, 0, "1969-12-31T23:59:59Z"),
        (1, 500_000_000, "1970-01-01T00:00:01.5Z"),
        (0, -1, "1969-12-31T23:59:59.999999999Z"),
        (951_782_400, 10, "2000-02-29T00:00:00.00000001Z"),
        (-62_135_596_800, 0, "0001-01-01T00:00:00Z"),
        (-62_167_219_200, 0, "0000-01-01T00:00:00Z"),
        (-62_167_219_201, 0, ""),
        (253_402_300_799, 999_999_999, "9999-12-31T23:59:59.999999999Z"),
        (253_402_300_800, 0, ""),
        ((1 << 63) - 1, 0, ""),
    ],
)
def test_format_mod_time(seconds: int, nanos: int, text: str) -> None:
    assert tartime.format_mod_time(seconds, nanos) == text


@given(st.datetimes(), st.integers(0, 999_999_999))
def test_format_mod_time_matches_datetime(when: datetime.datetime, nanos: int) -> None:
    epoch = datetime.datetime(1970, 1, 1)
    seconds = (when.replace(microsecond=0) - epoch) // datetime.timedelta(seconds=1)
    expected = when.strftime("%Y-%m-%dT%H:%M:%S").rjust(19, "0")
    if nanos:
        expected += "." + f"{nanos:09d}".rstrip("0")
    assert tartime.format_mod_time(seconds, nanos) == expected + "Z"


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        (b"5", (5, 0)),
        (b"5.", (5, 0)),
        (b"-5.25", (-5, -250_000_000)),
        (b"1.1234567899", (1, 123_456_789)),
        (b"+3.0", (3, 0)),
    ],
)
def test_parse_pax_time(text: bytes, parsed: tuple[int, int]) -> None:
    assert tartime.parse_pax_time(text) == parsed


@pytest.mark.parametrize("text", [b"", b".5", b"1.-5", b"1.5e3", b" 1", b"1_000", b"9" * 20])
def test_parse_pax_time_rejects(text: bytes) -> None:
    with pytest.raises(ValueError):
        tartime.parse_pax_time(text)


# --- agreement with Go's archive/tar -------------------------------------------------------------


def _as_go_record(entry: FileMetadata) -> dict[str, object]:
    h = tar_go_corpus.hexs
    return {
        "name": h(entry.name),
        "type": str(entry.type),
        "linkname": h(entry.linkname),
        "uname": h(entry.uname),
        "gname": h(entry.gname),
        "mod_time": entry.mod_time,
        "offset": entry.uncompressed_offset,
        "size": entry.uncompressed_size,
        "mode": entry.mode,
        "uid": entry.uid,
        "gid": entry.gid,
        "devmajor": entry.devmajor,
        "devminor": entry.devminor,
        "pax": [[h(k), h(v)] for k, v in entry.xattrs.items()],
    }


def test_agrees_with_go_archive_tar_on_a_mutated_corpus() -> None:
    """Results recorded from Go's archive/tar (see tests/support/tar_go_corpus.py): the same
    entries, offsets and archive size where Go succeeds, a failure where Go fails."""
    lines = tar_go_corpus.DATA_FILE.read_text().splitlines()
    expected = {record["case"]: record for record in map(json.loads, lines)}
    cases = list(tar_go_corpus.corpus())
    assert [case for case, _ in cases] == list(expected)
    mismatches = []
    for case, data in cases:
        want = expected[case]
        try:
            entries, size = scan(data, random.Random(len(data)))
        except TarError as e:
            if want["ok"]:
                mismatches.append(f"{case}: Go reads it, we fail: {e}")
            continue
        if not want["ok"]:
            mismatches.append(f"{case}: Go fails ({want['error']}), we read {len(entries)} entries")
            continue
        got = (
            size,
            len(entries),
            tar_go_corpus.entries_digest([_as_go_record(e) for e in entries]),
        )
        if got != (want["size"], want["entries"], want["digest"]):
            mismatches.append(f"{case}: Go {want}, we {got}")
    assert not mismatches, "\n".join(mismatches[:20])
    assert sum(record["ok"] for record in expected.values()) > 150  # plenty of successes too
