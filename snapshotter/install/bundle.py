"""`make dist`'s tarball: `sociable-<version>-<arch>.tar.gz` holding one directory with the
wheelhouse, the systemd units, the docs and `install.sh` (what EKS user data downloads).

    python -m snapshotter.install.bundle --wheelhouse dist/wheelhouse --out dist

`install.sh` runs `python -m snapshotter.install install` straight from the wheels (ours and
tomlkit's, both pure Python) with the node's Python 3.11+, so installing needs no venv, pip
download or compiler before the venv it makes.
"""

from __future__ import annotations

import argparse
import io
import platform
import sys
import tarfile
from pathlib import Path
from typing import Final

from .venv import Wheelhouse

INSTALL_SH: Final = """\
#!/bin/sh
# Installs sociable on this node from this bundle (docs/install.md). Run as root; the flags
# are those of `sociable-snapshotter install` (--dry-run, --prefix DIR, --now, ...).
# PYTHON names the Python 3.11+ to use (default python3).
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "install.sh: $python is not Python 3.11 or newer (set PYTHON)" >&2
  exit 1
fi
path=""
for wheel in "$here"/wheelhouse/sociable-*.whl "$here"/wheelhouse/tomlkit-*.whl; do
  path="$path${path:+:}$wheel"
done
PYTHONPATH="$path" exec "$python" -s -m snapshotter.install install \\
  --wheelhouse "$here/wheelhouse" "$@"
"""

SOURCES: Final = (("systemd", (".service", ".socket")), ("docs", (".md", ".toml")))


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    tar.addfile(info, io.BytesIO(data))


def build(wheelhouse: Path, out_dir: Path, source: Path) -> Path:
    """Write the tarball into `out_dir`; return its path. Raises InstallError (no wheel of
    ours), OSError."""
    wh = Wheelhouse.open(wheelhouse)
    top = f"sociable-{wh.version}-{platform.machine()}"
    out = out_dir / f"{top}.tar.gz"
    with tarfile.open(out, "w:gz") as tar:
        _add_bytes(tar, f"{top}/install.sh", INSTALL_SH.encode(), 0o755)
        for wheel in sorted(wheelhouse.glob("*.whl")):
            _add_bytes(tar, f"{top}/wheelhouse/{wheel.name}", wheel.read_bytes(), 0o644)
        for directory, suffixes in SOURCES:
            for f in sorted((source / directory).iterdir()):
                if f.suffix in suffixes and f.is_file():
                    _add_bytes(tar, f"{top}/{directory}/{f.name}", f.read_bytes(), 0o644)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m snapshotter.install.bundle")
    p.add_argument("--wheelhouse", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    source = Path(__file__).resolve().parents[2]
    print(build(args.wheelhouse, args.out, source))
    return 0


if __name__ == "__main__":
    sys.exit(main())
