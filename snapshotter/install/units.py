"""The files `install` copies from the bundle (or the source checkout): every systemd unit
of `systemd/`, the documentation, containerd's ordering drop-in, a first config file.

A unit's own paths are checked, not rewritten: its `ExecStart` must run a program `install`
links into `/usr/local/bin`, and every `file://` of its `Documentation` must be a page
`install` puts under `/usr/share/doc/sociable/`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Final

from ..errors import SnapshotterError
from .files import FileChange, read_bytes
from .layout import BIN_DIR, CONFIG, CONTAINERD_DROPIN, DOC_DIR, PROGRAMS, UNIT_DIR, Layout

UNIT_SUFFIXES: Final = (".service", ".socket")
DOC_SUFFIXES: Final = (".md", ".toml")
SERVICE: Final = "sociable-snapshotter.service"

CONTAINERD_DROPIN_TEXT: Final = f"""\
# Installed by sociable-snapshotter install: start the snapshotter with containerd, and
# containerd after it (a Type=notify service is started once it serves).
[Unit]
Wants={SERVICE}
After={SERVICE}
"""

CONFIG_TEXT: Final = """\
# sociable-snapshotter configuration (/usr/share/doc/sociable/configuration.md).
# Empty: every key has its default; `sociable-snapshotter config default` prints them all.
"""


class InstallError(SnapshotterError):
    """`install` or `uninstall` cannot go on: no bundle files, a unit whose paths do not
    match what is installed, a wheelhouse without our wheel, a failed pip or systemctl."""


def source_dir(wheelhouse: Path) -> Path:
    """The directory holding `systemd/` and `docs/`: the bundle the wheelhouse is part of,
    else the source checkout this program runs from. Raises InstallError."""
    checkout = Path(__file__).resolve().parents[2]
    for candidate in (wheelhouse.resolve().parent, checkout):
        if (candidate / "systemd").is_dir() and (candidate / "docs").is_dir():
            return candidate
    raise InstallError(
        f"no systemd/ and docs/ next to {wheelhouse} (a bundle from `make dist` has them)"
    )


def _files(directory: Path, suffixes: Iterable[str]) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix in suffixes and p.is_file())


_EXEC = re.compile(r"^ExecStart=[-@:+!]*(\S+)", re.MULTILINE)
_DOC_FILE = re.compile(r"file://(/\S+)")


def check_unit(name: str, text: str, docs: set[PurePosixPath]) -> None:
    """Raises InstallError when unit `name` runs or documents a path install does not make."""
    for program in _EXEC.findall(text):
        path = PurePosixPath(program)
        if path.parent != BIN_DIR or path.name not in PROGRAMS:
            raise InstallError(
                f"{name}: ExecStart runs {program}; install links only "
                f"{', '.join(str(BIN_DIR / p) for p in PROGRAMS)}"
            )
    for line in text.splitlines():
        if line.startswith("Documentation="):
            for doc in _DOC_FILE.findall(line):
                if PurePosixPath(doc) not in docs:
                    raise InstallError(f"{name}: Documentation {doc} is not installed")


def plan_files(layout: Layout, source: Path) -> list[FileChange]:
    """The docs, units, drop-in and first config, each as a change (unchanged ones too).
    Reads only; raises InstallError, OSError."""
    changes: list[FileChange] = []
    docs = _files(source / "docs", DOC_SUFFIXES)
    doc_paths = {DOC_DIR / d.name for d in docs}
    for doc in docs:
        changes.append(_change(layout, DOC_DIR / doc.name, doc.read_bytes()))
    units = _files(source / "systemd", UNIT_SUFFIXES)
    if not any(u.name == SERVICE for u in units):
        raise InstallError(f"{source / 'systemd'} has no {SERVICE}")
    for unit in units:
        data = unit.read_bytes()
        check_unit(unit.name, data.decode("utf-8", "replace"), doc_paths)
        changes.append(_change(layout, UNIT_DIR / unit.name, data))
    changes.append(_change(layout, CONTAINERD_DROPIN, CONTAINERD_DROPIN_TEXT.encode()))
    config = layout(CONFIG)
    if not config.exists():
        changes.append(FileChange(config, None, CONFIG_TEXT.encode()))
    return changes


def unit_names(changes: Iterable[FileChange]) -> list[str]:
    """The names of the units among `changes` (what systemctl enables)."""
    return [c.path.name for c in changes if c.path.suffix in UNIT_SUFFIXES]


def _change(layout: Layout, node_path: PurePosixPath, data: bytes) -> FileChange:
    path = layout(node_path)
    return FileChange(path, read_bytes(path), data)


__all__ = [
    "CONFIG_TEXT",
    "CONTAINERD_DROPIN_TEXT",
    "SERVICE",
    "InstallError",
    "check_unit",
    "plan_files",
    "source_dir",
    "unit_names",
]
