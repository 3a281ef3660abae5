"""Turning distribution API answers into values, or into the right RegistryError.

Functions over `httpx.Response` objects (streamed by an `httpx.AsyncClient`; the ones that
read a body are async) and bytes: error translation (status → exception class, registry
error JSON → message), bodies read as sent on the wire, Range answers checked against what
was asked, referrers index parsing.
"""

from __future__ import annotations

import email.utils
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Protocol

import httpx

from index.digest import Digest, DigestError
from index.oci.descriptor import Descriptor
from index.oci.errors import (
    DescriptorError,
    NotFoundError,
    RangeNotSatisfiableError,
    RegistryError,
    TransportError,
    UnauthorizedError,
    UnexpectedResponseError,
)
from index.oci.reference import Reference

IO_CHUNK_BYTES = 1024 * 1024
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_LINK_RE = re.compile(r'<([^>]*)>\s*;\s*rel="?next"?')
_TAG_INVALID_RE = re.compile(r"[^a-zA-Z0-9_.-]")


def referrers_tag(digest: Digest) -> str:
    """The tag-schema tag holding the referrers of `digest` (`sha256-<hex>`)."""
    alg, _, encoded = str(digest).partition(":")
    return _TAG_INVALID_RE.sub("-", f"{alg[:32]}-{encoded[:64]}")


def media_type_of(response: httpx.Response) -> str:
    """The Content-Type without parameters ("" when absent)."""
    return str(response.headers.get("content-type", "")).split(";", 1)[0].strip()


async def iter_raw(response: httpx.Response) -> AsyncIterator[bytes]:
    """The body as sent (no content-decoding: digests are over the wire bytes)."""
    if response.is_stream_consumed:  # already read (e.g. a response built from bytes)
        yield response.content
    else:
        async for chunk in response.aiter_raw(IO_CHUNK_BYTES):
            yield chunk


def error_detail(body: bytes) -> str:
    """A registry error body (`{"errors":[{code,message}]}`) as one line of text."""
    try:
        doc = json.loads(body)
        errors = doc.get("errors") or []
        joined = "; ".join(f"{e.get('code', '')}: {e.get('message', '')}" for e in errors)
        return joined or body[:200].decode(errors="replace").strip()
    except (ValueError, AttributeError, TypeError):
        return body[:200].decode(errors="replace").strip()


async def read_and_close(response: httpx.Response) -> bytes:
    """The body of an answer we only inspect (an error, a challenge), then closed; empty when
    it cannot be read. Never raises an httpx error."""
    try:
        return await response.aread()
    except httpx.HTTPError:
        return b""
    finally:
        await response.aclose()


def retry_after_sec(response: httpx.Response, now: float | None = None) -> float | None:
    """The wait a `Retry-After` header asks for, in seconds (delay-seconds or an HTTP date,
    RFC 9110 10.2.3; a date in the past is 0); None when there is none or it cannot be read.
    `now` is the wall clock in seconds since the epoch (default: the current time)."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


async def status_error(response: httpx.Response, what: str) -> RegistryError:
    """The RegistryError for a non-success `response` (reads the body if streamed, and
    closes it); a 429 or 503 carries its `Retry-After` in `retry_after_sec`."""
    body = await read_and_close(response)
    status = response.status_code
    message = (
        f"{what}: HTTP {status} {error_detail(body)} ({response.request.method} {response.url})"
    )
    url = str(response.url)
    if status in (429, 503):
        return UnexpectedResponseError(
            message, url=url, status=status, retry_after_sec=retry_after_sec(response)
        )
    if status == 404:
        return NotFoundError(message, url=url, status=status)
    if status in (401, 403):
        return UnauthorizedError(message, url=url, status=status)
    if status == 416:
        return RangeNotSatisfiableError(message, url=url, status=status)
    return UnexpectedResponseError(message, url=url, status=status)


def referrer_descriptor(media_type: str, data: bytes) -> Descriptor:
    """The referrer descriptor of a manifest: artifactType and annotations copied from it."""
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise DescriptorError(f"manifest {Digest.of(data)} is not JSON") from e
    artifact = doc.get("artifactType") or (doc.get("config") or {}).get("mediaType", "")
    annotations = doc.get("annotations") or {}
    return Descriptor.of(
        media_type, data, annotations=dict(annotations), artifact_type=str(artifact)
    )


async def read_capped(response: httpx.Response, limit: int, what: str) -> bytes:
    """The whole body, at most `limit` bytes; closes the response.

    Raises UnexpectedResponseError when larger, TransportError when the stream breaks.
    """
    data = bytearray()
    try:
        async for chunk in iter_raw(response):
            data += chunk
            if len(data) > limit:
                raise UnexpectedResponseError(
                    f"{what}: larger than {limit} bytes ({response.url})", url=str(response.url)
                )
    except httpx.HTTPError as e:
        raise TransportError(f"{what}: reading {response.url}: {e}", url=str(response.url)) from e
    finally:
        await response.aclose()
    return bytes(data)


def subject_of(data: bytes) -> Digest | None:
    """The `subject.digest` of a manifest, or None (no subject, or not a manifest)."""
    try:
        subject = json.loads(data).get("subject")
        return Digest(subject["digest"]) if subject else None
    except (ValueError, AttributeError, KeyError, TypeError, DigestError):
        return None


def next_link(response: httpx.Response) -> httpx.URL | None:
    """The absolute URL of the `Link: <…>; rel="next"` page, if any."""
    for value in response.headers.get_list("link"):
        match = _LINK_RE.search(value)
        if match:
            return response.url.join(match.group(1))
    return None


def index_entries(data: bytes, where: str, artifact_type: str | None) -> list[Descriptor]:
    """The `manifests` of an image index, only those of `artifact_type` when given.

    Raises UnexpectedResponseError naming `where` when the index is malformed.
    """
    try:
        doc = json.loads(data)
        entries = [Descriptor.from_json(m) for m in doc.get("manifests") or []]
    except (ValueError, AttributeError, TypeError, DescriptorError) as e:
        raise UnexpectedResponseError(f"{where}: malformed image index: {e}", url=where) from e
    if artifact_type:
        entries = [d for d in entries if d.artifact_type == artifact_type]
    return entries


def _total_of(response: httpx.Response) -> int:
    """The Content-Length of a 200 answer (-1 when absent or malformed)."""
    try:
        return int(response.headers.get("content-length", "-1"))
    except ValueError:
        return -1


class BodySink(Protocol):
    """Sees the body of a Range answer while it arrives (to start work on it before the whole
    answer is in). Called on the caller's thread; must not block."""

    def begin(self) -> None:
        """An answer's body starts (a retried or redirected request begins again)."""
        ...

    def feed(self, chunk: bytes) -> None:
        """The next bytes of the body, in order."""
        ...


async def range_body(
    response: httpx.Response,
    ref: Reference,
    digest: Digest,
    offset: int,
    length: int,
    sink: BodySink | None = None,
) -> bytes:
    """The `length` bytes at `offset` from a Range answer; closes the response.

    206: Content-Range must start at `offset` and end where asked (or at the blob's end).
    200 (range ignored): the body is skipped to `offset` and cut. Anything else becomes its
    RegistryError. Raises RangeNotSatisfiableError, TransportError (short or broken body).
    `sink` sees a 206 answer's body as it arrives (not a 200's); what it saw is not checked
    here, and is exactly the bytes returned only when this call returns.
    """
    what = f"range {offset}+{length} of blob {ref.name}@{digest}"
    try:
        if response.status_code == 206:
            match = _CONTENT_RANGE_RE.match(response.headers.get("content-range", ""))
            if not match:
                raise RangeNotSatisfiableError(
                    f"{what}: 206 with bad Content-Range {response.headers.get('content-range')!r}",
                    url=str(response.url),
                )
            start, end, total = int(match.group(1)), int(match.group(2)), match.group(3)
            want_end = offset + length - 1
            clipped = total != "*" and end == int(total) - 1 and end < want_end
            if start != offset or (end != want_end and not clipped):
                raise RangeNotSatisfiableError(
                    f"{what}: server sent bytes {start}-{end}, asked {offset}-{want_end}",
                    url=str(response.url),
                )
            if sink is None:
                data = await response.aread()
            else:
                sink.begin()
                chunks = []
                async for chunk in iter_raw(response):
                    sink.feed(chunk)
                    chunks.append(chunk)
                data = b"".join(chunks)
            if len(data) != end - start + 1:
                raise TransportError(
                    f"{what}: got {len(data)} bytes for {start}-{end}", url=str(response.url)
                )
            return data
        if response.status_code == 200:
            buf = bytearray()
            skipped = 0
            async for chunk in iter_raw(response):
                if skipped < offset:
                    take = min(len(chunk), offset - skipped)
                    skipped += take
                    chunk = chunk[take:]
                buf += chunk
                if len(buf) >= length:
                    break
            if len(buf) < length and (offset + len(buf)) < _total_of(response):
                raise TransportError(
                    f"{what}: body ended after {len(buf)} bytes", url=str(response.url)
                )
            return bytes(buf[:length])
        raise await status_error(response, what)
    except httpx.HTTPError as e:
        raise TransportError(f"{what}: reading {response.url}: {e}", url=str(response.url)) from e
    finally:
        await response.aclose()
