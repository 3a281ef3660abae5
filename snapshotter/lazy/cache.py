"""The on-disk span caches: verified compressed spans, and a tier of inflated hot spans.

`SpanCache` holds the ORIGINAL compressed bytes of each span, keyed by
(layer digest, span id), which can be proven against the zTOC span digest at any time (and
served to peers as they are). Layout under `root`::

    spans/sha256-<layer hex>/<span id>     one file per span
    spans/sha256-<layer hex>/.released     the layer's image was removed: evict it first
    tmp/                                   files being written (removed at start)
    inflated/                              the inflated tier (same layout, see below)

The inflated tier (`InflatedCache`: hot spans kept inflated) holds the
tar-stream bytes a span inflates to, so a read that misses the reader's small in-memory LRU
costs one positioned read of the bytes it needs instead of reading, hashing and inflating a
whole compressed span. Its files are keyed by (layer digest, uncompressed start offset of the
span) and named `inflated/spans/sha256-<layer hex>/<start>`: the tar stream of a layer is a
function of its blob digest, so the key names the content whatever zTOC (span size) produced
it. Only bytes inflated from verified compressed spans are written (by the reader's inflate
thread); a file is complete because it is written to `tmp/` and renamed. A file is the span's
bytes followed by a CRC-32 of each `INFLATED_BLOCK_BYTES` block: every read checks the file's
size against the span's uncompressed length and the sums of the blocks it reads (a torn,
damaged or foreign file is deleted and is a miss: the span is inflated again from its verified
compressed bytes). The sums detect damage on disk, not tampering: the tier lives under the
daemon's root-only directory. It survives restarts like the compressed cache; it is bounded separately
(`CacheConfig.inflated_max_bytes`) and follows the compressed cache's layer marks:
`release_layer`, `retain_layer` and `drop_layer` apply to both tiers. The reader writes the
tier behind its back (`InflatedCache.put_later`: one writer thread, a queue of
`WRITE_BEHIND_SPANS`): a read waiting for a span gets it once inflated, not once written.

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
import queue
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from zlib_ng.zlib_ng import crc32

from index.digest import Digest, DigestError
from index.model import SpanId, UncompressedOffset

log = logging.getLogger(__name__)

RELEASED_MARK: Final = ".released"
WRITE_BEHIND_SPANS: Final = 4
"""Inflated spans queued for the tier's writer thread at most (`InflatedCache.put_later`)."""
WRITER_IDLE_SEC: Final = 10.0
"""The tier's writer thread ends after this long without a span to write."""
INFLATED_BLOCK_BYTES: Final = 64 * 1024
"""The inflated tier keeps one CRC-32 per block of this many bytes (a read checks the blocks
it touches). zlib-ng's `crc32` (the same sums as `zlib.crc32`): about 5x as fast on x86-64."""
_SUM = struct.Struct("<I")
_LAYER_PREFIX: Final = "sha256-"

_Key = tuple[Digest, int]


class CacheError(Exception):
    """The span cache could not store a span (disk full, permissions). Reads never raise it:
    an unreadable or corrupt span is a miss."""


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Span cache settings (`[remote] cache_max_bytes`, `inflated_cache_max_bytes`).

    `max_bytes` bounds the total size of cached compressed span files (default 10 GiB);
    `inflated_max_bytes` bounds the inflated tier (0, the library default, turns it off; the
    daemon's default is 4 GiB).
    """

    max_bytes: int = 10 * 1024 * 1024 * 1024
    inflated_max_bytes: int = 0

    def __post_init__(self) -> None:
        if self.max_bytes < 0 or self.inflated_max_bytes < 0:
            raise ValueError(f"cache sizes must not be negative, got {self!r}")


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
    hit_bytes: int = 0
    """Bytes the hits returned (compressed spans, or the inflated bytes asked for)."""


def _layer_dir_name(layer: Digest) -> str:
    return _LAYER_PREFIX + layer.hex


def _parse_layer_dir(name: str) -> Digest | None:
    if not name.startswith(_LAYER_PREFIX):
        return None
    try:
        return Digest("sha256:" + name[len(_LAYER_PREFIX) :])
    except DigestError:
        return None


class _SpanFiles:
    """A bounded, restart-safe LRU of files keyed by (layer digest, integer key): the storage,
    index, eviction and layer marks both tiers share. `what` names it in messages, `key_noun`
    names a key ("span 3").

    Raises `CacheError` from the constructor when `root` cannot be created.
    """

    def __init__(self, root: Path, max_bytes: int, what: str, key_noun: str) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._what = what
        self._key_noun = key_noun
        self._spans_dir = root / "spans"
        self._tmp_dir = root / "tmp"
        self._lock = threading.Lock()
        self._lru: OrderedDict[_Key, int] = OrderedDict()
        self._by_layer: dict[Digest, set[int]] = {}
        self._released: set[Digest] = set()
        self._bytes = 0
        self._hits = self._misses = self._puts = self._evictions = self._corrupt = 0
        self._hit_bytes = 0
        self._tmp_seq = 0
        try:
            self._spans_dir.mkdir(parents=True, exist_ok=True)
            self._tmp_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CacheError(f"{what} {root}: cannot create its directories: {e}") from e
        self._load()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.root} entries={len(self._lru)} bytes={self._bytes}"
            f"/{self.max_bytes} released={len(self._released)}>"
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
                found.append((st.st_mtime_ns, (layer, int(entry.name)), st.st_size))
        found.sort(key=lambda item: item[0])
        for _, key, size in found:
            self._insert(key, size)
        log.debug("%s %s: %d files, %d bytes", self._what, self.root, len(self._lru), self._bytes)

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

    def _path(self, layer: Digest, key: int) -> Path:
        return self._spans_dir / _layer_dir_name(layer) / str(int(key))

    # -- queries ---------------------------------------------------------------------------

    def _contains(self, layer: Digest, key: int) -> bool:
        with self._lock:
            return (layer, key) in self._lru

    def _keys_of(self, layer: Digest) -> frozenset[int]:
        with self._lock:
            return frozenset(self._by_layer.get(layer, ()))

    def stats(self) -> CacheStats:
        """Current sizes and counters."""
        with self._lock:
            return CacheStats(
                entries=len(self._lru),
                bytes=self._bytes,
                max_bytes=self.max_bytes,
                released_layers=len(self._released),
                hits=self._hits,
                misses=self._misses,
                puts=self._puts,
                evictions=self._evictions,
                corrupt_dropped=self._corrupt,
                hit_bytes=self._hit_bytes,
            )

    # -- get / put -------------------------------------------------------------------------

    def _put(self, layer: Digest, name: int, data: bytes, trailer: bytes = b"") -> None:
        """Store `data` then `trailer` under (layer, name) atomically, then evict down to
        `max_bytes`.

        A file larger than `max_bytes` is not stored. Raises `CacheError` when the file cannot
        be written (nothing is left behind).
        """
        size = len(data) + len(trailer)
        if size > self.max_bytes:
            return
        key = (layer, name)
        final = self._path(layer, name)
        with self._lock:
            self._tmp_seq += 1
            tmp = (
                self._tmp_dir
                / f"{layer.hex[:16]}-{int(name)}-{threading.get_ident()}-{self._tmp_seq}"
            )
        try:
            final.parent.mkdir(exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.write(trailer)
            os.replace(tmp, final)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise CacheError(
                f"{self._what} {self.root}: storing {layer} {self._key_noun} {name}: {e}"
            ) from e
        with self._lock:
            self._insert(key, size)
            self._puts += 1
            victims = self._pick_victims(keep=key)
        self._delete(victims)

    def _pick_victims(self, keep: _Key) -> list[_Key]:
        """Remove entries from the index until the total fits; returns them (lock held)."""
        victims: list[_Key] = []
        if self._bytes <= self.max_bytes:
            return victims
        if self._released:
            for candidate in [k for k in self._lru if k[0] in self._released and k != keep]:
                if self._bytes <= self.max_bytes:
                    break
                self._forget(candidate)
                victims.append(candidate)
        while self._bytes > self.max_bytes:
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
            raise CacheError(f"{self._what} {self.root}: marking {layer} released: {e}") from e

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
        """Delete every file of `layer` now; returns the bytes freed. Never raises."""
        with self._lock:
            keys = [(layer, s) for s in self._by_layer.get(layer, ())]
            freed = sum(self._lru.get(k, 0) for k in keys)
            for key in keys:
                self._forget(key)
            self._released.add(layer)
        self._delete(keys)
        self._tidy_layer(layer)
        return freed


class SpanCache(_SpanFiles):
    """A bounded, content-addressed, restart-safe cache of compressed spans (see module doc).

    `inflated` is the inflated tier under `root/inflated` when `config.inflated_max_bytes` is
    positive, else None. Raises `CacheError` from the constructor when a directory cannot be
    created.
    """

    def __init__(self, root: Path, config: CacheConfig | None = None) -> None:
        self.config = config or CacheConfig()
        super().__init__(root, self.config.max_bytes, "span cache", "span")
        self.inflated: InflatedCache | None = (
            InflatedCache(root / "inflated", self.config.inflated_max_bytes)
            if self.config.inflated_max_bytes > 0
            else None
        )

    def contains(self, layer: Digest, span: SpanId) -> bool:
        """Whether the index lists the span (no I/O; the file is verified only by `get`)."""
        return self._contains(layer, span)

    def spans_of(self, layer: Digest) -> frozenset[SpanId]:
        """The span ids of `layer` the index lists."""
        return frozenset(SpanId(k) for k in self._keys_of(layer))

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
            # Not listed any more: evicted while it was read, and its file is being deleted;
            # the bytes are still good, but listing it again would leave an entry without file.
            if key in self._lru:
                self._lru.move_to_end(key)
            self._hits += 1
            self._hit_bytes += len(data)
        return data

    def put(self, layer: Digest, span: SpanId, data: bytes) -> None:
        """Store verified `data` as the span (atomically), then evict down to `max_bytes`.

        A span larger than `max_bytes` is not stored. Raises `CacheError` when the file cannot
        be written (nothing is left behind).
        """
        self._put(layer, span, data)

    # -- layer marks: both tiers -----------------------------------------------------------

    def release_layer(self, layer: Digest) -> None:
        """Mark `layer`'s spans (and inflated spans) evictable first: its image was removed.
        Persists. Idempotent. Raises `CacheError` when a mark cannot be written."""
        super().release_layer(layer)
        if self.inflated is not None:
            self.inflated.release_layer(layer)

    def retain_layer(self, layer: Digest) -> None:
        """Clear `layer`'s released marks in both tiers. Idempotent, never raises."""
        super().retain_layer(layer)
        if self.inflated is not None:
            self.inflated.retain_layer(layer)

    def drop_layer(self, layer: Digest) -> int:
        """Delete every cached and inflated span of `layer` now; returns the bytes freed (both
        tiers). Never raises."""
        freed = super().drop_layer(layer)
        if self.inflated is not None:
            freed += self.inflated.drop_layer(layer)
        return freed


class InflatedCache(_SpanFiles):
    """The inflated tier: tar-stream bytes of spans, keyed by (layer, uncompressed start).

    Only `SpanCache` creates one (see the module doc). Thread-safe; call from worker threads
    (`read` and `put` do disk I/O; `contains` does not).
    """

    def __init__(self, root: Path, max_bytes: int) -> None:
        super().__init__(root, max_bytes, "inflated span cache", "span at tar offset")
        self._queue: queue.Queue[tuple[Digest, UncompressedOffset, bytes]] = queue.Queue(
            WRITE_BEHIND_SPANS
        )
        self._writer: threading.Thread | None = None
        self._writer_lock = threading.Lock()
        self._write_failing = False

    def put_later(self, layer: Digest, start: UncompressedOffset, data: bytes) -> None:
        """`put` in the tier's writer thread (started when needed, gone after
        `WRITER_IDLE_SEC` without work), so a reader waiting for the span does not wait for
        its file too. Blocks only while `WRITE_BEHIND_SPANS` puts are queued. A failed put is
        logged by the writer (once, until one succeeds again); the span stays a miss."""
        with self._writer_lock:  # the writer leaves only under this lock, with nothing queued
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._write_behind, name="inflated-tier-writer", daemon=True
                )
                self._writer.start()
            self._queue.put((layer, start, data))

    def flush(self) -> None:
        """Wait until every `put_later` so far is done (or failed)."""
        self._queue.join()

    def _write_behind(self) -> None:
        while True:
            try:
                layer, start, data = self._queue.get(timeout=WRITER_IDLE_SEC)
            except queue.Empty:
                with self._writer_lock:
                    if self._queue.empty():
                        self._writer = None
                        return
                continue
            try:
                self.put(layer, start, data)
            except CacheError as e:
                if not self._write_failing:  # a full disk would flood the log
                    self._write_failing = True
                    log.warning("inflated span not kept: %s", e)
            except Exception:
                log.exception("inflated span cache: unexpected error writing a span")
            else:
                self._write_failing = False
            finally:
                self._queue.task_done()

    def drop_layer(self, layer: Digest) -> int:
        """`_SpanFiles.drop_layer` once the queued puts are written (none of the layer's
        spans is written after it)."""
        self.flush()
        return super().drop_layer(layer)

    def contains(self, layer: Digest, start: UncompressedOffset) -> bool:
        """Whether the index lists the span starting at tar offset `start` (no I/O)."""
        return self._contains(layer, start)

    def put(self, layer: Digest, start: UncompressedOffset, data: bytes) -> None:
        """Store the inflated span starting at tar offset `start`, with its block sums;
        `data` MUST come from a verified compressed span. Atomic (temp file + rename); evicts
        down to the bound. Raises `CacheError` when the file cannot be written."""
        view = memoryview(data)
        sums = b"".join(
            _SUM.pack(crc32(view[i : i + INFLATED_BLOCK_BYTES]))
            for i in range(0, len(data), INFLATED_BLOCK_BYTES)
        )
        self._put(layer, start, data, sums)

    def _drop(self, key: _Key, path: Path, why: str) -> None:
        """Delete a damaged file and count it (a miss)."""
        log.warning(
            "inflated span cache: %s span at %d %s; dropped",
            key[0],
            key[1],
            why,
            extra={"layer": str(key[0]), "offset": key[1]},
        )
        with contextlib.suppress(OSError):
            path.unlink()
        with self._lock:
            self._forget(key)
            self._corrupt += 1
            self._misses += 1

    def read_cached(
        self, layer: Digest, start: UncompressedOffset, length: int, offset: int, size: int
    ) -> bytes | None:
        """As `read`, but without waiting for the disk, for the trio thread: None (nothing
        counted) when the span is not the tier's most recent one (its recency would need a
        `utime`) or its blocks and their sums are not all in the page cache (`RWF_NOWAIT`);
        the caller then `read`s in a worker thread. Also None on a miss. Verifies the block
        sums as `read` does."""
        return self._read(layer, start, length, offset, size, nowait=True)

    def read(
        self, layer: Digest, start: UncompressedOffset, length: int, offset: int, size: int
    ) -> bytes | None:
        """Bytes `[offset, offset + size)` of the inflated span that starts at tar offset
        `start` and is `length` bytes long (offsets relative to the span), or None on a miss.

        Reads the blocks holding the bytes asked for and their sums (two `pread`s). A file
        whose size is not that of `length` bytes and their sums (torn, or written for another
        span layout) or whose blocks fail their sums is deleted and counted in
        `corrupt_dropped`. Also
        refreshes the span's recency (the file mtime only when it was not already the most
        recent entry, so a run of reads in one span costs one `utime`). Never raises.
        """
        return self._read(layer, start, length, offset, size, nowait=False)

    def _read(
        self,
        layer: Digest,
        start: UncompressedOffset,
        length: int,
        offset: int,
        size: int,
        *,
        nowait: bool,
    ) -> bytes | None:
        key = (layer, int(start))
        want = max(0, min(size, length - offset))
        with self._lock:
            if key not in self._lru:
                if not nowait:
                    self._misses += 1
                return None
            was_newest = next(reversed(self._lru)) == key
            if nowait and not was_newest:
                return None  # its recency needs a `utime`: a write, for a worker thread
            self._lru.move_to_end(key)
        path = self._path(layer, start)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            if nowait:
                return None  # the worker thread's `read` finds out and counts it
            with self._lock:
                self._forget(key)
                self._misses += 1
            return None
        blocks = -(-length // INFLATED_BLOCK_BYTES)
        try:
            actual = os.fstat(fd).st_size
            if actual != length + blocks * _SUM.size:
                if nowait:
                    return None
                self._drop(key, path, f"has {actual} bytes, expected {length} and their sums")
                return None
            data = b""
            if want:
                first = offset // INFLATED_BLOCK_BYTES
                last = (offset + want - 1) // INFLATED_BLOCK_BYTES
                lo = first * INFLATED_BLOCK_BYTES
                chunk_size = min((last + 1) * INFLATED_BLOCK_BYTES, length) - lo
                sums_size = (last - first + 1) * _SUM.size
                sums_at = length + first * _SUM.size
                if nowait:
                    chunk = _pread_cached(fd, chunk_size, lo)
                    sums = _pread_cached(fd, sums_size, sums_at)
                    if chunk is None or sums is None:
                        return None
                else:
                    chunk = os.pread(fd, chunk_size, lo)
                    sums = os.pread(fd, sums_size, sums_at)
                if len(sums) != sums_size:
                    self._drop(key, path, "lost its sums while being read")
                    return None
                view = memoryview(chunk)
                for n, (expected,) in enumerate(_SUM.iter_unpack(sums)):
                    block = view[n * INFLATED_BLOCK_BYTES : (n + 1) * INFLATED_BLOCK_BYTES]
                    if crc32(block) != expected:
                        self._drop(key, path, f"fails the sum of block {first + n}")
                        return None
                data = chunk[offset - lo : offset - lo + want]
            if not was_newest:
                with contextlib.suppress(OSError):
                    os.utime(fd)
        except OSError:
            if nowait:
                return None
            with self._lock:
                self._misses += 1
            return None
        finally:
            os.close(fd)
        if len(data) != want:
            with self._lock:
                self._misses += 1
            return None
        with self._lock:
            self._hits += 1
            self._hit_bytes += len(data)
        return data


def _pread_cached(fd: int, size: int, offset: int) -> bytes | None:
    """`size` bytes of `fd` at `offset` when all are in the page cache, else None (the read
    would wait for the disk, or is short)."""
    buf = bytearray(size)
    try:
        got = os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
    except OSError:  # BlockingIOError: not all in memory
        return None
    return bytes(buf) if got == size else None
