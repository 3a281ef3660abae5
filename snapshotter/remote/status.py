"""`sociable-snapshotter status`: the status file of every lazily mounted layer.

Each layer the daemon serves is a directory `<root>/fuse/snap-<id>` whose hidden
`.sociable/status.json` the FUSE host renders on every read (fetched bytes and percent,
bytes served, read errors, last error). This reads them from outside the daemon.
"""

from __future__ import annotations

import json
from pathlib import Path

from snapshotter.fs import STATE_DIR_NAME, STATUS_FILE_NAME


def layer_statuses(root: Path) -> list[str]:
    """One JSON line per mounted layer (`{"fuseDir": name, ...status}`), sorted by name.

    A layer whose status cannot be read gets `{"fuseDir": name, "error": "..."}`. An
    absent or unmounted `<root>/fuse` gives an empty list. Never raises.
    """
    fuse = root / "fuse"
    try:
        names = sorted(p.name for p in fuse.iterdir() if p.name.startswith("snap-"))
    except OSError:
        return []
    out: list[str] = []
    for name in names:
        try:
            doc = json.loads(
                (fuse / name / STATE_DIR_NAME.decode() / STATUS_FILE_NAME.decode()).read_bytes()
            )
        except (OSError, ValueError) as e:
            doc = {"error": str(e)}
        out.append(json.dumps({"fuseDir": name, **doc}, sort_keys=True))
    return out
