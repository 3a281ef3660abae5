"""Read files out of a layer through its zTOC, fetching and inflating only the spans needed.

The caller supplies `read_compressed(start, end)`, which returns the blob bytes `[start, end)`
(from a local file, a registry Range request, a cache...). All spans a read needs are fetched
with ONE call covering them (transfer in bulk), then each span is verified against its zTOC
digest before it is inflated (verify per span): wrong bytes are never returned.

Links are followed as `soci ztoc get-file` does by default (a link's target is looked up as a
literal entry name), falling back to filesystem-style path resolution where that finds nothing;
or as a filesystem would throughout (`follow="path"`). Only entries of this one layer are
visible.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Mapping
from typing import Final, Literal

from index.errors import SociableError
from index.model import CompressedOffset, EntryType, FileMetadata, UncompressedOffset, Ztoc
from index.zinfo import SpanError, SpanMap, ZinfoError, assemble

ReadCompressed = Callable[[CompressedOffset, CompressedOffset], bytes]
"""Returns the layer blob bytes `[start, end)`; it must return exactly `end - start` bytes."""

MAX_LINK_FOLLOWS: Final = 40
"""Like Linux's ELOOP limit."""


class ExtractError(SociableError):
    """Base of the errors raised when reading a file through a zTOC."""


class EntryNotFound(ExtractError):
    """No entry of the layer has that path."""


class NotARegularFile(ExtractError):
    """The path (after following links) is a directory, device, fifo...: it has no data."""


class LinkError(ExtractError):
    """A link loops, is nested too deeply, or points outside this layer's entries."""


class SpanReadError(ExtractError):
    """A span could not be fetched, failed verification, or did not inflate.

    The cause (e.g. `index.zinfo.SpanDigestMismatch`) is chained.
    """


def normalize_name(name: str) -> str:
    """A TOC name as a lookup key: no leading `./` or `/`, no trailing `/`; root is ``""``."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    return "/".join(parts)


def entry_table(ztoc: Ztoc) -> dict[str, FileMetadata]:
    """Entries by normalized name; a later entry with the same name wins (tar semantics)."""
    return {normalize_name(e.name): e for e in ztoc.files}


def _split(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


def resolve_path(
    table: Mapping[str, FileMetadata], path: str, *, follow_last: bool = True
) -> FileMetadata:
    """The entry `path` names, following symlinks (and, at the end, hardlinks).

    Raises `EntryNotFound` or `LinkError`.
    """
    follows = 0
    queue = _split(path)
    resolved: list[str] = []
    while True:
        while queue:
            comp = queue.pop(0)
            if comp == "..":
                if resolved:
                    resolved.pop()
                continue
            candidate = "/".join([*resolved, comp])
            entry = table.get(candidate)
            if entry is not None and entry.type == EntryType.SYMLINK and (queue or follow_last):
                follows += 1
                if follows > MAX_LINK_FOLLOWS:
                    raise LinkError(f"{path!r}: more than {MAX_LINK_FOLLOWS} links followed")
                if entry.linkname.startswith("/"):
                    resolved = []
                queue = _split(entry.linkname) + queue
                continue
            resolved.append(comp)
        key = "/".join(resolved)
        found = table.get(key)
        if found is None:
            raise EntryNotFound(f"{path!r}: no entry {key!r} in the layer")
        if found.type != EntryType.HARDLINK or not follow_last:
            return found
        follows += 1
        if follows > MAX_LINK_FOLLOWS:
            raise LinkError(f"{path!r}: more than {MAX_LINK_FOLLOWS} links followed")
        # A hardlink names its target by archive path.
        queue = _split(found.linkname)
        resolved = []


LinkFollowing = Literal["soci", "path"]
"""How `resolve_entry` follows names and links.

* ``"soci"`` (default), as `soci ztoc get-file` does: the first entry whose name equals the
  given name, and while that entry has a `linkname`, the first entry named exactly that
  (symlinks and hardlinks alike). Where that literal lookup finds nothing (where soci fails),
  the name is also tried without `./` and `/` decorations, then resolved as a path (below).
* ``"path"``: as a filesystem would (`resolve_path`): symlinks relative to their directory,
  directory symlinks inside the path, hardlinks by archive path; the last entry of a name wins.
"""


def _first_by_name(ztoc: Ztoc) -> tuple[dict[str, FileMetadata], dict[str, FileMetadata]]:
    exact: dict[str, FileMetadata] = {}
    normalized: dict[str, FileMetadata] = {}
    for e in ztoc.files:
        exact.setdefault(e.name, e)
        normalized.setdefault(normalize_name(e.name), e)
    return exact, normalized


def _symlink_start(link: FileMetadata) -> str:
    """The path a symlink's target names, for path resolution."""
    if link.linkname.startswith("/"):
        return link.linkname
    return posixpath.join(posixpath.dirname(normalize_name(link.name)), link.linkname)


def _resolve_soci(
    ztoc: Ztoc, table: Mapping[str, FileMetadata], entry_or_name: FileMetadata | str
) -> FileMetadata:
    exact, normalized = _first_by_name(ztoc)

    def literal(name: str) -> FileMetadata | None:
        return exact.get(name) or normalized.get(normalize_name(name))

    if isinstance(entry_or_name, str):
        found = literal(entry_or_name)
        entry = found if found is not None else resolve_path(table, entry_or_name)
    else:
        entry = entry_or_name
    follows = 0
    while entry.linkname and entry.type in (EntryType.SYMLINK, EntryType.HARDLINK):
        follows += 1
        if follows > MAX_LINK_FOLLOWS:
            raise LinkError(f"{entry.name!r}: more than {MAX_LINK_FOLLOWS} links followed")
        target = literal(entry.linkname)
        if target is None:
            start = _symlink_start(entry) if entry.type == EntryType.SYMLINK else entry.linkname
            try:
                target = resolve_path(table, start)
            except EntryNotFound as e:
                raise LinkError(
                    f"{entry.name!r}: {entry.type} to {entry.linkname!r}, which is not in the layer"
                ) from e
        entry = target
    return entry


def _resolve_path_mode(
    table: Mapping[str, FileMetadata], entry_or_name: FileMetadata | str
) -> FileMetadata:
    if isinstance(entry_or_name, str):
        return resolve_path(table, entry_or_name)
    entry = entry_or_name
    if entry.type not in (EntryType.SYMLINK, EntryType.HARDLINK):
        return entry
    # Resolve the link itself, even if a later entry shadows its name.
    start = _symlink_start(entry) if entry.type == EntryType.SYMLINK else entry.linkname
    try:
        return resolve_path(table, start)
    except EntryNotFound as e:
        raise LinkError(
            f"{entry.name!r}: {entry.type} to {entry.linkname!r}, which is not in the layer"
        ) from e


def resolve_entry(
    ztoc: Ztoc, entry_or_name: FileMetadata | str, *, follow: LinkFollowing = "soci"
) -> FileMetadata:
    """The regular-file entry behind a name or entry, links followed (see `LinkFollowing`).

    Raises `EntryNotFound` (no such name), `LinkError` (dangling link, loop, too deep),
    `NotARegularFile` (a directory, device, fifo... after following links).
    """
    table = entry_table(ztoc)
    if follow == "soci":
        entry = _resolve_soci(ztoc, table, entry_or_name)
    elif follow == "path":
        entry = _resolve_path_mode(table, entry_or_name)
    else:
        raise ValueError(f"unknown link following mode {follow!r}")
    name = entry_or_name if isinstance(entry_or_name, str) else entry_or_name.name
    if entry.type != EntryType.REG:
        raise NotARegularFile(f"{name!r} is a {entry.type} entry ({entry.name!r}), not a file")
    return entry


def read_file_range(
    ztoc: Ztoc,
    entry: FileMetadata,
    offset: int,
    size: int,
    read_compressed: ReadCompressed,
    *,
    span_map: SpanMap | None = None,
) -> bytes:
    """Bytes `[offset, offset + size)` of regular-file `entry`, clipped to the file's end.

    Fetches every span the range needs with one `read_compressed` call, verifies each span's
    digest, inflates it and slices out the requested part. Pass `span_map` to reuse one across
    calls. Raises `NotARegularFile`, `SpanReadError` (fetch, digest or inflate failure, cause
    chained), `ExtractError` for a zTOC whose spans do not cover the entry; errors from
    `read_compressed` other than `OSError` propagate unchanged.
    """
    if entry.type != EntryType.REG:
        raise NotARegularFile(f"{entry.name!r} is a {entry.type} entry, not a file")
    if offset < 0 or size < 0:
        raise ValueError(f"negative offset {offset} or size {size}")
    end = min(offset + size, entry.uncompressed_size)
    if offset >= end:
        return b""
    spans = span_map if span_map is not None else _span_map(ztoc)
    try:
        slices = spans.slices_for_range(
            UncompressedOffset(entry.uncompressed_offset + offset), end - offset
        )
        ids = [s.span for s in slices]
        fetch_start = spans.compressed_range(ids[0])[0]
        fetch_end = spans.compressed_range(ids[-1])[1]
    except SpanError as e:
        raise ExtractError(f"{entry.name!r}: zTOC spans do not cover its data: {e}") from e
    try:
        blob = read_compressed(fetch_start, fetch_end)
    except OSError as e:
        raise SpanReadError(
            f"{entry.name!r}: cannot fetch compressed bytes [{fetch_start}, {fetch_end}): {e}"
        ) from e
    try:
        compressed = spans.split_compressed(ids, blob)
        inflated = [spans.read_span(i, c) for i, c in zip(ids, compressed, strict=True)]
    except ZinfoError as e:
        raise SpanReadError(f"{entry.name!r}: {e}") from e
    return assemble(slices, inflated)


def _span_map(ztoc: Ztoc) -> SpanMap:
    try:
        return SpanMap.from_ztoc(ztoc)
    except ZinfoError as e:
        raise ExtractError(f"bad zTOC compression info: {e}") from e


def extract_file(
    ztoc: Ztoc,
    entry_or_name: FileMetadata | str,
    read_compressed: ReadCompressed,
    *,
    span_map: SpanMap | None = None,
    follow: LinkFollowing = "soci",
) -> bytes:
    """The whole content of a regular file, by entry or name, links followed (`follow`).

    Raises `EntryNotFound`, `LinkError`, `NotARegularFile`, `SpanReadError`, `ExtractError`.
    """
    entry = resolve_entry(ztoc, entry_or_name, follow=follow)
    return read_file_range(
        ztoc, entry, 0, entry.uncompressed_size, read_compressed, span_map=span_map
    )
