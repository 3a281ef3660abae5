"""A minimal typed ctypes binding to the system libz.

Python's `zlib` module hides what zran needs (`Z_BLOCK`, `data_type`, `inflatePrime`), so the
checkpoint builder and the span reader call libz directly. Every call goes through a
`ctypes.CDLL` function, which releases the GIL: several layers can be built or several spans
inflated in parallel threads.

`Inflater` owns one `z_stream` and frees it in `close()` (also a context manager). Its methods
raise `ZlibError` for every zlib status that is an error; `Z_OK`, `Z_STREAM_END` and
`Z_BUF_ERROR` (no progress possible) are returned to the caller, who decides.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from types import TracebackType
from typing import Final

from index.errors import SociableError

Z_NO_FLUSH: Final = 0
Z_SYNC_FLUSH: Final = 2
Z_FINISH: Final = 4
Z_BLOCK: Final = 5

Z_OK: Final = 0
Z_STREAM_END: Final = 1
Z_NEED_DICT: Final = 2
Z_ERRNO: Final = -1
Z_STREAM_ERROR: Final = -2
Z_DATA_ERROR: Final = -3
Z_MEM_ERROR: Final = -4
Z_BUF_ERROR: Final = -5
Z_VERSION_ERROR: Final = -6

WINDOW_SIZE: Final = 32768
"""The deflate window: 32 KiB of history."""

WBITS_RAW: Final = -15
"""windowBits for a raw deflate stream (no header, no trailer)."""

WBITS_AUTO: Final = 47
"""windowBits 15 + 32: detect a zlib or gzip header automatically."""

DATA_TYPE_LAST_BLOCK: Final = 64
"""`data_type` bit: the stream is in (or right after) the last deflate block."""

DATA_TYPE_BLOCK_BOUNDARY: Final = 128
"""`data_type` bit: inflate stopped at a block boundary (or right after the header)."""

DATA_TYPE_BITS_MASK: Final = 7
"""`data_type` bits 0-2: unused bits of the last consumed byte."""

_ERROR_NAMES: Final = {
    Z_NEED_DICT: "Z_NEED_DICT",
    Z_ERRNO: "Z_ERRNO",
    Z_STREAM_ERROR: "Z_STREAM_ERROR",
    Z_DATA_ERROR: "Z_DATA_ERROR",
    Z_MEM_ERROR: "Z_MEM_ERROR",
    Z_BUF_ERROR: "Z_BUF_ERROR",
    Z_VERSION_ERROR: "Z_VERSION_ERROR",
}


class ZlibError(SociableError):
    """libz returned an error status (corrupt data, bad arguments, out of memory)."""

    def __init__(self, operation: str, status: int, message: str | None) -> None:
        name = _ERROR_NAMES.get(status, str(status))
        detail = f": {message}" if message else ""
        super().__init__(f"zlib {operation} failed with {name}{detail}")
        self.operation = operation
        self.status = status
        self.zlib_message = message


class ZlibUnavailable(ZlibError):
    """The system libz could not be found or loaded."""


class ZStream(ctypes.Structure):
    """`z_stream` as laid out by zlib on LP64 (64-bit Linux): 112 bytes."""

    _fields_ = [
        ("next_in", ctypes.c_void_p),
        ("avail_in", ctypes.c_uint),
        ("total_in", ctypes.c_ulong),
        ("next_out", ctypes.c_void_p),
        ("avail_out", ctypes.c_uint),
        ("total_out", ctypes.c_ulong),
        ("msg", ctypes.c_char_p),
        ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p),
        ("zfree", ctypes.c_void_p),
        ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int),
        ("adler", ctypes.c_ulong),
        ("reserved", ctypes.c_ulong),
    ]


_ZSTREAM_P = ctypes.POINTER(ZStream)


def _load() -> ctypes.CDLL:
    name = ctypes.util.find_library("z")
    if name is None:
        raise ZlibUnavailable("load", Z_ERRNO, "libz not found by ctypes.util.find_library('z')")
    try:
        lib = ctypes.CDLL(name)
    except OSError as e:
        raise ZlibUnavailable("load", Z_ERRNO, f"cannot load {name}: {e}") from e
    lib.zlibVersion.argtypes = []
    lib.zlibVersion.restype = ctypes.c_char_p
    lib.inflateInit2_.argtypes = [_ZSTREAM_P, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.inflateInit2_.restype = ctypes.c_int
    lib.inflate.argtypes = [_ZSTREAM_P, ctypes.c_int]
    lib.inflate.restype = ctypes.c_int
    lib.inflateEnd.argtypes = [_ZSTREAM_P]
    lib.inflateEnd.restype = ctypes.c_int
    lib.inflateReset2.argtypes = [_ZSTREAM_P, ctypes.c_int]
    lib.inflateReset2.restype = ctypes.c_int
    lib.inflatePrime.argtypes = [_ZSTREAM_P, ctypes.c_int, ctypes.c_int]
    lib.inflatePrime.restype = ctypes.c_int
    lib.inflateSetDictionary.argtypes = [_ZSTREAM_P, ctypes.c_void_p, ctypes.c_uint]
    lib.inflateSetDictionary.restype = ctypes.c_int
    return lib


_lib: ctypes.CDLL | None = None


def libz() -> ctypes.CDLL:
    """The loaded system libz (loaded once). Raises `ZlibUnavailable`."""
    global _lib
    if _lib is None:
        _lib = _load()
    return _lib


def zlib_version() -> str:
    """The runtime libz version string, e.g. "1.2.13"."""
    raw: bytes = libz().zlibVersion()
    return raw.decode("ascii")


class Inflater:
    """One zlib inflate stream.

    Input and output are raw addresses: the caller keeps the buffers alive while the stream
    points into them (`set_input` / `set_output` take an address and a length in bytes).
    """

    __slots__ = ("_closed", "_lib", "_pstream", "stream")

    def __init__(self, window_bits: int) -> None:
        """Start inflating with `window_bits` (e.g. `WBITS_RAW`, `WBITS_AUTO`).

        Raises `ZlibError` if libz refuses (bad window bits, version mismatch, no memory).
        """
        self._closed = True
        self._lib = libz()
        self.stream = ZStream()
        self._pstream = ctypes.byref(self.stream)
        version = self._lib.zlibVersion()
        status = self._lib.inflateInit2_(
            self._pstream, window_bits, version, ctypes.sizeof(ZStream)
        )
        if status != Z_OK:
            raise ZlibError("inflateInit2", status, self._message())
        self._closed = False

    def __repr__(self) -> str:
        s = self.stream
        state = "closed" if self._closed else "open"
        return (
            f"<Inflater {state} total_in={s.total_in} total_out={s.total_out} "
            f"data_type={s.data_type}>"
        )

    def _message(self) -> str | None:
        msg = self.stream.msg
        return msg.decode("utf-8", "replace") if msg else None

    def _check_open(self, operation: str) -> None:
        if self._closed:
            raise ZlibError(operation, Z_STREAM_ERROR, "stream is closed")

    def set_input(self, address: int, length: int) -> None:
        """Point the stream at `length` input bytes at `address`."""
        self.stream.next_in = address
        self.stream.avail_in = length

    def set_output(self, address: int, length: int) -> None:
        """Point the stream at `length` bytes of output space at `address`."""
        self.stream.next_out = address
        self.stream.avail_out = length

    def inflate(self, flush: int) -> int:
        """Run `inflate(flush)`. Returns Z_OK, Z_STREAM_END or Z_BUF_ERROR (no progress).

        Raises `ZlibError` for Z_DATA_ERROR, Z_NEED_DICT, Z_MEM_ERROR and Z_STREAM_ERROR.
        """
        status: int = self._lib.inflate(self._pstream, flush)
        if status in (Z_OK, Z_STREAM_END, Z_BUF_ERROR):
            return status
        self._check_open("inflate")
        raise ZlibError("inflate", status, self._message())

    def reset2(self, window_bits: int) -> None:
        """`inflateReset2`: start a new stream with `window_bits`, keeping the allocation."""
        self._check_open("inflateReset2")
        status = self._lib.inflateReset2(self._pstream, window_bits)
        if status != Z_OK:
            raise ZlibError("inflateReset2", status, self._message())

    def prime(self, bits: int, value: int) -> None:
        """`inflatePrime`: insert `bits` (0..16) bits of `value` into the input bit buffer."""
        self._check_open("inflatePrime")
        status = self._lib.inflatePrime(self._pstream, bits, value)
        if status != Z_OK:
            raise ZlibError("inflatePrime", status, self._message())

    def set_dictionary(self, window: bytes) -> None:
        """`inflateSetDictionary`: preload the history window (raw inflate only)."""
        self._check_open("inflateSetDictionary")
        status = self._lib.inflateSetDictionary(self._pstream, window, len(window))
        if status != Z_OK:
            raise ZlibError("inflateSetDictionary", status, self._message())

    def close(self) -> None:
        """Free the zlib state. Idempotent."""
        if not self._closed:
            self._closed = True
            self._lib.inflateEnd(self._pstream)

    def __enter__(self) -> Inflater:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()
