"""Restore records: what re-mounting a lazy layer after a restart needs, one file per layer.

`<root>/remote/snap-<id>.json` holds the image reference, manifest, layer, index and zTOC
digests and the layer's FUSE slot (so inode numbers stay stable across restarts). The zTOC
itself is in the local store, so a restart re-mounts without the registry. Records are
written durably (temporary file, fsync, rename, fsync of the directory): a record that
exists is complete. Blocking file I/O: call from a worker thread.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import trio

from index.fsutil import atomic_write, remove_stale_temps

MOUNT_THREADS = trio.CapacityLimiter(4)
"""Worker threads for the blocking steps of mounting and unmounting lazy layers: mount(2)
and umount2(2) of layer subtrees, restore-record files, cache marks."""


@dataclass(frozen=True, slots=True)
class LayerRecord:
    """What restoring a lazy layer after a restart needs (persisted as JSON)."""

    image_ref: str
    manifest_digest: str
    layer_digest: str
    index_digest: str
    ztoc_digest: str
    slot: int = 0
    local: bool = False
    """The layer's mount was deferred and fell back to a local unpack into its `fs`
    directory: nothing to mount after a restart (its files are there)."""

    def with_slot(self, slot: int) -> LayerRecord:
        return self if slot == self.slot else replace(self, slot=slot)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> LayerRecord:
        """Raises ValueError/TypeError/KeyError for a malformed record."""
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise TypeError(f"a record is a JSON object, not {type(doc).__name__}")
        return cls(**{k: v for k, v in doc.items() if k in cls.__dataclass_fields__})


def layer_name(mountpoint: Path) -> str:
    """FUSE directory name of the layer on snapshot dir `<id>/fs` (also `trash-<id>-<ns>/fs`).

    Raises ValueError when the path is not a snapshot's `fs` directory.
    """
    snap = mountpoint.parent.name
    if snap.startswith("trash-"):
        snap = snap.split("-")[1]
    if mountpoint.name != "fs" or not snap.isdigit():
        raise ValueError(f"{mountpoint} is not a snapshot fs directory")
    return f"snap-{snap}"


class RecordStore:
    """The records directory `<dir>` (created 0700 on construction; raises OSError). The
    daemon is its only writer: temporaries a killed predecessor left are removed here."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        remove_stale_temps(self.dir)

    def __repr__(self) -> str:
        return f"<RecordStore {self.dir}>"

    def _path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def write(self, name: str, record: LayerRecord) -> None:
        """Persist `record` for layer `name` durably. Raises OSError."""
        atomic_write(self._path(name), record.to_json(), durable=True)

    def read(self, name: str) -> LayerRecord | None:
        """The record of layer `name`, None when there is none.

        Raises OSError (unreadable) or ValueError/TypeError/KeyError (malformed).
        """
        try:
            data = self._path(name).read_bytes()
        except FileNotFoundError:
            return None
        return LayerRecord.from_json(data)

    def read_all(self) -> dict[str, LayerRecord]:
        """Every readable record by layer name; unreadable or malformed ones are left out
        (`read` of that name raises). Raises OSError when the directory cannot be listed."""
        out: dict[str, LayerRecord] = {}
        for path in sorted(self.dir.glob("snap-*.json")):
            name = path.name.removesuffix(".json")
            try:
                record = self.read(name)
            except (OSError, ValueError, TypeError, KeyError):
                continue
            if record is not None:
                out[name] = record
        return out

    def remove(self, name: str) -> None:
        """Forget layer `name`'s record; a missing record is fine. Raises OSError."""
        with contextlib.suppress(FileNotFoundError):
            self._path(name).unlink()
