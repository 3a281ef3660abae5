"""The zTOC data model, shared by the codec, the builder and every reader.

Offsets in the compressed blob and in the uncompressed tar stream are different types so that
one can never be passed where the other is meant (docs/format.md).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, NamedTuple, NewType

CompressedOffset = NewType("CompressedOffset", int)
"""A byte offset into the compressed layer blob."""

UncompressedOffset = NewType("UncompressedOffset", int)
"""A byte offset into the uncompressed tar stream."""

SpanId = NewType("SpanId", int)
"""The index of a span (0 .. max_span_id)."""

ZTOC_VERSION = "0.9"
BUILD_TOOL_IDENTIFIER = "AWS SOCI CLI v0.2"
DEFAULT_SPAN_SIZE = 4 * 1024 * 1024
DEFAULT_MIN_LAYER_SIZE = 10 * 1024 * 1024


class EntryType(enum.StrEnum):
    """The `type` strings of a zTOC entry (the tar header types SOCI records)."""

    REG = "reg"
    DIR = "dir"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"


class CompressionAlgorithm(enum.IntEnum):
    """`CompressionInfo.compression_algorithm` (flatbuffers byte enum)."""

    GZIP = 1
    UNCOMPRESSED = 2
    ZSTD = 3
    """Not in SOCI's schema: AWS's readers refuse it per layer (docs/format.md, "zstd layers")."""


NO_XATTRS: Final[Mapping[str, str]] = MappingProxyType({})
"""The `xattrs` of an entry without PAX records (shared, read-only)."""


class FileMetadata(NamedTuple):
    """One tar entry as the TOC stores it.

    `uncompressed_offset` is where the entry's *data* starts in the tar stream;
    `xattrs` holds every PAX record of the entry (the name is historical), sorted by key.

    A named tuple, not a frozen dataclass: mounting a layer decodes one per file (tens of
    thousands), and a tuple is created about six times faster.
    """

    name: str
    type: EntryType
    uncompressed_offset: UncompressedOffset
    uncompressed_size: int
    linkname: str = ""
    mode: int = 0
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    mod_time: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: Mapping[str, str] = NO_XATTRS


@dataclass(frozen=True, slots=True)
class CompressionInfo:
    """The zInfo part of a zTOC: the checkpoint blob and one digest per compressed span."""

    algorithm: CompressionAlgorithm
    max_span_id: SpanId
    span_digests: tuple[str, ...]
    checkpoints: bytes


@dataclass(frozen=True, slots=True)
class Ztoc:
    """A decoded zTOC: the TOC (entries in tar order) and the compression info."""

    version: str
    build_tool_identifier: str
    compressed_archive_size: int
    uncompressed_archive_size: int
    files: tuple[FileMetadata, ...]
    compression: CompressionInfo
