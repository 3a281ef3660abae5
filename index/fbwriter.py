"""A fast, byte-exact stand-in for the `flatbuffers` runtime's `Builder`, for zTOC encoding.

The `flatbuffers` Python `Builder` is a faithful port of the Go one (the AWS marshaler's output
is reproduced by it), but it spends about 100 µs per zTOC entry in small
method calls. `FlatWriter` produces the *same bytes* for the same sequence of operations while
doing the arithmetic in bulk:

* the buffer grows backwards, so it is kept as a list of chunks in write order and joined
  reversed at the end; every alignment decision depends only on the number of bytes written so
  far (the builder's `Offset()`), never on the buffer's capacity, which is why this is exact;
* `Prep(size, additional)` pads with `-(offset + additional) mod size` zero bytes and records the
  largest alignment seen (used by `finish`);
* tables write their fields in the order given, each aligned to its own size, then a 4-byte
  vtable offset, then the vtable unless an identical one (same object size and field offsets)
  was written before, exactly as `Builder.WriteVtable` deduplicates.

Only the operations the zTOC schema needs exist. Offsets returned are builder offsets
(bytes from the end of the buffer), like the runtime's `UOffsetT` values.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

from index.errors import SociableError

MAX_BUFFER_SIZE: Final = 2**31
"""The runtime refuses to grow a buffer past 2 GiB; so does `finish`."""

UOFFSET: Final = "U"
"""Field kind of a reference to a string, vector or table (a 4-byte relative offset)."""

_SIZES: Final = {"q": 8, "i": 4, "I": 4, "b": 1, "B": 1, "h": 2, "H": 2, UOFFSET: 4}
_ZEROS: Final = tuple(bytes(n) for n in range(8))
_pack_u32 = struct.Struct("<I").pack
_pack_i32 = struct.Struct("<i").pack
_PACKERS: Final = {k: struct.Struct("<" + k).pack for k in _SIZES if k != UOFFSET}

Field = tuple[int, str, int]
"""(slot, kind, value): kind is a `struct` code (`q`, `i`, `I`, `b`, …) or `UOFFSET`."""


class FlatBufferSizeError(SociableError, ValueError):
    """The finished buffer would exceed `MAX_BUFFER_SIZE`."""


class FlatWriter:
    """Builds one flatbuffer back to front; see the module docstring for the exactness rules.

    Not reusable after `finish`. Values are not range-checked here beyond what `struct`
    does (`struct.error` for a value that does not fit its kind); callers validate.
    """

    __slots__ = ("_minalign", "_off", "_parts", "_vtables")

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._off = 0
        self._minalign = 1
        self._vtables: dict[tuple[int, ...], int] = {}

    @property
    def offset(self) -> int:
        """Bytes written so far (the runtime's `Builder.Offset()`)."""
        return self._off

    def _prep(self, size: int, additional: int) -> None:
        if size > self._minalign:
            self._minalign = size
        pad = -(self._off + additional) & (size - 1)
        if pad:
            self._parts.append(bytes(pad))
            self._off += pad

    def string(self, raw: bytes) -> int:
        """`Builder.CreateString` of already-encoded bytes; returns its offset."""
        n = len(raw)
        if self._minalign < 4:
            self._minalign = 4
        pad = -(self._off + n + 1) & 3
        # written back to front: the alignment padding ends up after the string in memory
        self._parts.append(_pack_u32(n) + raw + _ZEROS[pad + 1])
        self._off += pad + n + 5
        return self._off

    def byte_vector(self, data: bytes) -> int:
        """`Builder.CreateByteVector`; returns its offset."""
        n = len(data)
        self._prep(4, n)
        self._parts.append(_pack_u32(n) + data)
        self._off += n + 4
        return self._off

    def offset_vector(self, targets: Sequence[int]) -> int:
        """`StartVector(4, n, 4)`, `PrependUOffsetTRelative` of `targets` last to first,
        `EndVector()`: a vector whose element `j` refers to `targets[j]`. Returns its offset."""
        n = len(targets)
        self._prep(4, 4 * n)
        self._prep(4, 4 * n)
        # element j is prepended when (n - 1 - j) later elements are already written
        top = self._off + 4 * n
        values = [top - 4 * j - t for j, t in enumerate(targets)]
        self._parts.append(struct.pack(f"<{n + 1}I", n, *values))
        self._off += 4 * n + 4
        return self._off

    def table(self, num_fields: int, fields: Sequence[Field]) -> int:
        """`StartObject(num_fields)`, one `Prepend…Slot` per field in the given order (callers
        leave out fields equal to their default, as the runtime does), `EndObject()`.
        Returns the table's offset."""
        parts = self._parts
        append = parts.append
        off = object_end = self._off
        minalign = self._minalign
        slots = [0] * num_fields
        for slot, kind, value in fields:
            size = _SIZES[kind]
            if size > minalign:
                minalign = size
            pad = -off & (size - 1)
            if pad:
                append(_ZEROS[pad])
                off += pad
            if kind == UOFFSET:
                append(_pack_u32(off - value + 4))
            else:
                append(_PACKERS[kind](value))
            off += size
            slots[slot] = off
        if minalign < 4:
            minalign = 4
        pad = -off & 3
        if pad:
            append(_ZEROS[pad])
            off += pad
        self._minalign = minalign
        object_offset = off + 4
        last = num_fields - 1
        while last >= 0 and not slots[last]:
            last -= 1
        entries = [object_offset - s if s else 0 for s in slots[: last + 1]]
        object_size = object_offset - object_end
        key = (object_size, *entries)
        existing = self._vtables.get(key)
        if existing is None:
            vtable_bytes = 2 * (len(entries) + 2)
            parts.append(_pack_i32(vtable_bytes))
            parts.append(struct.pack(f"<{len(entries) + 2}H", vtable_bytes, object_size, *entries))
            self._off = object_offset + vtable_bytes
            self._vtables[key] = self._off
        else:
            parts.append(_pack_i32(existing - object_offset))
            self._off = object_offset
        return object_offset

    def finish(self, root: int) -> bytes:
        """`Builder.Finish(root)` then `Output()`: the finished buffer.

        Raises `FlatBufferSizeError` past 2 GiB."""
        self._prep(self._minalign, 4)
        self._prep(4, 0)
        self._parts.append(_pack_u32(self._off - root + 4))
        self._off += 4
        if self._off > MAX_BUFFER_SIZE:
            raise FlatBufferSizeError(
                f"flatbuffer of {self._off} bytes exceeds the {MAX_BUFFER_SIZE}-byte limit"
            )
        self._parts.reverse()
        data = b"".join(self._parts)
        self._parts = []
        return data
