"""Content digests (`sha256:<hex>`), the one identity every blob and span has."""

from __future__ import annotations

import hashlib
import re

from index.errors import SociableError

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


class DigestError(SociableError, ValueError):
    """A string is not a valid `sha256:<64 hex>` digest."""


class Digest(str):
    """A validated `sha256:<hex>` digest. Compares and hashes like the plain string."""

    __slots__ = ()

    def __new__(cls, value: str) -> Digest:
        if not _DIGEST_RE.match(value):
            raise DigestError(f"invalid digest {value!r}: want sha256:<64 lowercase hex>")
        return super().__new__(cls, value)

    @property
    def hex(self) -> str:
        return self[len("sha256:") :]

    @classmethod
    def of(cls, data: bytes | bytearray | memoryview) -> Digest:
        """The digest of `data`."""
        return cls("sha256:" + hashlib.sha256(data).hexdigest())

    @classmethod
    def from_hasher(cls, hasher: hashlib._Hash) -> Digest:
        return cls("sha256:" + hasher.hexdigest())
