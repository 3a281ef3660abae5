"""A minimal typed ctypes binding to zlib's inflate.

Python's `zlib` module hides what zran needs (`Z_BLOCK`, `data_type`, `inflatePrime`), so the
checkpoint builder and the span reader call the library directly. Every call goes through a
`ctypes.CDLL` function, which releases the GIL: several layers can be built or several spans
inflated in parallel threads.

Two libraries speak this API: the system libz, and zlib-ng's native API (`zng_*`, from the
`zlib-ng` package's extension module, which exports it), 1.6-1.8x as fast at inflating
spans on x86-64 (`python -m tests.bench.bench_inflate`). Where `Z_BLOCK` makes inflate stop
differs between them, and the checkpoint builder places checkpoints where it stops, so
building an index always uses the system libz
(`system_backend()`: the zTOCs match AWS soci's byte for byte). Inflating a span from a
checkpoint gives the same bytes with either, so spans use `backend()`: zlib-ng when it loads
and passes a self-test (a raw deflate stream with a preset window and a primed first byte
inflates to the bytes it was made from), else the system libz; chosen once per process.
`SOCIABLE_ZLIB=system` in the environment forces the system libz.

`Inflater` owns one stream and frees it in `close()` (also a context manager). Its methods
raise `ZlibError` for every zlib status that is an error; `Z_OK`, `Z_STREAM_END` and
`Z_BUF_ERROR` (no progress possible) are returned to the caller, who decides.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

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
    """No inflate library could be found or loaded."""


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


class ZngStream(ctypes.Structure):
    """`zng_stream` of zlib-ng's native API on LP64: `z_stream` with a 32-bit `adler`."""

    _fields_ = [
        *ZStream._fields_[:11],
        ("data_type", ctypes.c_int),
        ("adler", ctypes.c_uint32),
        ("reserved", ctypes.c_ulong),
    ]


ENV_BACKEND: Final = "SOCIABLE_ZLIB"
"""Set to `system` to inflate with the system libz even where zlib-ng is there."""


@dataclass(frozen=True)
class Backend:
    """One library's inflate functions, each taking a pointer to its `stream_type`."""

    name: str
    stream_type: type[ctypes.Structure]
    init2: Callable[[Any, int], int]
    inflate: Callable[[Any, int], int]
    end: Callable[[Any], int]
    reset2: Callable[[Any, int], int]
    prime: Callable[[Any, int, int], int]
    set_dictionary: Callable[[Any, bytes, int], int]


def _bind(
    lib: ctypes.CDLL, prefix: str, name: str, stream: type[ctypes.Structure], init2: Any
) -> Backend:
    """The Backend of `lib`'s `<prefix>inflate*` functions, with `init2(stream, bits)`."""
    ptr = ctypes.POINTER(stream)
    signatures: dict[str, list[Any]] = {
        "inflate": [ptr, ctypes.c_int],
        "inflateEnd": [ptr],
        "inflateReset2": [ptr, ctypes.c_int],
        "inflatePrime": [ptr, ctypes.c_int, ctypes.c_int],
        "inflateSetDictionary": [ptr, ctypes.c_void_p, ctypes.c_uint],
    }
    fns = {}
    for fn_name, argtypes in signatures.items():
        fn = getattr(lib, prefix + fn_name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
        fns[fn_name] = fn
    return Backend(
        name,
        stream,
        init2,
        fns["inflate"],
        fns["inflateEnd"],
        fns["inflateReset2"],
        fns["inflatePrime"],
        fns["inflateSetDictionary"],
    )


def _system() -> Backend:
    name = ctypes.util.find_library("z")
    if name is None:
        raise ZlibUnavailable("load", Z_ERRNO, "libz not found by ctypes.util.find_library('z')")
    try:
        lib = ctypes.CDLL(name)
        lib.zlibVersion.argtypes = []
        lib.zlibVersion.restype = ctypes.c_char_p
        init = lib.inflateInit2_
        init.argtypes = [ctypes.POINTER(ZStream), ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        init.restype = ctypes.c_int
        version = lib.zlibVersion()
        size = ctypes.sizeof(ZStream)
        return _bind(
            lib,
            "",
            f"zlib {version.decode('ascii')}",
            ZStream,
            lambda stream, bits: int(init(stream, bits, version, size)),
        )
    except (OSError, AttributeError) as e:
        raise ZlibUnavailable("load", Z_ERRNO, f"cannot load {name}: {e}") from e


def _zlib_ng() -> Backend | None:
    """zlib-ng's native API from the `zlib-ng` package, None when it is not there or does not
    export it."""
    try:
        from zlib_ng import zlib_ng
    except ImportError:
        return None
    path = zlib_ng.__file__
    try:
        lib = ctypes.CDLL(path)
        init = lib.zng_inflateInit2
        init.argtypes = [ctypes.POINTER(ZngStream), ctypes.c_int]
        init.restype = ctypes.c_int
        return _bind(
            lib,
            "zng_",
            f"zlib-ng {zlib_ng.ZLIBNG_RUNTIME_VERSION}",
            ZngStream,
            lambda stream, bits: int(init(stream, bits)),
        )
    except (OSError, AttributeError, TypeError):
        return None


def _works(backend: Backend) -> bool:
    """Whether `backend` inflates a raw deflate stream made with a preset window, its first
    byte primed, to the bytes it was made from (and counts them)."""
    window = bytes(range(256)) * 128
    payload = b"".join(b"%d:sociable;" % (i * i % 977) for i in range(20000)) + window[:999]
    packer = zlib.compressobj(6, zlib.DEFLATED, WBITS_RAW, zdict=window)
    raw = packer.compress(payload) + packer.flush()
    out = ctypes.create_string_buffer(len(payload))
    try:
        with Inflater(WBITS_RAW, backend) as inflater:
            inflater.prime(8, raw[0])
            inflater.set_dictionary(window)
            rest = raw[1:]
            inflater.set_input(address(rest), len(rest))
            inflater.set_output(ctypes.addressof(out), len(payload))
            status = inflater.inflate(Z_FINISH)
            stream = inflater.stream
            return bool(
                status == Z_STREAM_END
                and out.raw == payload
                and stream.total_out == len(payload)
                and stream.total_in == len(rest)
            )
    except ZlibError:
        return False


def address(buf: bytes) -> int:
    """The address of a bytes object's data (stable while the object is alive)."""
    addr = ctypes.cast(ctypes.c_char_p(buf), ctypes.c_void_p).value
    assert addr is not None
    return addr


_system_backend: Backend | None = None
_backend: Backend | None = None


def system_backend() -> Backend:
    """The system libz (loaded once): what checkpoints are built with. Raises
    `ZlibUnavailable`."""
    global _system_backend
    if _system_backend is None:
        _system_backend = _system()
    return _system_backend


def backend() -> Backend:
    """The library spans are inflated with (chosen once, see the module doc). Raises
    `ZlibUnavailable`."""
    global _backend
    if _backend is None:
        ng = _zlib_ng() if os.environ.get(ENV_BACKEND, "") != "system" else None
        _backend = ng if ng is not None and _works(ng) else system_backend()
    return _backend


class Inflater:
    """One zlib inflate stream.

    Input and output are raw addresses: the caller keeps the buffers alive while the stream
    points into them (`set_input` / `set_output` take an address and a length in bytes).
    """

    __slots__ = ("_closed", "_lib", "_pstream", "stream")

    def __init__(self, window_bits: int, lib: Backend | None = None) -> None:
        """Start inflating with `window_bits` (e.g. `WBITS_RAW`, `WBITS_AUTO`), with `lib`
        (default: `backend()`, for spans; the checkpoint builder passes `system_backend()`).

        Raises `ZlibError` if the library refuses (bad window bits, version mismatch, no
        memory).
        """
        self._closed = True
        self._lib = lib if lib is not None else backend()
        self.stream: Any = self._lib.stream_type()
        self._pstream = ctypes.byref(self.stream)
        status = self._lib.init2(self._pstream, window_bits)
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
        status = int(self._lib.inflate(self._pstream, flush))
        if status in (Z_OK, Z_STREAM_END, Z_BUF_ERROR):
            return status
        self._check_open("inflate")
        raise ZlibError("inflate", status, self._message())

    def reset2(self, window_bits: int) -> None:
        """`inflateReset2`: start a new stream with `window_bits`, keeping the allocation."""
        self._check_open("inflateReset2")
        status = self._lib.reset2(self._pstream, window_bits)
        if status != Z_OK:
            raise ZlibError("inflateReset2", status, self._message())

    def prime(self, bits: int, value: int) -> None:
        """`inflatePrime`: insert `bits` (0..16) bits of `value` into the input bit buffer."""
        self._check_open("inflatePrime")
        status = self._lib.prime(self._pstream, bits, value)
        if status != Z_OK:
            raise ZlibError("inflatePrime", status, self._message())

    def set_dictionary(self, window: bytes) -> None:
        """`inflateSetDictionary`: preload the history window (raw inflate only)."""
        self._check_open("inflateSetDictionary")
        status = self._lib.set_dictionary(self._pstream, window, len(window))
        if status != Z_OK:
            raise ZlibError("inflateSetDictionary", status, self._message())

    def close(self) -> None:
        """Free the zlib state. Idempotent."""
        if not self._closed:
            self._closed = True
            self._lib.end(self._pstream)

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
