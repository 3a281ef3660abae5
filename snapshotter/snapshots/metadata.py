"""Snapshot metadata stores: a durable sqlite store and an in-memory one.

Both implement `MetaStore` with identical semantics (one conformance suite runs
against each, `tests/unit/test_metadata.py`). Every method is synchronous,
thread-safe, and is exactly one transaction: either all of its effect is
visible afterwards or none of it. Callers on the trio thread run them with
`trio.to_thread.run_sync`.

Crash consistency (sqlite): `create` runs the caller's `materialize` callback
(which builds the snapshot directory) inside the write transaction, before the
commit. A crash before the commit leaves at worst a directory whose id no
committed record owns; `cleanup` reclaims it. Ids come from AUTOINCREMENT, so a
committed id is never handed out again even after its row is deleted.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from ..errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from .model import Info, Kind, Snapshot, SnapshotId, Usage, quote

Materialize = Callable[[Snapshot], None]
"""Called inside `create`'s transaction with the new snapshot; raising aborts it."""

Reclaim = Callable[[frozenset[SnapshotId]], None]
"""Called inside `cleanup`'s transaction with every live id."""


class MetaStore(Protocol):
    """Durable record of snapshots: kinds, parents, labels, timestamps, usage."""

    def get_info(self, key: str) -> Info:
        """Info of `key` (any kind). Raises NotFound."""
        ...

    def get_snapshot(self, key: str) -> Snapshot:
        """Id, kind, parent chain and stored usage of `key`. Raises NotFound."""
        ...

    def create(
        self,
        key: str,
        parent: str,
        kind: Kind,
        labels: Mapping[str, str],
        now_ns: int,
        materialize: Materialize | None = None,
    ) -> Snapshot:
        """Record a new ACTIVE or VIEW snapshot with created == updated == now_ns.

        Raises AlreadyExists (key taken), NotFound (parent missing),
        InvalidArgument (parent not committed, or kind COMMITTED); any exception
        from `materialize` propagates and nothing is recorded.
        """
        ...

    def commit(
        self, name: str, key: str, labels: Mapping[str, str], usage: Usage, now_ns: int
    ) -> Info:
        """Turn ACTIVE `key` into COMMITTED `name`, keeping id and parent.

        Labels are replaced by `labels`; created == updated == now_ns; `usage`
        is stored. Raises AlreadyExists (name taken), NotFound (key missing),
        FailedPrecondition (key not ACTIVE).
        """
        ...

    def remove(self, key: str) -> Snapshot:
        """Delete the record of `key` and return what it was.

        Raises NotFound, FailedPrecondition (it has children). The directory is
        left for `cleanup`.
        """
        ...

    def update(
        self, key: str, labels: Mapping[str, str], paths: Sequence[str], now_ns: int
    ) -> Info:
        """Change labels of `key` following `apply_label_update`; updated = now_ns.

        Raises NotFound, InvalidArgument (a path other than labels/labels.<k>).
        """
        ...

    def list_infos(self) -> list[Info]:
        """Info of every snapshot, ordered by name (a consistent copy)."""
        ...

    def cleanup(self, reclaim: Reclaim) -> None:
        """Call `reclaim(live_ids)` while no other write can run."""
        ...

    def close(self) -> None:
        """Release resources. Idempotent."""
        ...


def apply_label_update(
    current: Mapping[str, str], new: Mapping[str, str], paths: Sequence[str], name: str
) -> dict[str, str]:
    """Compute labels after an Update, following containerd's storage rules.

    No paths or the path `labels` replace all labels with `new`; `labels.<k>`
    sets label k to new[k] (missing means empty). Empty values are deleted.
    Raises InvalidArgument for any other path (name, parent, kind, ...).
    """
    result = dict(current)
    if not paths:
        result = dict(new)
    for path in paths:
        if path.startswith("labels."):
            k = path[len("labels.") :]
            result[k] = new.get(k, "")
        elif path == "labels":
            result = dict(new)
        else:
            raise InvalidArgument(
                f"cannot update {quote(path)} field on snapshot {quote(name)}: "
                "only labels are mutable"
            )
    return {k: v for k, v in result.items() if v != ""}


def _not_found(key: str) -> NotFound:
    return NotFound(f"snapshot {quote(key)} does not exist")


def _check_new_kind(kind: Kind) -> None:
    if kind is Kind.COMMITTED:
        raise InvalidArgument("a new snapshot must be ACTIVE or VIEW, not COMMITTED")


# --------------------------------------------------------------------- memory


@dataclass
class _Rec:
    id: SnapshotId
    kind: Kind
    parent: str
    labels: dict[str, str]
    created_ns: int
    updated_ns: int
    usage: Usage


class MemoryStore:
    """A `MetaStore` in a dict: not durable; for tests and as a reference."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._recs: dict[str, _Rec] = {}
        self._next_id = 1

    def __repr__(self) -> str:
        return f"<MemoryStore snapshots={len(self._recs)} next_id={self._next_id}>"

    def _get(self, key: str) -> _Rec:
        rec = self._recs.get(key)
        if rec is None:
            raise _not_found(key)
        return rec

    def _info(self, key: str, rec: _Rec) -> Info:
        return Info(key, rec.parent, rec.kind, rec.created_ns, rec.updated_ns, dict(rec.labels))

    def _snapshot(self, rec: _Rec) -> Snapshot:
        chain: list[SnapshotId] = []
        p = rec.parent
        while p:
            prec = self._recs[p]
            chain.append(prec.id)
            p = prec.parent
        return Snapshot(rec.id, rec.kind, tuple(chain), rec.usage, dict(rec.labels))

    def get_info(self, key: str) -> Info:
        with self._lock:
            return self._info(key, self._get(key))

    def get_snapshot(self, key: str) -> Snapshot:
        with self._lock:
            return self._snapshot(self._get(key))

    def create(
        self,
        key: str,
        parent: str,
        kind: Kind,
        labels: Mapping[str, str],
        now_ns: int,
        materialize: Materialize | None = None,
    ) -> Snapshot:
        _check_new_kind(kind)
        with self._lock:
            if key in self._recs:
                raise AlreadyExists(f"snapshot {quote(key)} already exists")
            if parent:
                prec = self._recs.get(parent)
                if prec is None:
                    raise NotFound(f"parent snapshot {quote(parent)} does not exist")
                if prec.kind is not Kind.COMMITTED:
                    raise InvalidArgument(
                        f"parent {quote(parent)} is {prec.kind.filter_name}, not committed"
                    )
            rec = _Rec(
                SnapshotId(self._next_id), kind, parent, dict(labels), now_ns, now_ns, Usage()
            )
            snap = replace(self._snapshot(rec), labels=dict(labels))
            if materialize is not None:
                materialize(snap)
            self._next_id += 1
            self._recs[key] = rec
            return snap

    def commit(
        self, name: str, key: str, labels: Mapping[str, str], usage: Usage, now_ns: int
    ) -> Info:
        with self._lock:
            if name in self._recs:
                raise AlreadyExists(f"snapshot {quote(name)} already exists")
            rec = self._get(key)
            if rec.kind is not Kind.ACTIVE:
                raise FailedPrecondition(
                    f"snapshot {quote(key)} is {rec.kind.filter_name}, only active can be committed"
                )
            del self._recs[key]
            new = _Rec(rec.id, Kind.COMMITTED, rec.parent, dict(labels), now_ns, now_ns, usage)
            self._recs[name] = new
            return self._info(name, new)

    def remove(self, key: str) -> Snapshot:
        with self._lock:
            rec = self._get(key)
            if any(r.parent == key for r in self._recs.values()):
                raise FailedPrecondition(f"cannot remove snapshot {quote(key)} with child")
            snap = self._snapshot(rec)
            del self._recs[key]
            return snap

    def update(
        self, key: str, labels: Mapping[str, str], paths: Sequence[str], now_ns: int
    ) -> Info:
        with self._lock:
            rec = self._get(key)
            rec.labels = apply_label_update(rec.labels, labels, paths, key)
            rec.updated_ns = now_ns
            return self._info(key, rec)

    def list_infos(self) -> list[Info]:
        with self._lock:
            return [self._info(k, self._recs[k]) for k in sorted(self._recs)]

    def cleanup(self, reclaim: Reclaim) -> None:
        with self._lock:
            reclaim(frozenset(r.id for r in self._recs.values()))

    def close(self) -> None:
        pass


# --------------------------------------------------------------------- sqlite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    key         TEXT    NOT NULL UNIQUE,
    parent_id   INTEGER REFERENCES snapshots(id),
    kind        INTEGER NOT NULL,
    labels      TEXT    NOT NULL,
    created_ns  INTEGER NOT NULL,
    updated_ns  INTEGER NOT NULL,
    size_bytes  INTEGER NOT NULL DEFAULT 0,
    inodes      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
"""

_INFO_SELECT = """
SELECT s.key, COALESCE(p.key, ''), s.kind, s.created_ns, s.updated_ns, s.labels
FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id
"""

_CHAIN = """
WITH RECURSIVE chain(id, parent_id, depth) AS (
    SELECT id, parent_id, 0 FROM snapshots WHERE id = ?
    UNION ALL
    SELECT s.id, s.parent_id, c.depth + 1 FROM snapshots s JOIN chain c ON s.id = c.parent_id
)
SELECT id FROM chain WHERE depth > 0 ORDER BY depth
"""

_Row = tuple[str, str, int, int, int, str]


def _labels_json(labels: Mapping[str, str]) -> str:
    return json.dumps(dict(sorted(labels.items())), ensure_ascii=False, separators=(",", ":"))


def _row_info(row: _Row) -> Info:
    key, parent, kind, created, updated, labels = row
    return Info(key, parent, Kind(kind), created, updated, json.loads(labels))


class SqliteStore:
    """A durable `MetaStore` in one sqlite file (WAL, synchronous=FULL).

    Open with `SqliteStore(path)`; the file and schema are created if absent.
    Raises sqlite3.Error subclasses only for disk/corruption problems.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._closed = False
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        # Reads use their own connection: under WAL they see the last committed
        # state and never wait for a writer's fsync.
        self._rdb = sqlite3.connect(path, isolation_level=None, check_same_thread=False)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<SqliteStore {str(self._path)!r} {state}>"

    @contextmanager
    def _tx(self, write: bool) -> Iterator[sqlite3.Connection]:
        lock, db = (self._lock, self._db) if write else (self._read_lock, self._rdb)
        with lock:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed")
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _row(self, db: sqlite3.Connection, key: str) -> tuple[int, int, int | None, str, int, int]:
        row = db.execute(
            "SELECT id, kind, parent_id, labels, size_bytes, inodes FROM snapshots WHERE key = ?",
            (key,),
        ).fetchone()
        if row is None:
            raise _not_found(key)
        return row  # type: ignore[no-any-return]

    def _chain(self, db: sqlite3.Connection, sid: int) -> tuple[SnapshotId, ...]:
        return tuple(SnapshotId(r[0]) for r in db.execute(_CHAIN, (sid,)))

    def _info(self, db: sqlite3.Connection, key: str) -> Info:
        row = db.execute(_INFO_SELECT + " WHERE s.key = ?", (key,)).fetchone()
        if row is None:
            raise _not_found(key)
        return _row_info(row)

    def get_info(self, key: str) -> Info:
        with self._tx(False) as db:
            return self._info(db, key)

    def get_snapshot(self, key: str) -> Snapshot:
        with self._tx(False) as db:
            sid, kind, _, labels, size, inodes = self._row(db, key)
            return Snapshot(
                SnapshotId(sid),
                Kind(kind),
                self._chain(db, sid),
                Usage(size, inodes),
                json.loads(labels),
            )

    def create(
        self,
        key: str,
        parent: str,
        kind: Kind,
        labels: Mapping[str, str],
        now_ns: int,
        materialize: Materialize | None = None,
    ) -> Snapshot:
        _check_new_kind(kind)
        with self._tx(True) as db:
            if db.execute("SELECT 1 FROM snapshots WHERE key = ?", (key,)).fetchone():
                raise AlreadyExists(f"snapshot {quote(key)} already exists")
            parent_id: int | None = None
            if parent:
                prow = db.execute(
                    "SELECT id, kind FROM snapshots WHERE key = ?", (parent,)
                ).fetchone()
                if prow is None:
                    raise NotFound(f"parent snapshot {quote(parent)} does not exist")
                if prow[1] != Kind.COMMITTED:
                    raise InvalidArgument(
                        f"parent {quote(parent)} is {Kind(prow[1]).filter_name}, not committed"
                    )
                parent_id = prow[0]
            cur = db.execute(
                "INSERT INTO snapshots (key, parent_id, kind, labels, created_ns, updated_ns)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (key, parent_id, int(kind), _labels_json(labels), now_ns, now_ns),
            )
            sid = cur.lastrowid
            assert sid is not None
            snap = Snapshot(SnapshotId(sid), kind, self._chain(db, sid), Usage(), dict(labels))
            if materialize is not None:
                materialize(snap)
            return snap

    def commit(
        self, name: str, key: str, labels: Mapping[str, str], usage: Usage, now_ns: int
    ) -> Info:
        with self._tx(True) as db:
            if db.execute("SELECT 1 FROM snapshots WHERE key = ?", (name,)).fetchone():
                raise AlreadyExists(f"snapshot {quote(name)} already exists")
            sid, kind, _, _, _, _ = self._row(db, key)
            if kind != Kind.ACTIVE:
                raise FailedPrecondition(
                    f"snapshot {quote(key)} is {Kind(kind).filter_name}, "
                    "only active can be committed"
                )
            db.execute(
                "UPDATE snapshots SET key = ?, kind = ?, labels = ?, created_ns = ?,"
                " updated_ns = ?, size_bytes = ?, inodes = ? WHERE id = ?",
                (
                    name,
                    int(Kind.COMMITTED),
                    _labels_json(labels),
                    now_ns,
                    now_ns,
                    usage.size_bytes,
                    usage.inodes,
                    sid,
                ),
            )
            return self._info(db, name)

    def remove(self, key: str) -> Snapshot:
        with self._tx(True) as db:
            sid, kind, _, labels, size, inodes = self._row(db, key)
            if db.execute("SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (sid,)).fetchone():
                raise FailedPrecondition(f"cannot remove snapshot {quote(key)} with child")
            snap = Snapshot(
                SnapshotId(sid),
                Kind(kind),
                self._chain(db, sid),
                Usage(size, inodes),
                json.loads(labels),
            )
            db.execute("DELETE FROM snapshots WHERE id = ?", (sid,))
            return snap

    def update(
        self, key: str, labels: Mapping[str, str], paths: Sequence[str], now_ns: int
    ) -> Info:
        with self._tx(True) as db:
            sid, _, _, current, _, _ = self._row(db, key)
            new = apply_label_update(json.loads(current), labels, paths, key)
            db.execute(
                "UPDATE snapshots SET labels = ?, updated_ns = ? WHERE id = ?",
                (_labels_json(new), now_ns, sid),
            )
            return self._info(db, key)

    def list_infos(self) -> list[Info]:
        with self._tx(False) as db:
            return [_row_info(r) for r in db.execute(_INFO_SELECT + " ORDER BY s.key")]

    def cleanup(self, reclaim: Reclaim) -> None:
        with self._tx(True) as db:
            ids = frozenset(SnapshotId(r[0]) for r in db.execute("SELECT id FROM snapshots"))
            reclaim(ids)

    def close(self) -> None:
        with self._lock, self._read_lock:
            if not self._closed:
                self._closed = True
                self._rdb.close()
                self._db.close()
