"""A deterministic corpus of odd tar streams, with what Go's `archive/tar` makes of each.

`corpus()` builds small archives by hand (every header format, PAX and GNU extension records,
base-256 numbers, prefixes, legacy typeflags) and then mutates them with a seeded RNG: header
bytes replaced (usually with the checksum fixed up, so the parser gets past it), streams
truncated, zero blocks inserted, extension payloads damaged. No tarfile, no clock, no
os.urandom: the same Python gives the same bytes.

`tests/support/data/tar_go_corpus.jsonl` holds, per case, the result of the AWS builder's
reading loop (Go `archive/tar` behind a byte counter, SOCI's type mapping, `MarshalText` in
UTC) as produced by the Go program below. `tests/unit/test_toc.py` checks `TocBuilder`
against it, so CI verifies agreement with Go without a Go toolchain. Regenerate (needs `go`):

    python -m tests.support.tar_go_corpus [--go /usr/lib/go-1.19/bin/go]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DATA_FILE = Path(__file__).parent / "data" / "tar_go_corpus.jsonl"
CASES = 600

END = bytes(1024)


def octal(value: int, width: int) -> bytes:
    return f"{value:0{width - 1}o}".encode() + b"\0"


def base256(value: int, width: int) -> bytes:
    raw = value.to_bytes(width, "big", signed=True)
    return bytes([raw[0] | 0x80]) + raw[1:]


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def fix_checksum(block: bytearray, signed: bool = False) -> None:
    """Write the header checksum of `block` (unsigned sum, or signed as old tars did)."""
    block[148:156] = b" " * 8
    total = sum(b - 256 if signed and b >= 128 else b for b in block)
    if total >= 0:
        block[148:156] = f"{total:06o}".encode() + b"\0 "


def header(
    name: bytes = b"file",
    *,
    typeflag: bytes = b"0",
    size: int | bytes = 0,
    magic: bytes = b"ustar\x0000",
    linkname: bytes = b"",
    fields: dict[int, bytes] | None = None,
    signed_checksum: bool = False,
    checksum: bytes | None = None,
) -> bytes:
    """One 512-byte header block; `fields` overwrite raw bytes at their offsets."""
    block = bytearray(512)

    def put(offset: int, value: bytes) -> None:
        block[offset : offset + len(value)] = value

    put(0, name)
    put(100, octal(0o644, 8))
    put(108, octal(1000, 8))
    put(116, octal(1000, 8))
    put(124, size if isinstance(size, bytes) else octal(size, 12))
    put(136, octal(1_600_000_000, 12))
    put(156, typeflag)
    put(157, linkname)
    put(257, magic)
    if magic.startswith(b"ustar"):
        put(265, b"user")
        put(297, b"group")
        put(329, octal(0, 8))
        put(337, octal(0, 8))
    for offset, value in (fields or {}).items():
        put(offset, value)
    fix_checksum(block, signed_checksum)
    if checksum is not None:
        block[148:156] = checksum
    return bytes(block)


def pax_payload(records: dict[bytes, bytes]) -> bytes:
    body = b""
    for key, value in records.items():
        rec = b" " + key + b"=" + value + b"\n"
        length = len(rec) + 1
        while len(str(length).encode() + rec) != length:
            length += 1
        body += str(length).encode() + rec
    return body


def pax(
    records: dict[bytes, bytes] | bytes, typeflag: bytes = b"x", name: bytes = b"PaxHeaders/x"
) -> bytes:
    """A PAX extension header (`x`, or `g` for global) with its padded payload."""
    body = pax_payload(records) if isinstance(records, dict) else records
    return header(name, typeflag=typeflag, size=len(body)) + pad(body)


def gnu_long(kind: bytes, value: bytes) -> bytes:
    """A GNU `L` (long name) or `K` (long link) record with its padded payload."""
    payload = value + b"\0"
    return header(b"././@LongLink", typeflag=kind, size=len(payload), magic=b"ustar  \0") + pad(
        payload
    )


def _data(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def seeds() -> list[bytes]:
    """Hand-built archives covering the header formats and extension records."""
    gnu = b"ustar  \0"
    return [
        # plain ustar: files, dirs, links, devices, fifo, prefix
        header(b"a.txt", size=700)
        + pad(_data(1, 700))
        + header(b"dir/", typeflag=b"5")
        + header(b"sym", typeflag=b"2", linkname=b"a.txt")
        + header(b"hard", typeflag=b"1", linkname=b"a.txt")
        + header(b"chr", typeflag=b"3", fields={329: octal(5, 8), 337: octal(1, 8)})
        + header(b"blk", typeflag=b"4", fields={329: octal(8, 8), 337: octal(0, 8)})
        + header(b"fifo", typeflag=b"6")
        + header(b"name", fields={345: b"some/long/prefix"})
        + END,
        # GNU: long name and link records, base-256 numbers, negative mtime
        gnu_long(b"L", b"d" * 150 + b"/file")
        + header(b"d" * 99, size=513, magic=gnu, fields={108: base256(3_000_000_000, 8)})
        + pad(_data(2, 513))
        + gnu_long(b"K", b"t" * 200)
        + header(b"link", typeflag=b"2", magic=gnu, fields={136: base256(-86_400, 12)})
        + header(b"dev", typeflag=b"3", magic=gnu, fields={329: base256(300, 8)})
        + END,
        # PAX: overrides, xattrs, fractional and negative times, size override
        pax(
            {
                b"path": b"p\xc3\xa9/long/" + b"n" * 120,
                b"mtime": b"1700000000.123456789",
                b"SCHILY.xattr.user.k": b"v\x00w",
                b"uid": b"70000",
            }
        )
        + header(b"short", size=5)
        + pad(b"hello")
        + pax({b"size": b"600", b"mtime": b"-1.5", b"linkpath": b""})
        + header(b"sized", size=0)
        + pad(_data(3, 600))
        + pax({b"linkpath": b"target/" + b"x" * 110, b"gname": b"\xff\xfe"})
        + header(b"sym2", typeflag=b"2")
        + END,
        # legacy V7 headers and the '\0' typeflag
        header(b"old/dir/", typeflag=b"\0", magic=b"")
        + header(b"old/file", typeflag=b"\0", size=3, magic=b"")
        + pad(b"abc")
        + END,
        # star prefix, pre-Go-1.8 GNU prefix fallback, signed checksum
        header(b"name", fields={345: b"star/pre", 476: octal(5, 12), 508: b"tar\0"})
        + header(b"name", magic=gnu, fields={345: b"old/go/prefix"})
        + header("naïve-€".encode(), signed_checksum=True)
        + END,
        # only the last PAX record set applies; GNU names win over PAX ones
        pax({b"path": b"first"})
        + pax({b"path": b"second"})
        + header(b"h")
        + gnu_long(b"L", b"gnu/name")
        + pax({b"path": b"pax/name"})
        + header(b"h2")
        + END,
        # no end marker, single zero block, record padding
        header(b"a", size=5) + pad(b"hello"),
        header(b"a", size=5) + pad(b"hello") + bytes(512),
        header(b"a", size=5) + pad(b"hello") + END + bytes(8192),
        # whiteouts and a header-only type with a size field
        header(b".wh.gone")
        + header(b"dir/.wh..wh..opq")
        + header(b"hl", typeflag=b"1", linkname=b"a", size=1000)
        + header(b"next")
        + END,
    ]


_INTERESTING = [
    b"\0", b" ", b"0", b"1", b"7", b"8", b"\x80", b"\xff", b"\x40", b"/", b"x", b"g", b"L",
    b"K", b"S", b"5", b"2", b"-", b"+", b"=", b"\n", b"9",
]  # fmt: skip
_HOT_SPOTS = [(0, 100), (100, 8), (124, 12), (136, 12), (156, 1), (257, 8), (345, 24), (508, 4)]


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to three random damages to `data` (see the module docstring)."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        choice = rng.random()
        blocks = len(out) // 512
        if choice < 0.6 and blocks:
            index = rng.randrange(min(blocks, 12))
            block = out[index * 512 : (index + 1) * 512]
            for _ in range(rng.randint(1, 4)):
                if rng.random() < 0.3:
                    pos = rng.randrange(512)
                else:
                    start, length = rng.choice(_HOT_SPOTS)
                    pos = start + rng.randrange(length)
                value = (
                    rng.choice(_INTERESTING) if rng.random() < 0.8 else bytes([rng.randrange(256)])
                )
                block[pos : pos + 1] = value
            if rng.random() < 0.85:
                fix_checksum(block, signed=rng.random() < 0.1)
            out[index * 512 : (index + 1) * 512] = block
        elif choice < 0.75:
            cut = rng.randrange(len(out) + 1)
            if rng.random() < 0.5:
                cut = cut // 512 * 512 + rng.choice([0, 0, 1, 5, 511])
            del out[cut:]
        elif choice < 0.85 and blocks:
            at = rng.randrange(blocks + 1) * 512
            out[at:at] = bytes(512 * rng.randint(1, 2))
        elif blocks > 2:
            pos = 512 + rng.randrange(1024)
            out[pos : pos + 1] = rng.choice(_INTERESTING)
    return bytes(out)


def corpus(cases: int = CASES) -> Iterator[tuple[str, bytes]]:
    """(case id, tar stream): every seed unchanged, then `cases` seeded mutations."""
    base = seeds()
    for i, data in enumerate(base):
        yield f"seed-{i}", data
    for i in range(cases):
        rng = random.Random(i)
        yield f"mut-{i}", mutate(rng.choice(base), rng)


def entries_digest(entries: list[dict[str, Any]]) -> str:
    """sha256 of the canonical JSON of entry records (strings as hex of their bytes)."""
    canonical = json.dumps(entries, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def hexs(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").hex()


# --- regeneration with Go ------------------------------------------------------------------------

GO_PROGRAM = r"""
package main

import (
	"archive/tar"
	"bufio"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"sort"
)

type tracker struct {
	r   io.Reader
	pos int64
}

func (p *tracker) Read(b []byte) (int, error) {
	n, err := p.r.Read(b)
	p.pos += int64(n)
	return n, err
}

func h(s string) string { return hex.EncodeToString([]byte(s)) }

func main() {
	pt := &tracker{r: bufio.NewReader(os.Stdin)}
	tr := tar.NewReader(pt)
	entries := []map[string]interface{}{}
	types := map[byte]string{'0': "reg", '1': "hardlink", '2': "symlink", '3': "char",
		'4': "block", '5': "dir", '6': "fifo"}
	out := map[string]interface{}{}
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			out["ok"] = true
			out["size"] = pt.pos
			break
		}
		if err != nil {
			out["ok"] = false
			out["error"] = err.Error()
			break
		}
		t, known := types[hdr.Typeflag]
		if !known {
			out["ok"] = false
			out["error"] = "unsupported input tar entry " + string([]byte{hdr.Typeflag})
			break
		}
		mt, _ := hdr.ModTime.MarshalText()
		keys := []string{}
		for k := range hdr.PAXRecords {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		pax := [][2]string{}
		for _, k := range keys {
			pax = append(pax, [2]string{h(k), h(hdr.PAXRecords[k])})
		}
		entries = append(entries, map[string]interface{}{
			"name": h(hdr.Name), "type": t, "linkname": h(hdr.Linkname), "uname": h(hdr.Uname),
			"gname": h(hdr.Gname), "mod_time": string(mt), "offset": pt.pos, "size": hdr.Size,
			"mode": hdr.Mode, "uid": uint32(hdr.Uid), "gid": uint32(hdr.Gid),
			"devmajor": hdr.Devmajor, "devminor": hdr.Devminor, "pax": pax,
		})
	}
	out["entries"] = entries
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


def regenerate(go: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp)
        (src / "main.go").write_text(GO_PROGRAM)
        (src / "go.mod").write_text("module gotoc\n\ngo 1.19\n")
        env = dict(os.environ, GOCACHE=str(src / "cache"), GOFLAGS="-mod=mod", CGO_ENABLED="0")
        subprocess.run([go, "build", "-o", "gotoc", "."], cwd=src, env=env, check=True)
        lines = []
        for case, data in corpus():
            run = subprocess.run(
                [str(src / "gotoc")], input=data, capture_output=True, env={"TZ": "UTC"}, check=True
            )
            result = json.loads(run.stdout)
            record: dict[str, Any] = {"case": case, "ok": result["ok"]}
            if result["ok"]:
                record["size"] = result["size"]
                record["entries"] = len(result["entries"])
                record["digest"] = entries_digest(result["entries"])
            else:
                record["error"] = result["error"]
            lines.append(json.dumps(record, sort_keys=True))
    DATA_FILE.parent.mkdir(exist_ok=True)
    DATA_FILE.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} cases to {DATA_FILE}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--go", default=shutil.which("go") or "/usr/lib/go-1.19/bin/go")
    regenerate(parser.parse_args().go)


if __name__ == "__main__":
    main()
