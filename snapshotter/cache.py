"""The on-disk span cache: verified compressed spans, keyed by (layer digest, span id).

Design (DESIGN.md D10): the cache holds the ORIGINAL compressed bytes of each span, which can
be proven against the zTOC span digest at any time (and served to peers as they are). Layout
under `root`::

    spans/sha256-<layer hex>/<span id>     one file per span
    spans/sha256-<layer hex>/.released     the layer's image was removed: evict it first
    tmp/                                   files being written (removed at start)

Writes go to `tmp/` and are renamed into place, so a file under `spans/` is always complete.
Every `get` hashes the file against the digest the caller expects; a corrupt file is deleted
and reported as a miss (the caller refetches). The total size is bounded by `max_bytes`:
after each `put`, spans of released layers are evicted first, then the least recently used.
Recency lives in an in-memory index rebuilt from the directory (file mtimes) at start, so the
cache survives restarts; `get` refreshes a file's mtime.

All methods are synchronous and thread-safe (call them from worker threads, never from the
trio thread: they do disk I/O). Sizes are in bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from index.digest import Digest, DigestError
from index.model import SpanId

log = logging.getLogger(__name__)

RELEASED_MARK: Final = ".released"
_LAYER_PREFIX: Final = "sha256-"

_Key = tuple[Digest, SpanId]


class CacheError(Exception):
    """The span cache could not store a span (disk full, permissions). Reads never raise it:
    an unreadable or corrupt span is a miss."""


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Span cache settings (wire into `snapshotter.config` as `[cache]`).

    `max_bytes` bounds the total size of cached span files (default 10 GiB).
    """

    max_bytes: int = 10 * 1024 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_bytes < 0:
            raise ValueError(f"cache max_bytes must not be negative, got {self.max_bytes}")


@dataclass(frozen=True, slots=True)
class CacheStats:
    """A snapshot of the cache: sizes in bytes, counters since this process opened it."""

    entries: int
    bytes: int
    max_bytes: int
    released_layers: int
    hits: int
    misses: int
    puts: int
    evictions: int
    corrupt_dropped: int


def _layer_dir_name(layer: Digest) -> str:
    return _LAYER_PREFIX + layer.hex


def _parse_layer_dir(name: str) -> Digest | None:
    if not name.startswith(_LAYER_PREFIX):
        return None
    try:
        return Digest("sha256:" + name[len(_LAYER_PREFIX) :])
    except DigestError:
        return None


class SpanCache:
    """A bounded, content-addressed, restart-safe cache of compressed spans (see module doc).

    Raises `CacheError` from the constructor when `root` cannot be created.
    """

    def __init__(self, root: Path, config: CacheConfig | None = None) -> None:
        self.root = root
        self.config = config or CacheConfig()
        self._spans_dir = root / "spans"
        self._tmp_dir = root / "tmp"
        self._lock = threading.Lock()
        self._lru: OrderedDict[_Key, int] = OrderedDict()
        self._by_layer: dict[Digest, set[SpanId]] = {}
        self._released: set[Digest] = set()
        self._bytes = 0
        self._hits = self._misses = self._puts = self._evictions = self._corrupt = 0
        self._tmp_seq = 0
        try:
            self._spans_dir.mkdir(parents=True, exist_ok=True)
            self._tmp_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CacheError(f"span cache {root}: cannot create its directories: {e}") from e
        self._load()

    def __repr__(self) -> str:
        return (
            f"<SpanCache {self.root} entries={len(self._lru)} bytes={self._bytes}"
            f"/{self.config.max_bytes} released={len(self._released)}>"
        )

    # -- index -----------------------------------------------------------------------------

    def _load(self) -> None:
        """Rebuild the index from the directory: oldest mtime first; drop temp leftovers."""
        for leftover in self._tmp_dir.iterdir():
            with contextlib.suppress(OSError):
                leftover.unlink()
        found: list[tuple[int, _Key, int]] = []
        for layer_dir in self._spans_dir.iterdir():
            layer = _parse_layer_dir(layer_dir.name)
            if layer is None or not layer_dir.is_dir():
                continue
            for entry in os.scandir(layer_dir):
                if entry.name == RELEASED_MARK:
                    self._released.add(layer)
                    continue
                if not entry.name.isdigit():
                    continue
                try:
                    st = entry.stat()
                except OSError:
                    continue
                found.append((st.st_mtime_ns, (layer, SpanId(int(entry.name))), st.st_size))
        found.sort(key=lambda item: item[0])
        for _, key, size in found:
            self._insert(key, size)
        log.debug("span cache %s: %d spans, %d bytes", self.root, len(self._lru), self._bytes)

    def _insert(self, key: _Key, size: int) -> None:
        old = self._lru.pop(key, None)
        if old is not None:
            self._bytes -= old
        self._lru[key] = size
        self._bytes += size
        self._by_layer.setdefault(key[0], set()).add(key[1])

    def _forget(self, key: _Key) -> None:
        size = self._lru.pop(key, None)
        if size is None:
            return
        self._bytes -= size
        spans = self._by_layer.get(key[0])
        if spans is not None:
            spans.discard(key[1])
            if not spans:
                del self._by_layer[key[0]]

    def _path(self, layer: Digest, span: SpanId) -> Path:
        return self._spans_dir / _layer_dir_name(layer) / str(int(span))

    # -- queries ---------------------------------------------------------------------------

    def contains(self, layer: Digest, span: SpanId) -> bool:
        """Whether the index lists the span (no I/O; the file is verified only by `get`)."""
        with self._lock:
            return (layer, span) in self._lru

    def spans_of(self, layer: Digest) -> frozenset[SpanId]:
        """The span ids of `layer` the index lists."""
        with self._lock:
            return frozenset(self._by_layer.get(layer, ()))

    def stats(self) -> CacheStats:
        """Current sizes and counters."""
        with self._lock:
            return CacheStats(
                entries=len(self._lru),
                bytes=self._bytes,
                max_bytes=self.config.max_bytes,
                released_layers=len(self._released),
                hits=self._hits,
                misses=self._misses,
                puts=self._puts,
                evictions=self._evictions,
                corrupt_dropped=self._corrupt,
            )

    # -- get / put -------------------------------------------------------------------------

    def get(self, layer: Digest, span: SpanId, expected: str) -> bytes | None:
        """The cached bytes of the span if they hash to `expected` (`sha256:<hex>`), else None.

        A file that does not match is deleted (counted in `corrupt_dropped`); an unreadable
        or missing one is a miss. Refreshes the span's recency. Never raises for I/O errors.
        """
        key = (layer, span)
        path = self._path(layer, span)
        try:
            data = path.read_bytes()
        except OSError:
            with self._lock:
                self._forget(key)
                self._misses += 1
            return None
        if "sha256:" + hashlib.sha256(data).hexdigest() != expected:
            log.warning("span cache: %s span %d does not match %s; dropped", layer, span, expected)
            with contextlib.suppress(OSError):
                path.unlink()
            with self._lock:
                self._forget(key)
                self._corrupt += 1
                self._misses += 1
            return None
        with contextlib.suppress(OSError):
            os.utime(path)
        with self._lock:
            if key in self._lru:
                self._lru.move_to_end(key)
            else:
                self._insert(key, len(data))
            self._hits += 1
        return data

    def put(self, layer: Digest, span: SpanId, data: bytes) -> None:
        """Store verified `data` as the span (atomically), then evict down to `max_bytes`.

        A span larger than `max_bytes` is not stored. Raises `CacheError` when the file cannot
        be written (nothing is left behind).
        """
        size = len(data)
        if size > self.config.max_bytes:
            return
        key = (layer, span)
        final = self._path(layer, span)
        with self._lock:
            self._tmp_seq += 1
            tmp = (
                self._tmp_dir
                / f"{layer.hex[:16]}-{int(span)}-{threading.get_ident()}-{self._tmp_seq}"
            )
        try:
            final.parent.mkdir(exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, final)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise CacheError(f"span cache {self.root}: storing {layer} span {span}: {e}") from e
        with self._lock:
            self._insert(key, size)
            self._puts += 1
            victims = self._pick_victims(keep=key)
        self._delete(victims)

    def _pick_victims(self, keep: _Key) -> list[_Key]:
        """Remove entries from the index until the total fits; returns them (lock held)."""
        victims: list[_Key] = []
        if self._bytes <= self.config.max_bytes:
            return victims
        if self._released:
            for candidate in [k for k in self._lru if k[0] in self._released and k != keep]:
                if self._bytes <= self.config.max_bytes:
                    break
                self._forget(candidate)
                victims.append(candidate)
        while self._bytes > self.config.max_bytes:
            oldest = next((k for k in self._lru if k != keep), None)
            if oldest is None:
                break
            self._forget(oldest)
            victims.append(oldest)
        self._evictions += len(victims)
        return victims

    def _delete(self, keys: list[_Key]) -> None:
        layers: set[Digest] = set()
        for layer, span in keys:
            with contextlib.suppress(OSError):
                self._path(layer, span).unlink()
            layers.add(layer)
        for layer in layers:
            self._tidy_layer(layer)

    def _tidy_layer(self, layer: Digest) -> None:
        """Remove a released layer's directory once it holds no spans."""
        with self._lock:
            if layer in self._by_layer or layer not in self._released:
                return
            self._released.discard(layer)
        layer_dir = self._spans_dir / _layer_dir_name(layer)
        with contextlib.suppress(OSError):
            (layer_dir / RELEASED_MARK).unlink()
        with contextlib.suppress(OSError):
            layer_dir.rmdir()

    # -- layer marks -----------------------------------------------------------------------

    def release_layer(self, layer: Digest) -> None:
        """Mark `layer`'s spans evictable first (its image was removed). Persists. Idempotent.

        Raises `CacheError` when the mark cannot be written.
        """
        layer_dir = self._spans_dir / _layer_dir_name(layer)
        with self._lock:
            if layer not in self._by_layer:
                return
            self._released.add(layer)
        try:
            (layer_dir / RELEASED_MARK).touch()
        except OSError as e:
            raise CacheError(f"span cache {self.root}: marking {layer} released: {e}") from e

    def retain_layer(self, layer: Digest) -> None:
        """Clear `layer`'s released mark (it is in use again). Idempotent, never raises."""
        with self._lock:
            if layer not in self._released:
                return
            self._released.discard(layer)
        with contextlib.suppress(OSError):
            (self._spans_dir / _layer_dir_name(layer) / RELEASED_MARK).unlink()

    def is_released(self, layer: Digest) -> bool:
        with self._lock:
            return layer in self._released

    def drop_layer(self, layer: Digest) -> int:
        """Delete every cached span of `layer` now; returns the bytes freed. Never raises."""
        with self._lock:
            keys = [(layer, s) for s in self._by_layer.get(layer, ())]
            freed = sum(self._lru.get(k, 0) for k in keys)
            for key in keys:
                self._forget(key)
            self._released.add(layer)
        self._delete(keys)
        self._tidy_layer(layer)
        return freed
