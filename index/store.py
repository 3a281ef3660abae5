"""The local store of indexes built here: blobs in an OCI layout plus a small artifacts DB.

Layout under the root (default `/var/lib/sociable`, shared with the snapshotter):

    content/                 an OCI image layout (`oci-layout`, `blobs/sha256/<hex>`)
    artifacts.db             sqlite: what each stored blob is (index or zTOC) and what it indexes

The DB plays the role of SOCI's `artifacts.db` (docs/cli.md, "The local store"): it maps a zTOC to the layer it
indexes (and the span size it was built with, for reuse) and an index to the image manifest,
reference and platform it was built for. Blob writes are atomic (temp file + rename) and every
blob is verified against its digest when read.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from index.digest import Digest
from index.errors import SociableError
from index.oci.errors import BlobNotInLayoutError, LayoutError
from index.oci.layout import OciLayout

_SCHEMA = """
CREATE TABLE IF NOT EXISTS indexes (
    digest TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    image_digest TEXT NOT NULL,
    image_ref TEXT NOT NULL,
    platform TEXT NOT NULL,
    artifact_type TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS ztocs (
    digest TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    layer_digest TEXT NOT NULL,
    layer_media_type TEXT NOT NULL,
    span_size INTEGER NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS ztocs_by_layer ON ztocs (layer_digest, span_size);
CREATE TABLE IF NOT EXISTS index_ztocs (
    index_digest TEXT NOT NULL REFERENCES indexes(digest) ON DELETE CASCADE,
    ztoc_digest TEXT NOT NULL,
    PRIMARY KEY (index_digest, ztoc_digest)
);
"""


class StoreError(SociableError):
    """The local store is unusable, or lacks what was asked for."""


class BlobNotFound(StoreError):
    """No blob with that digest is stored."""


class IndexNotFound(StoreError):
    """No index with that digest is recorded."""


class BlobCorrupt(StoreError):
    """A stored blob's bytes no longer match its digest."""


@dataclass(frozen=True, slots=True)
class IndexRecord:
    digest: Digest
    size: int
    image_digest: Digest
    image_ref: str
    platform: str
    artifact_type: str
    created_at: str

    @property
    def manifest_version(self) -> str:
        return "v1" if self.artifact_type.endswith("v1+json") else "v2"


@dataclass(frozen=True, slots=True)
class ZtocRecord:
    digest: Digest
    size: int
    layer_digest: Digest
    layer_media_type: str
    span_size: int
    created_at: str


def default_root() -> Path:
    """`/var/lib/sociable` for root; `$XDG_DATA_HOME/sociable` (or ~/.local/share) otherwise."""
    if os.geteuid() == 0:
        return Path("/var/lib/sociable")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "sociable"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class LocalStore:
    """Blobs and artifact records under `root`. Safe for one writer process at a time."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()  # builds record zTOCs from several threads
        try:
            root.mkdir(parents=True, exist_ok=True)
            self.content = OciLayout.open(root / "content", create=True, fmt="oci-dir")
            self._db = sqlite3.connect(
                root / "artifacts.db", isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA foreign_keys = ON")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error, LayoutError) as e:
            raise StoreError(f"cannot open the local store at {root}: {e}") from e

    def close(self) -> None:
        self._db.close()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; sqlite errors become StoreError (the transaction rolls back)."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                raise StoreError(f"local store {self.root}: artifacts.db: {e}") from e

    def _query(self, sql: str, args: Sequence[object] = ()) -> list[Any]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as e:
                raise StoreError(f"local store {self.root}: artifacts.db: {e}") from e

    # --- blobs ---------------------------------------------------------------------------------

    def has_blob(self, digest: Digest) -> bool:
        return self.content.has_blob(digest)

    def blob_path(self, digest: Digest) -> Path:
        return self.content.blob_path(digest)

    def put_blob(self, data: bytes) -> Digest:
        """Store `data` (idempotent) and return its digest. Raises StoreError."""
        try:
            return self.content.write_blob(data).digest
        except (OSError, LayoutError) as e:
            raise StoreError(f"cannot write a blob to the local store {self.root}: {e}") from e

    def get_blob(self, digest: Digest) -> bytes:
        """The blob's bytes, verified. Raises BlobNotFound, or BlobCorrupt on a digest mismatch."""
        try:
            return self.content.read_blob(digest)
        except BlobNotInLayoutError as e:
            raise BlobNotFound(f"blob {digest} is not in the local store {self.root}") from e
        except LayoutError as e:
            raise BlobCorrupt(f"blob {digest} in the local store {self.root}: {e}") from e

    # --- records -------------------------------------------------------------------------------

    def add_ztoc(
        self, digest: Digest, size: int, layer_digest: str, layer_media_type: str, span_size: int
    ) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO ztocs VALUES (?, ?, ?, ?, ?, ?)",
                (digest, size, layer_digest, layer_media_type, span_size, _now()),
            )

    def find_ztoc(self, layer_digest: str, span_size: int) -> ZtocRecord | None:
        """A stored zTOC for that layer built with that span size, whose blob is still here."""
        rows = self._query(
            "SELECT * FROM ztocs WHERE layer_digest = ? AND span_size = ? ORDER BY created_at DESC",
            (layer_digest, span_size),
        )
        for row in rows:
            rec = _ztoc(row)
            if self.has_blob(rec.digest):
                return rec
        return None

    def add_index(
        self,
        digest: Digest,
        size: int,
        image_digest: str,
        image_ref: str,
        platform: str,
        artifact_type: str,
        ztoc_digests: list[Digest],
    ) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO indexes VALUES (?, ?, ?, ?, ?, ?, ?)",
                (digest, size, image_digest, image_ref, platform, artifact_type, _now()),
            )
            db.executemany(
                "INSERT OR IGNORE INTO index_ztocs VALUES (?, ?)",
                [(digest, z) for z in ztoc_digests],
            )

    def list_indexes(
        self,
        *,
        ref: str | None = None,
        platform: str | None = None,
        image_digest: str | None = None,
    ) -> list[IndexRecord]:
        sql, args = "SELECT * FROM indexes WHERE 1=1", []
        for column, value in (
            ("image_ref", ref),
            ("platform", platform),
            ("image_digest", image_digest),
        ):
            if value is not None:
                sql += f" AND {column} = ?"
                args.append(value)
        rows = self._query(sql + " ORDER BY created_at, digest", args)
        return [IndexRecord(Digest(r[0]), r[1], Digest(r[2]), r[3], r[4], r[5], r[6]) for r in rows]

    def get_index(self, digest: str) -> IndexRecord | None:
        found = [r for r in self.list_indexes() if r.digest == digest]
        return found[0] if found else None

    def list_ztocs(
        self, *, ztoc_digest: str | None = None, index_digests: list[Digest] | None = None
    ) -> list[ZtocRecord]:
        sql, args = "SELECT * FROM ztocs WHERE 1=1", []
        if ztoc_digest is not None:
            sql += " AND digest = ?"
            args.append(ztoc_digest)
        if index_digests is not None:
            marks = ",".join("?" * len(index_digests)) or "NULL"
            sql += f" AND digest IN (SELECT ztoc_digest FROM index_ztocs WHERE index_digest IN ({marks}))"
            args.extend(index_digests)
        rows = self._query(sql + " ORDER BY created_at, digest", args)
        return [_ztoc(r) for r in rows]

    def remove_index(self, digest: str) -> None:
        """Drop an index record and its blob, and zTOCs no other index refers to.

        Raises IndexNotFound when no such index is stored.
        """
        with self._tx() as db:
            if db.execute("SELECT 1 FROM indexes WHERE digest = ?", (digest,)).fetchone() is None:
                raise IndexNotFound(f"no index {digest} in the local store {self.root}")
            ztocs = [
                r[0]
                for r in db.execute(
                    "SELECT ztoc_digest FROM index_ztocs WHERE index_digest = ?", (digest,)
                )
            ]
            db.execute("DELETE FROM indexes WHERE digest = ?", (digest,))
            orphans = [
                z
                for z in ztocs
                if db.execute("SELECT 1 FROM index_ztocs WHERE ztoc_digest = ?", (z,)).fetchone()
                is None
            ]
            db.executemany("DELETE FROM ztocs WHERE digest = ?", [(z,) for z in orphans])
        for d in [digest, *orphans]:
            with contextlib.suppress(FileNotFoundError):
                self.blob_path(Digest(d)).unlink()


def _ztoc(row: tuple[str, int, str, str, int, str]) -> ZtocRecord:
    return ZtocRecord(Digest(row[0]), row[1], Digest(row[2]), row[3], row[4], row[5])
