"""`tests.bench.bench_inflate` on a small layer: both libraries, the same bytes, one table."""

from __future__ import annotations

import gzip
import io
import random
import tarfile
from pathlib import Path

import pytest

from tests.bench import bench_inflate


def test_the_inflation_benchmark_compares_both_libraries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(5)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        for i in range(40):
            data = b"".join(b"%d line of text\n" % rng.randrange(1000) for _ in range(3000))
            info = tarfile.TarInfo(f"f{i}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    blob = tmp_path / "layer.gz"
    blob.write_bytes(gzip.compress(raw.getvalue(), mtime=0))
    argv = ["--blob", str(blob), "--span-size", "65536", "--rounds", "1"]
    assert bench_inflate.main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| zlib")]
    assert [row.split("|")[1].split()[0] for row in rows] == ["zlib", "zlib-ng"]
    assert rows[0].endswith("| 1.00x |")
