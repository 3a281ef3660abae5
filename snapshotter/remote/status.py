"""Status of lazy loading: the daemon's `<root>/status.json` and the layers' status files.

The daemon writes `<root>/status.json` (atomically) when it starts and whenever what it says
changes: its pid, whether lazy layers are `enabled`, `disabled` (config) or `degraded` (with
the component that failed to start and its error), per mounted layer the errors its tasks
met and where its bytes came from (`bytesFrom`: cache, peers, registry), the layers whose
restore failed, and with peers on a `peers` section (this node's address, the members and
each one's state, what was fetched from and served to peers). Each mounted layer is also a directory
`<root>/fuse/snap-<id>` whose hidden `.sociable/status.json` the FUSE host renders on every
read (fetched bytes and percent, bytes served, read errors, last read error).

`sociable-snapshotter status` reads both (`read_status`): by default a table
(`render_table`: the daemon's state, one row per lazy layer with its image, short digest,
fetched percent, bytes from cache, peers and registry and its errors, the peers summary, the
failed restores); with `--json` the JSON lines of `status_report` (one per layer, the
daemon's state when it is not `enabled`, the peers summary and one line per member, one per
failed restore) and, when there is nothing to show, one note saying why. No daemon (no
`<root>/status.json`, or its pid is gone) is `DaemonNotRunning`.
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


class DaemonNotRunning(SnapshotterError):
    """No daemon serves the root: no `<root>/status.json`, or the pid it names is gone."""


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
class DaemonStatus:
    """What `status` shows: the daemon's document (`<root>/status.json`) and each layer's
    status file merged with what the daemon says about it (keys as in the JSON lines)."""

    root: Path
    daemon: dict[str, object]
    layers: list[dict[str, object]]


def read_status(root: Path) -> DaemonStatus:
    """The status of the daemon serving `root`. Raises DaemonNotRunning, StatusError."""
    daemon = read_daemon_status(root)
    if daemon is None:
        raise DaemonNotRunning(f"no daemon is serving {root} (no {root / DAEMON_STATUS_FILE})")
    pid = daemon.get("pid")
    if not _alive(pid):
        raise DaemonNotRunning(f"no daemon is serving {root} (pid {pid} is not running)")
    tasks = daemon.get("layers")
    task_docs: Mapping[str, object] = tasks if isinstance(tasks, dict) else {}
    layers = []
    for layer in layer_statuses(root):
        extra = task_docs.get(str(layer["fuseDir"]))
        if isinstance(extra, dict):
            layer = {**layer, **{k: v for k, v in extra.items() if k != "digest"}}
        layers.append(layer)
    return DaemonStatus(root, daemon, layers)


@dataclass
class StatusReport:
    """What `sociable-snapshotter status --json` prints: `lines` (JSON) on stdout, `note`
    (text, when there is nothing to show) on stderr."""

    lines: list[str] = field(default_factory=list)
    note: str = ""


def status_report(root: Path) -> StatusReport:
    """See the module doc. Raises DaemonNotRunning, StatusError."""
    return json_report(read_status(root))


def json_report(status: DaemonStatus) -> StatusReport:
    """The JSON lines of `status` (see the module doc)."""
    daemon = status.daemon
    report = StatusReport()
    state = daemon.get("lazyLayers")
    if state != "enabled":
        doc = {k: v for k, v in daemon.items() if k in ("lazyLayers", "component", "error")}
        report.lines.append(json.dumps(doc, sort_keys=True))
    for layer in status.layers:
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


# -- the table ----------------------------------------------------------------------------------

SHORT_DIGEST_HEX = 12
"""Hex digits of a layer digest the table shows."""


def human_bytes(n: object) -> str:
    """`1.5 MiB` for 1572864; `-` for what is not a number of bytes."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def short_digest(digest: object) -> str:
    """`ab12cd34ef56` for `sha256:ab12cd34ef56…`; `-` when there is none."""
    text = str(digest or "")
    if not text:
        return "-"
    return text.partition(":")[2][:SHORT_DIGEST_HEX] or text[:SHORT_DIGEST_HEX]


def _int(doc: Mapping[str, object], key: str) -> int:
    value = doc.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _layer_row(layer: Mapping[str, object]) -> list[str]:
    raw_from = layer.get("bytesFrom")
    got: Mapping[str, object] = raw_from if isinstance(raw_from, dict) else {}
    percent = layer.get("fetchedPercent")
    errors = sum(_int(layer, k) for k in ("readErrors", "fetchErrors", "taskErrors"))
    return [
        str(layer.get("fuseDir", "?")),
        str(layer.get("image") or "-"),
        short_digest(layer.get("digest")),
        f"{percent:.1f}%" if isinstance(percent, int | float) else "-",
        human_bytes(layer.get("totalSize")),
        human_bytes(got.get("cache")) if got else "-",
        human_bytes(got.get("peers")) if got else "-",
        human_bytes(got.get("registry")) if got else "-",
        str(errors),
    ]


_HEADER = ["LAYER", "IMAGE", "DIGEST", "FETCHED", "SIZE", "CACHE", "PEERS", "REGISTRY", "ERRORS"]
_RIGHT = frozenset({3, 4, 5, 6, 7, 8})


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = [
            cell.rjust(w) if i in _RIGHT else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
    return out


def _daemon_line(status: DaemonStatus) -> str:
    d = status.daemon
    state = d.get("lazyLayers", "?")
    line = f"daemon: pid {d.get('pid')}, serving {status.root}, lazy layers {state}"
    if state == "degraded":
        line += f" ({d.get('component')}: {d.get('error')})"
    elif state == "disabled":
        line += " (config)"
    n = len(status.layers)
    return line + f", {n} mounted" if state == "enabled" else line


def _peers_line(peers: Mapping[str, object]) -> str:
    state = peers.get("state", "?")
    if state != "enabled":
        return f"peers: {state}" + (f" ({peers['error']})" if peers.get("error") else "")
    raw = peers.get("members")
    members = [m for m in raw if isinstance(m, dict)] if isinstance(raw, list) else []
    up = sum(1 for m in members if m.get("state") == "up")
    raw_fetch, raw_serve = peers.get("fetch"), peers.get("serve")
    fetch = raw_fetch if isinstance(raw_fetch, dict) else {}
    serve = raw_serve if isinstance(raw_serve, dict) else {}
    return (
        f"peers: {peers.get('advertise', '?')}, {len(members)} members ({up} up, "
        f"{len(members) - up} down), fetched {human_bytes(_int(fetch, 'bytes_fetched'))} from "
        f"peers, served {human_bytes(_int(serve, 'bytes_served'))} to peers"
    )


def render_table(status: DaemonStatus) -> str:
    """`status` as text for a person (see the module doc); ends with a newline."""
    lines = [_daemon_line(status)]
    if status.layers:
        lines.append("")
        lines += _table([_HEADER] + [_layer_row(layer) for layer in status.layers])
        last = [
            (str(layer.get("fuseDir", "?")), str(layer.get(key)))
            for layer in status.layers
            for key in ("error", "lastFetchError", "lastTaskError")
            if layer.get(key)
        ]
        if last:
            lines.append("")
            lines += [f"{name}: last error: {why}" for name, why in last]
    elif status.daemon.get("lazyLayers") == "enabled":
        lines.append("no lazy layers mounted")
    peers = status.daemon.get("peers")
    if isinstance(peers, dict):
        lines += ["", _peers_line(peers)]
        raw = peers.get("members")
        for m in raw if isinstance(raw, list) else []:
            if isinstance(m, dict) and m.get("state") == "down":
                lines.append(f"  {m.get('peer')} down: {m.get('lastError') or '?'}")
    failed = status.daemon.get("restoreFailed")
    if isinstance(failed, dict) and failed:
        lines.append("")
        lines += [f"{name}: restore failed: {why}" for name, why in sorted(failed.items())]
    return "\n".join(lines) + "\n"
