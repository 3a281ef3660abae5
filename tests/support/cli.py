"""Run the two command lines as a user does (a subprocess of this interpreter), and check a
layer's files through its zTOC. Shared by the CLI, lazy-pull and error tests."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

from index.extract import extract_file
from index.zinfo import SpanMap
from index.ztoc_codec import decode_ztoc

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("SOCIABLE_DEBUG", None)
    return env


def sociable(
    *args: str, root: Path, check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """`sociable --root ROOT ARGS...`; with `check`, a non-zero exit fails the test (stderr shown)."""
    proc = subprocess.run(
        [sys.executable, "-m", "index.cli", "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        cwd=REPO,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"sociable {' '.join(args)} failed:\n{proc.stderr}")
    return proc


def snapshotter_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`sociable-snapshotter ARGS...` (for commands that exit: config, errors)."""
    return subprocess.run(
        [sys.executable, "-m", "snapshotter.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        cwd=REPO,
        check=False,
    )


def check_layer_files(layer_path: Path, ztoc_bytes: bytes) -> int:
    """Assert every regular file of the gzip layer, extracted through the zTOC and its spans,
    equals what tarfile reads; return how many files were compared."""
    ztoc = decode_ztoc(ztoc_bytes)
    spans = SpanMap.from_ztoc(ztoc)
    assert spans.span_count >= 1
    data = layer_path.read_bytes()

    def read(start: int, end: int) -> bytes:
        return data[start:end]

    count = 0
    with tarfile.open(layer_path, "r:gz") as tf:
        for member in tf:
            if not member.isreg():
                continue
            expected = tf.extractfile(member).read()  # type: ignore[union-attr]
            assert extract_file(ztoc, member.name, read) == expected, member.name
            count += 1
    return count
