"""Status of lazy loading: the daemon's `<root>/status.json` and the layers' status files.

The daemon writes `<root>/status.json` (atomically) when it starts and whenever what it says
changes: its pid, whether lazy layers are `enabled`, `disabled` (config) or `degraded` (with
the component that failed to start and its error), per mounted layer the errors its tasks
met and where its bytes came from (`bytesFrom`: cache, peers, registry), the layers whose
restore failed, and with peers on a `peers` section (this node's address, the members and
each one's state, what was fetched from and served to peers). Each mounted layer is also a directory
`<root>/fuse/snap-<id>` whose hidden `.sociable/status.json` the FUSE host renders on every
read (fetched bytes and percent, bytes served, read errors, last read error).

`status_report(root)` is `sociable-snapshotter status`: JSON lines on stdout (one per layer,
the daemon's state when it is not `enabled`, the peers summary and one line per member, one
per failed restore) and, when there is
nothing to show, one note saying why.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from index.fsutil import atomic_write
from snapshotter.errors import SnapshotterError
from snapshotter.fs import STATE_DIR_NAME, STATUS_FILE_NAME

DAEMON_STATUS_FILE = "status.json"


class StatusError(SnapshotterError):
    """`<root>/status.json` exists but cannot be read or parsed."""


def write_daemon_status(root: Path, doc: Mapping[str, object]) -> None:
    """Replace `<root>/status.json` with `doc` and this process's pid. Raises OSError."""
    data = json.dumps({"pid": os.getpid(), **doc}, sort_keys=True).encode() + b"\n"
    atomic_write(root / DAEMON_STATUS_FILE, data)


def remove_daemon_status(root: Path) -> None:
    """Remove `<root>/status.json` (clean shutdown). Never raises."""
    with contextlib.suppress(OSError):
        (root / DAEMON_STATUS_FILE).unlink(missing_ok=True)


def read_daemon_status(root: Path) -> dict[str, object] | None:
    """The daemon's status document, None when there is none. Raises StatusError."""
    path = root / DAEMON_STATUS_FILE
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise StatusError(f"cannot read {path}: {e}") from e
    if not isinstance(doc, dict):
        raise StatusError(f"{path} is not a JSON object")
    return doc


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def layer_statuses(root: Path) -> list[dict[str, object]]:
    """The status file of every layer under `<root>/fuse` (`{"fuseDir": name, ...}`), sorted
    by name. A layer whose status cannot be read gets `{"fuseDir": name, "error": "..."}`. An
    absent or unmounted `<root>/fuse` gives an empty list. Never raises."""
    fuse = root / "fuse"
    try:
        names = sorted(p.name for p in fuse.iterdir() if p.name.startswith("snap-"))
    except OSError:
        return []
    out: list[dict[str, object]] = []
    for name in names:
        try:
            doc = json.loads(
                (fuse / name / STATE_DIR_NAME.decode() / STATUS_FILE_NAME.decode()).read_bytes()
            )
        except (OSError, ValueError) as e:
            doc = {"error": str(e)}
        out.append({"fuseDir": name, **doc})
    return out


@dataclass
class StatusReport:
    """What `sociable-snapshotter status` prints: `lines` (JSON) on stdout, `note` (text,
    when there is nothing to show) on stderr."""

    lines: list[str] = field(default_factory=list)
    note: str = ""


def status_report(root: Path) -> StatusReport:
    """See the module doc. Raises StatusError (unreadable `<root>/status.json`)."""
    daemon = read_daemon_status(root)
    if daemon is None:
        return StatusReport(note=f"no daemon is serving {root} (no {root / DAEMON_STATUS_FILE})")
    pid = daemon.get("pid")
    if not _alive(pid):
        return StatusReport(note=f"no daemon is serving {root} (pid {pid} is not running)")
    report = StatusReport()
    state = daemon.get("lazyLayers")
    if state != "enabled":
        doc = {k: v for k, v in daemon.items() if k in ("lazyLayers", "component", "error")}
        report.lines.append(json.dumps(doc, sort_keys=True))
    tasks = daemon.get("layers")
    task_docs: Mapping[str, object] = tasks if isinstance(tasks, dict) else {}
    for layer in layer_statuses(root):
        extra = task_docs.get(str(layer["fuseDir"]))
        if isinstance(extra, dict):
            layer = {**layer, **{k: v for k, v in extra.items() if k != "digest"}}
        report.lines.append(json.dumps(layer, sort_keys=True))
    peers = daemon.get("peers")
    if isinstance(peers, dict):
        members = peers.get("members")
        summary = {k: v for k, v in peers.items() if k != "members"}
        report.lines.append(json.dumps({"peers": summary}, sort_keys=True))
        for member in members if isinstance(members, list) else []:
            report.lines.append(json.dumps(member, sort_keys=True))
    failed = daemon.get("restoreFailed")
    if isinstance(failed, dict):
        for name, why in sorted(failed.items()):
            report.lines.append(json.dumps({"fuseDir": name, "restoreFailed": why}))
    if not report.lines:
        report.note = "no lazy layers mounted"
    return report
