"""The local fallback for a layer the index does not cover: download, decompress, apply.

One streaming pass: the blob is read from the registry (native trio I/O through the client,
one gate slot for the whole download) and handed, chunk by chunk through a bounded channel,
to a worker thread that decompresses it (gzip, zstd or plain tar by media type; zstd with
`zstandard`'s stream reader and 1 MiB buffers) and applies it into the snapshot's empty `fs`
directory (`apply.apply_tar`), so the download and the apply overlap. The uncompressed stream
is hashed on the way and must equal the image config's `rootfs.diff_ids` entry for the layer;
the client checks the compressed digest when the download ends. A download that has to start
over (another endpoint after some bytes were applied) empties `fs` and falls back to two
passes: into a temporary file, then decompressed and applied from it.

Cancellation (the caller's timeout, daemon shutdown) is prompt: the download's request is
cancelled, and the apply thread stops between tar members; `dest` is then emptied and the
temporary file removed before `trio.Cancelled` propagates. Blocking file work runs in worker
threads under `UNPACK_THREADS`.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Final, TypeVar, cast

import trio
import zstandard

from index.digest import Digest
from index.oci import mediatypes as mt
from index.oci.blobs import FileSink
from index.oci.client import AsyncRegistryClient
from index.oci.errors import OciError
from index.oci.reference import Reference

from .apply import apply_tar, clear_dir
from .errors import UnpackError

T = TypeVar("T")

DEFAULT_UNPACK_TIMEOUT_SEC = 600.0
"""How long the mounter lets one local unpack (download and apply) take."""
UNPACK_THREADS = trio.CapacityLimiter(2)
"""Worker threads for local unpack: temp-file writes, decompress+apply, cleanup."""
STREAM_CHUNKS: Final = 64
"""Downloaded chunks that may wait for the apply thread (bounds memory per unpack)."""
DECODE_BUFFER_BYTES: Final = 1 << 20
"""Read size of the decompressors and of the buffer the tar reader reads from."""


async def _in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await trio.to_thread.run_sync(
        functools.partial(fn, *args, **kwargs), limiter=UNPACK_THREADS
    )


async def _offload(fn: Callable[[], object]) -> object:
    return await _in_thread(fn)


def _cancel_requested() -> bool:
    """True in an unpack worker thread once its trio caller is cancelled."""
    try:
        trio.from_thread.check_cancelled()
    except trio.Cancelled:
        return True
    return False


def _apply(tmp: Path, media_type: str, dest: Path, userxattr: bool) -> Digest:
    """Decompress and apply (worker thread). Raises UnpackError."""
    try:
        with open(tmp, "rb") as raw, _decoded(raw, media_type) as stream:
            return apply_tar(stream, dest, userxattr=userxattr, cancelled=_cancel_requested)
    except (OSError, EOFError, zstandard.ZstdError) as e:
        raise UnpackError(f"decompressing {tmp.name} into {dest}: {e}") from e


class _Restarted(Exception):
    """The download starts over after bytes were already applied."""


class _ApplyStopped(Exception):
    """The apply thread stopped reading (it failed): the download stops too."""


class _StreamSink:
    """A `BlobSink` sending the blob's chunks to the apply thread."""

    def __init__(self, send: trio.MemorySendChannel[bytes]) -> None:
        self._send = send
        self.sent = 0

    async def write(self, chunk: bytes) -> None:
        try:
            await self._send.send(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise _ApplyStopped() from e
        self.sent += len(chunk)

    async def reset(self) -> None:
        if self.sent:
            raise _Restarted(f"download restarted after {self.sent} bytes")


class _ChannelReader(io.RawIOBase):
    """The blob as a file, in the apply thread: each chunk is received from trio."""

    def __init__(self, receive: trio.MemoryReceiveChannel[bytes]) -> None:
        self._receive = receive
        self._chunk = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._chunk:
            try:
                self._chunk = memoryview(trio.from_thread.run(self._receive.receive))
            except trio.EndOfChannel:
                return 0
        n = min(len(buffer), len(self._chunk))
        buffer[:n] = self._chunk[:n]
        self._chunk = self._chunk[n:]
        return n


@contextmanager
def _decoded(raw: IO[bytes], media_type: str) -> Iterator[IO[bytes]]:
    """The tar stream of the blob `raw` (gzip unless the media type says zstd or tar)."""
    try:
        compression = mt.layer_compression(media_type)
    except ValueError:
        compression = mt.LayerCompression.GZIP
    if compression is mt.LayerCompression.ZSTD:
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_size=DECODE_BUFFER_BYTES)
        with reader:
            yield cast(IO[bytes], io.BufferedReader(reader, DECODE_BUFFER_BYTES))
    elif compression is mt.LayerCompression.NONE:
        yield raw
    else:
        with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
            yield cast(IO[bytes], io.BufferedReader(gz, DECODE_BUFFER_BYTES))


def _apply_stream(
    receive: trio.MemoryReceiveChannel[bytes], media_type: str, dest: Path, userxattr: bool
) -> Digest:
    """Decompress and apply what arrives on `receive` (worker thread). Raises UnpackError."""
    try:
        raw = _ChannelReader(receive)  # unbuffered: a read returns what has arrived
        with _decoded(cast(IO[bytes], raw), media_type) as stream:
            return apply_tar(stream, dest, userxattr=userxattr, cancelled=_cancel_requested)
    except (OSError, EOFError, zstandard.ZstdError) as e:
        raise UnpackError(f"decompressing the layer into {dest}: {e}") from e
    finally:
        with contextlib.suppress(trio.RunFinishedError, trio.Cancelled):
            trio.from_thread.run_sync(receive.close)  # a download still sending stops


async def _stream_unpack(
    client: AsyncRegistryClient,
    ref: Reference,
    layer: Digest,
    media_type: str,
    dest: Path,
    userxattr: bool,
) -> tuple[int, Digest]:
    """Download and apply in one pass; (compressed bytes, diffID). Raises UnpackError,
    `_Restarted`."""
    send, receive = trio.open_memory_channel[bytes](STREAM_CHUNKS)
    applied: list[Digest] = []
    apply_error: list[BaseException] = []

    async def apply() -> None:
        try:
            applied.append(
                await trio.to_thread.run_sync(
                    _apply_stream, receive, media_type, dest, userxattr, limiter=UNPACK_THREADS
                )
            )
        except UnpackError as e:
            apply_error.append(e)

    download_error: Exception | None = None
    desc = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(apply)
        async with send:
            try:
                desc = await client.fetch_blob(ref, layer, _StreamSink(send))
            except _ApplyStopped:
                pass  # the apply thread's error says why
            except (_Restarted, OciError, OSError) as e:
                download_error = e
    if isinstance(download_error, _Restarted):
        raise download_error
    if download_error is not None:
        raise UnpackError(f"downloading {ref.name}@{layer}: {download_error}") from download_error
    if apply_error:
        raise apply_error[0]
    assert desc is not None and applied
    return desc.size, applied[0]


async def layer_diff_id(
    client: AsyncRegistryClient, ref: Reference, manifest: Digest, layer: Digest
) -> tuple[Digest, str]:
    """The diffID and media type of `layer` in image manifest `manifest`.

    Raises UnpackError when the manifest or config cannot be read or does not list the layer.
    """
    try:
        _, data = await client.get_manifest(ref, manifest)
        doc = json.loads(data)
        layers = doc["layers"]
        position = next(i for i, d in enumerate(layers) if d.get("digest") == layer)
        config = json.loads(await client.read_blob(ref, Digest(doc["config"]["digest"])))
        diff_id = Digest(config["rootfs"]["diff_ids"][position])
        return diff_id, str(layers[position].get("mediaType", ""))
    except StopIteration as e:
        raise UnpackError(f"layer {layer} is not in image manifest {ref.name}@{manifest}") from e
    except (OciError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        # AttributeError: a document of the wrong JSON shape (a layer that is not an object)
        raise UnpackError(f"image {ref.name}@{manifest}: cannot read diffID of {layer}: {e}") from e


async def unpack_layer(
    client: AsyncRegistryClient,
    ref: Reference,
    manifest: Digest,
    layer: Digest,
    dest: Path,
    tmp_dir: Path,
    *,
    userxattr: bool = False,
) -> int:
    """Download `layer` of image `manifest` and apply it into the empty directory `dest`.

    Returns the compressed bytes downloaded. On failure `dest` is emptied again and
    UnpackError raised (download, digest, decompress, apply or diffID mismatch); on
    cancellation `dest` is emptied and `trio.Cancelled` propagates. `tmp_dir` is created; a
    temporary file in it (only when a download starts over) is always removed.
    """
    diff_id, media_type = await layer_diff_id(client, ref, manifest, layer)
    try:
        await _in_thread(tmp_dir.mkdir, parents=True, exist_ok=True)
    except OSError as e:
        raise UnpackError(f"temporary directory {tmp_dir}: {e}") from e
    try:
        size, got = await _stream_unpack(client, ref, layer, media_type, dest, userxattr)
    except _Restarted:
        with trio.CancelScope(shield=True):
            await _in_thread(clear_dir, dest)
    except BaseException:
        with trio.CancelScope(shield=True):
            await _in_thread(clear_dir, dest)
        await trio.lowlevel.checkpoint_if_cancelled()
        raise
    else:
        if got != diff_id:
            with trio.CancelScope(shield=True):
                await _in_thread(clear_dir, dest)
            raise UnpackError(
                f"layer {layer}: uncompressed content hashes to {got}, config says {diff_id}"
            )
        return size
    return await _unpack_two_passes(
        client, ref, layer, media_type, diff_id, dest, tmp_dir, userxattr=userxattr
    )


async def _unpack_two_passes(
    client: AsyncRegistryClient,
    ref: Reference,
    layer: Digest,
    media_type: str,
    diff_id: Digest,
    dest: Path,
    tmp_dir: Path,
    *,
    userxattr: bool,
) -> int:
    """Download into a temporary file in `tmp_dir`, then decompress and apply it; as
    `unpack_layer`."""
    try:
        await _in_thread(tmp_dir.mkdir, parents=True, exist_ok=True)
        fd, tmp_name = await _in_thread(tempfile.mkstemp, prefix="layer-", dir=tmp_dir)
    except OSError as e:
        raise UnpackError(f"temporary file in {tmp_dir}: {e}") from e
    tmp = Path(tmp_name)
    try:
        try:
            try:
                desc = await client.fetch_blob(ref, layer, FileSink(fd, _offload))
            finally:
                os.close(fd)
        except (OciError, OSError) as e:
            raise UnpackError(f"downloading {ref.name}@{layer}: {e}") from e
        got = await trio.to_thread.run_sync(
            _apply, tmp, media_type, dest, userxattr, limiter=UNPACK_THREADS
        )
        if got != diff_id:
            raise UnpackError(
                f"layer {layer}: uncompressed content hashes to {got}, config says {diff_id}"
            )
        return desc.size
    except BaseException:
        with trio.CancelScope(shield=True):
            await _in_thread(clear_dir, dest)
        # An apply stopped by cancellation surfaces as UnpackError: report the cancellation.
        await trio.lowlevel.checkpoint_if_cancelled()
        raise
    finally:
        with trio.CancelScope(shield=True):
            await _in_thread(tmp.unlink, missing_ok=True)
