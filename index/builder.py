"""Build the zTOC of one layer in a single streaming pass, and of several layers in parallel.

One pass per layer: the blob is read in large chunks, inflated once (gzip) or passed through
(tar); the output feeds the TOC builder (`index.toc.TocBuilder`) while checkpoints and span
digests are collected on the way (`index.zinfo`). Inflation and hashing run in C with the GIL
released, so layers build in parallel threads.
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from index.errors import SociableError
from index.model import (
    BUILD_TOOL_IDENTIFIER,
    DEFAULT_SPAN_SIZE,
    ZTOC_VERSION,
    CompressionAlgorithm,
    CompressionInfo,
    FileMetadata,
    SpanId,
    Ztoc,
)
from index.oci.mediatypes import LayerCompression, layer_compression
from index.toc import TarError, TocBuilder
from index.zinfo import (
    DEFAULT_READ_SIZE,
    Readable,
    ZinfoError,
    build_gzip_checkpoints,
    build_tar_spans,
    decode_gzip_zinfo,
    decode_tar_zinfo,
)
from index.zstd_frames import SingleFrameZstd, ZstdKind, build_zstd_spans, decode_zstd_zinfo


class BuildError(SociableError):
    """Base of the errors raised while building a zTOC."""


class LayerSkipped(BuildError):
    """The layer gets no zTOC (zstd without `zstd=True`, one-frame zstd); the index is built
    without it, not an error."""


class NotALayer(BuildError):
    """The media type is not a layer media type; building an index with it fails."""


class LayerBuildError(BuildError):
    """The layer blob could not be indexed (corrupt gzip, unsupported tar entry, I/O error)."""


class TocSink(Protocol):
    """What the builder needs from a TOC builder (`index.toc.TocBuilder` implements it).

    Errors it raises must be `index.toc.TarError`s to be reported as `LayerBuildError`.
    """

    def feed(self, data: bytes | memoryview) -> None:
        """Consume the next uncompressed bytes of the tar stream."""

    def finish(self) -> tuple[list[FileMetadata], int]:
        """The entries in tar order and the tar EOF position (uncompressed_archive_size)."""


TocFactory = Callable[[], TocSink]

ProgressCallback = Callable[[int], None]
"""Called with the number of blob bytes read so far."""


class _ProgressReader:
    """Wraps a binary stream; reports the running byte count after every `read`."""

    __slots__ = ("_done", "_on_progress", "_src")

    def __init__(self, src: Readable, on_progress: ProgressCallback) -> None:
        self._src = src
        self._on_progress = on_progress
        self._done = 0

    def read(self, size: int = -1) -> bytes:
        data = self._src.read(size)
        self._done += len(data)
        self._on_progress(self._done)
        return data


def _default_toc_factory() -> TocSink:
    return TocBuilder()


def algorithm_for_media_type(media_type: str, *, name: str = "") -> CompressionAlgorithm:
    """The zTOC compression algorithm for a layer media type (docs/format.md).

    Raises `LayerSkipped` for zstd layers and `NotALayer` for other media types. `name`
    (e.g. the layer digest) is only used in messages.
    """
    label = name or "layer"
    try:
        compression = layer_compression(media_type)
    except ValueError as e:
        raise NotALayer(f"{label}: {media_type!r} is not a layer mediaType") from e
    if compression is LayerCompression.GZIP:
        return CompressionAlgorithm.GZIP
    if compression is LayerCompression.NONE:
        return CompressionAlgorithm.UNCOMPRESSED
    raise LayerSkipped(f"ztoc skipped - layer {label} ({media_type}) has unsupported format")


@contextmanager
def _build_errors(name: str) -> Iterator[None]:
    """The error table of one layer's build: what reading, indexing or the TOC raise, as a
    `LayerBuildError` naming the layer (a one-frame zstd layer: `LayerSkipped`)."""
    try:
        yield
    except SingleFrameZstd as e:
        raise LayerSkipped(f"{ZstdKind.SINGLE_FRAME.label}: {e}, unpacked when pulled") from e
    except ZinfoError as e:
        raise LayerBuildError(f"{name}: cannot index the layer: {e}") from e
    except TarError as e:
        raise LayerBuildError(f"{name}: cannot build the TOC: {e}") from e
    except OSError as e:
        raise LayerBuildError(f"{name}: cannot read the layer: {e}") from e


def build_ztoc_from_stream(
    src: Readable,
    algorithm: CompressionAlgorithm,
    span_size: int = DEFAULT_SPAN_SIZE,
    *,
    toc_factory: TocFactory = _default_toc_factory,
    read_size: int = DEFAULT_READ_SIZE,
    name: str = "layer",
    on_progress: ProgressCallback | None = None,
) -> Ztoc:
    """Build a zTOC from a layer blob read from `src` to its end.

    `compressed_archive_size` is the number of bytes read. `on_progress`, if given, is called
    with the number of blob bytes read so far after each read (from the building thread).
    Raises `LayerBuildError` (chained to the checkpoint, TOC or I/O error) when the blob cannot
    be indexed.
    """
    toc = toc_factory()
    if on_progress is not None:
        src = _ProgressReader(src, on_progress)
    with _build_errors(name):
        if algorithm == CompressionAlgorithm.GZIP:
            gz = build_gzip_checkpoints(src, span_size, toc.feed, read_size=read_size)
            checkpoints = gz.zinfo.encode()
            digests = gz.span_digests
            blob_size = gz.compressed_size
        else:
            tar = build_tar_spans(src, span_size, toc.feed, read_size=read_size)
            checkpoints = tar.zinfo.encode()
            digests = tar.span_digests
            blob_size = tar.size
        entries, uncompressed_size = toc.finish()
    return Ztoc(
        version=ZTOC_VERSION,
        build_tool_identifier=BUILD_TOOL_IDENTIFIER,
        compressed_archive_size=blob_size,
        uncompressed_archive_size=uncompressed_size,
        files=tuple(entries),
        compression=CompressionInfo(
            algorithm=algorithm,
            max_span_id=SpanId(len(digests) - 1),
            span_digests=tuple(digests),
            checkpoints=checkpoints,
        ),
    )


def build_ztoc(
    path: Path,
    media_type: str,
    span_size: int = DEFAULT_SPAN_SIZE,
    *,
    toc_factory: TocFactory = _default_toc_factory,
    read_size: int = DEFAULT_READ_SIZE,
    on_progress: ProgressCallback | None = None,
    zstd: bool = False,
    annotations: Mapping[str, str] | None = None,
    diff_id: str | None = None,
) -> Ztoc:
    """Build the zTOC of the layer blob at `path` in one pass.

    `on_progress` gets the bytes read so far (see `build_ztoc_from_stream`). zstd layers are
    indexed only with `zstd=True` (see `build_zstd_ztoc` for `annotations` and `diff_id`).
    Raises `LayerSkipped` (zstd without `zstd`, one-frame zstd), `NotALayer` (not a layer
    media type), `LayerBuildError` (unreadable file, corrupt data, unsupported tar entry).
    """
    if zstd and is_zstd_layer(media_type):
        return build_zstd_ztoc(
            path,
            span_size,
            toc_factory=toc_factory,
            on_progress=on_progress,
            annotations=annotations,
            diff_id=diff_id,
        )
    algorithm = algorithm_for_media_type(media_type, name=str(path))
    try:
        f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed below, errors translated
    except OSError as e:
        raise LayerBuildError(f"{path}: cannot open the layer: {e}") from e
    with f:
        return build_ztoc_from_stream(
            f,
            algorithm,
            span_size,
            toc_factory=toc_factory,
            read_size=read_size,
            name=str(path),
            on_progress=on_progress,
        )


def is_zstd_layer(media_type: str) -> bool:
    """Whether `media_type` is a zstd layer media type."""
    try:
        return layer_compression(media_type) is LayerCompression.ZSTD
    except ValueError:
        return False


def build_zstd_ztoc(
    path: Path,
    span_size: int = DEFAULT_SPAN_SIZE,
    *,
    toc_factory: TocFactory = _default_toc_factory,
    on_progress: ProgressCallback | None = None,
    annotations: Mapping[str, str] | None = None,
    diff_id: str | None = None,
) -> Ztoc:
    """The zTOC of the zstd layer at `path`: zstd:chunked (found by its `annotations`, either
    spelling, or its footer), seekable, or any other multi-frame layer (docs/format.md, "zstd
    layers"); one pass, the blob mapped read-only.

    With `diff_id` (the image config's `rootfs.diff_ids` entry) the decoded stream must hash
    to it: containers/storage before v1.52 dropped the bytes after the tar end, and such a
    layer cannot be served as its image says. Raises `LayerSkipped` for a one-frame layer,
    `LayerBuildError` for anything else that stops the build.
    """
    name = str(path)
    toc = toc_factory()
    with _build_errors(name):
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise LayerBuildError(f"{name}: cannot index the layer: the blob is empty")
            with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as mapped:
                view = memoryview(mapped)
                try:
                    built = build_zstd_spans(
                        view,
                        span_size,
                        toc.feed,
                        annotations=annotations,
                        on_progress=on_progress,
                    )
                finally:
                    view.release()
        entries, uncompressed_size = toc.finish()
    if diff_id is not None and built.diff_id != diff_id:
        raise LayerBuildError(
            f"{name}: the layer decodes to {built.diff_id}, its image config says {diff_id}"
        )
    return Ztoc(
        version=ZTOC_VERSION,
        build_tool_identifier=BUILD_TOOL_IDENTIFIER,
        compressed_archive_size=built.compressed_size,
        uncompressed_archive_size=uncompressed_size,
        files=tuple(entries),
        compression=CompressionInfo(
            algorithm=CompressionAlgorithm.ZSTD,
            max_span_id=SpanId(len(built.span_digests) - 1),
            span_digests=built.span_digests,
            checkpoints=built.zinfo.encode(),
        ),
    )


def describe_compression(info: CompressionInfo) -> str:
    """How a zTOC's layer is indexed, for reports: `gzip`, `tar`, `zstd:chunked`, `seekable
    zstd` or `multi-frame zstd`."""
    if info.algorithm == CompressionAlgorithm.ZSTD:
        return decode_zstd_zinfo(info.checkpoints).kind.label
    if info.algorithm == CompressionAlgorithm.GZIP:
        return "gzip"
    return "tar"


def span_size_of(info: CompressionInfo) -> int:
    """The span size a zTOC was built with (from its checkpoint blob)."""
    if info.algorithm == CompressionAlgorithm.ZSTD:
        return decode_zstd_zinfo(info.checkpoints).span_size
    if info.algorithm == CompressionAlgorithm.GZIP:
        return decode_gzip_zinfo(info.checkpoints).span_size
    return decode_tar_zinfo(info.checkpoints).span_size


@dataclass(frozen=True, slots=True)
class LayerJob:
    """One layer to index: its blob on disk and its media type."""

    path: Path
    media_type: str


@dataclass(frozen=True, slots=True)
class LayerOutcome:
    """The result for one `LayerJob`: a zTOC, or the `BuildError` that stopped it.

    `seconds` is the wall time the build took.
    """

    job: LayerJob
    ztoc: Ztoc | None
    error: BuildError | None
    seconds: float


def default_parallelism() -> int:
    """The default number of layers built at once: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def build_ztocs_parallel(
    jobs: Sequence[LayerJob],
    span_size: int = DEFAULT_SPAN_SIZE,
    *,
    max_workers: int | None = None,
    toc_factory: TocFactory = _default_toc_factory,
    on_done: Callable[[LayerOutcome], None] | None = None,
) -> list[LayerOutcome]:
    """Build the zTOCs of several layers in a bounded thread pool.

    Returns one outcome per job, in job order. A `BuildError` (including `LayerSkipped`) is
    recorded in its outcome and does not stop the others; any other exception is a bug and is
    re-raised after the pool has shut down. `on_done` is called (from the calling thread) as
    each layer finishes, in completion order, e.g. to show progress. `max_workers` defaults to
    `default_parallelism()`.
    """
    workers = max_workers if max_workers is not None else default_parallelism()
    if workers < 1:
        raise ValueError(f"max_workers must be at least 1, got {workers}")

    def run(job: LayerJob) -> LayerOutcome:
        started = time.perf_counter()
        try:
            ztoc = build_ztoc(job.path, job.media_type, span_size, toc_factory=toc_factory)
        except BuildError as e:
            return LayerOutcome(job, None, e, time.perf_counter() - started)
        return LayerOutcome(job, ztoc, None, time.perf_counter() - started)

    from concurrent.futures import FIRST_COMPLETED, wait

    outcomes: dict[int, LayerOutcome] = {}
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ztoc-build") as pool:
        futures: dict[Future[LayerOutcome], int] = {
            pool.submit(run, job): i for i, job in enumerate(jobs)
        }
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    outcome = fut.result()
                    outcomes[futures[fut]] = outcome
                    if on_done is not None:
                        on_done(outcome)
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
    return [outcomes[i] for i in range(len(jobs))]
