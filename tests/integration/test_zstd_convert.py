"""`sociable create` on zstd images: what each layer got, with and without `--zstd`.

The layout holds a gzip layer, a zstd:chunked and a plain zstd layer from skopeo, a seekable
layer written here, and a layer under `--min-layer-size`; no registry, no root. Each layer's
line on stderr must say what was done, and `ztoc info` must name the zstd kinds; a
zstd:chunked layer whose tar was cut short (its diffID no longer matches the config) fails
alone."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from tests.support import images, zstdimages
from tests.support.cli import sociable
from tests.support.images import Dir, File

MIN = 100_000


def _layer_tars(scratch: Path) -> list[bytes]:
    specs: list[list[images.Entry]] = [
        [Dir(path="gz"), File(path="gz/a.bin", size=300_000)],
        [Dir(path="ch"), File(path="ch/b.bin", size=400_000), File(path="ch/t", data=b"t" * 9)],
        [Dir(path="pl"), File(path="pl/c.bin", size=300_000)],
        [Dir(path="sk"), File(path="sk/d.bin", size=500_000)],
        [File(path="tiny", data=b"tiny\n")],
    ]
    return [zstdimages.unpadded_tar(spec, scratch) for spec in specs]


@pytest.fixture(scope="module")
def layout(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[images.Image, list[str], dict[str, bytes]]:
    if shutil.which("skopeo") is None:
        pytest.fail("skopeo is part of the test machine (scripts/setup.sh)")
    base = tmp_path_factory.mktemp("zstd-convert")
    tars = _layer_tars(base / "scratch")
    (base / "ch").mkdir()
    (base / "pl").mkdir()
    [chunked] = zstdimages.chunked_layers([tars[1]], base / "ch", "zstd:chunked")
    [plain] = zstdimages.chunked_layers([tars[2]], base / "pl", "zstd")
    blobs = base / "hand"
    blobs.mkdir()
    gz_blob = gzip.compress(tars[0], mtime=0)
    gz_layer = zstdimages.ZstdLayer(
        blobs / "gz",
        "sha256:" + hashlib.sha256(gz_blob).hexdigest(),
        "sha256:" + hashlib.sha256(tars[0]).hexdigest(),
        len(gz_blob),
        images.MEDIA_LAYER_GZIP,
    )
    gz_layer.path.write_bytes(gz_blob)
    seekable = zstdimages.hand_layer(tars[3], blobs, "seekable", frame_size=64 * 1024)
    tiny = zstdimages.hand_layer(tars[4], blobs, "multi-frame", frame_size=1024)
    layers = [gz_layer, chunked, plain, seekable, tiny]
    image = zstdimages.write_zstd_image(base / "layout", layers, tag="v1")
    with tarfile.open(fileobj=io.BytesIO(tars[1])) as tf:
        member = tf.extractfile("ch/b.bin")
        assert member is not None
        contents = {"ch/b.bin": member.read()}
    return image, [lyr.digest for lyr in layers], contents


def _lines(stderr: str) -> dict[str, str]:
    """Layer digest -> its report line."""
    out: dict[str, str] = {}
    for line in stderr.splitlines():
        for word in line.split():
            word = word.strip(":(),")
            if word.startswith("sha256:") and len(word) == 71:
                out.setdefault(word, line)
                break
    return out


def test_each_layer_says_what_was_done(
    layout: tuple[images.Image, list[str], dict[str, bytes]], tmp_path: Path
) -> None:
    image, digests, _ = layout
    gz, chunked, plain, seekable, tiny = digests
    src = f"oci-layout:{image.layout}:v1"
    args = ("create", "--min-layer-size", str(MIN), "--span-size", "131072")
    proc = sociable(*args, "--zstd", src, root=tmp_path / "with")
    lines = _lines(proc.stderr)
    assert "indexed gzip" in lines[gz]
    assert "indexed zstd:chunked" in lines[chunked]
    assert "indexed seekable zstd" in lines[seekable]
    assert "plain zstd" in lines[plain] and "unpacked when pulled" in lines[plain]
    assert "less than min-layer-size" in lines[tiny]
    assert "3 ztocs" in proc.stdout
    kinds = set()
    for z in sociable("ztoc", "list", "-q", root=tmp_path / "with").stdout.split():
        info = json.loads(sociable("ztoc", "info", z, root=tmp_path / "with").stdout)
        kinds.add(info.get("compression", "gzip"))
        assert info["num_spans"] >= 2 and info["span_size"] == 131072
        if info.get("compression") == "zstd:chunked":
            # One file out of the blob through the zTOC's spans (`ztoc get-file`).
            blob = image.layout / "blobs" / "sha256" / chunked.removeprefix("sha256:")
            out = tmp_path / "b.bin"
            sociable(
                "ztoc",
                "get-file",
                z,
                "ch/b.bin",
                "-o",
                str(out),
                "--layer-file",
                str(blob),
                root=tmp_path / "with",
            )
            assert out.read_bytes() == layout[2]["ch/b.bin"]
    assert kinds == {"gzip", "zstd:chunked", "seekable zstd"}

    proc = sociable(*args, src, root=tmp_path / "without")
    lines = _lines(proc.stderr)
    assert "indexed gzip" in lines[gz] and "1 ztocs" in proc.stdout
    for d in (chunked, plain, seekable):
        assert "indexed only with --zstd" in lines[d]


def test_a_chunked_layer_that_lost_bytes_fails_alone(tmp_path: Path) -> None:
    """A tar with record padding: Debian 12's skopeo drops the bytes after the tar's end, so
    the zstd:chunked layer no longer decodes to the config's diffID."""
    scratch = tmp_path / "scratch"
    tar = zstdimages.unpadded_tar([Dir(path="x"), File(path="x/y", size=200_000)], scratch)
    padded = tar + bytes(4096)
    (tmp_path / "ch").mkdir()
    [layer] = zstdimages.chunked_layers([padded], tmp_path / "ch", "zstd:chunked")
    ok = zstdimages.hand_layer(tar, tmp_path / "hand", "multi-frame", frame_size=50_000)
    image = zstdimages.write_zstd_image(tmp_path / "layout", [layer, ok], tag="v1")
    proc = sociable(
        "create",
        "--zstd",
        "--min-layer-size",
        "0",
        f"oci-layout:{image.layout}:v1",
        root=tmp_path / "root",
    )
    lines = _lines(proc.stderr)
    assert "ztoc failed" in lines[layer.digest] and "image config says" in lines[layer.digest]
    assert "indexed multi-frame zstd" in lines[ok.digest] and "1 ztocs" in proc.stdout
