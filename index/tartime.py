"""Tar timestamps the way Go's `archive/tar` and `time` packages treat them.

Two jobs, both byte-compatible with Go's `archive/tar` (so with the zTOC builder and with
containerd's applier; see docs/format.md):

* `parse_pax_time` reads a PAX `mtime`/`atime`/`ctime` record value exactly as Go's
  `parsePAXTime` does (decimal seconds, optional fraction, at most nanosecond precision,
  right-truncated); `pax_time_ns` gives the same instant in nanoseconds. Both the zTOC side
  and the local applier use them, so a layer's times are the same however it is served;
* `format_mod_time` renders an instant as Go's `time.Time.MarshalText` in UTC
  (`2006-01-02T15:04:05.999999999Z`), which is what a zTOC stores in `mod_time`.

Pure arithmetic on integers: no `datetime` (its range stops at year 1, Go's at year 0) and no
floating point (it would lose nanoseconds).
"""

from __future__ import annotations

import re

NANOS_PER_SECOND = 1_000_000_000
_SECONDS_PER_DAY = 86_400
_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_DECIMAL_RE = re.compile(rb"[+-]?[0-9]+")
_DIGITS_RE = re.compile(rb"[0-9]+")


def parse_go_int64(text: bytes) -> int:
    """Parse `text` as Go's `strconv.ParseInt(text, 10, 64)` does.

    Accepts an optional `+`/`-` sign followed by decimal digits, nothing else (no spaces, no
    underscores). Raises `ValueError` for anything else or a value outside int64.
    """
    if not _DECIMAL_RE.fullmatch(text):
        raise ValueError(f"not a decimal integer: {text!r}")
    value = int(text)
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(f"integer out of int64 range: {text!r}")
    return value


def parse_pax_time(text: bytes) -> tuple[int, int]:
    """Parse a PAX time record value into `(seconds, nanoseconds)` since the Unix epoch.

    Mirrors Go's `parsePAXTime`: `"<secs>[.<digits>]"`; fraction digits beyond nine are dropped
    (not rounded); a leading `-` on the seconds also negates the fraction (`"-1.5"` is 1.5 s
    before the epoch). The nanoseconds returned may be negative; `format_mod_time` normalises
    them as Go's `time.Unix` does. Raises `ValueError` when Go would report `ErrHeader`.
    """
    secs_text, _, frac_text = text.partition(b".")
    secs = parse_go_int64(secs_text)
    if not frac_text:
        return secs, 0
    if not _DIGITS_RE.fullmatch(frac_text):
        raise ValueError(f"invalid fractional seconds in PAX time {text!r}")
    nanos = int((frac_text + b"000000000")[:9])
    if secs_text.startswith(b"-"):
        nanos = -nanos
    return secs, nanos


def pax_time_ns(text: bytes) -> int:
    """A PAX time record value as nanoseconds since the epoch, exactly (`parse_pax_time`).

    `b"1700000022.999999999"` gives `1700000022999999999`. Raises `ValueError` as
    `parse_pax_time` does.
    """
    secs, nanos = parse_pax_time(text)
    return secs * NANOS_PER_SECOND + nanos


def civil_from_days(days: int) -> tuple[int, int, int]:
    """The proleptic Gregorian `(year, month, day)` of `days` since 1970-01-01 (any integer)."""
    z = days + 719_468
    era = z // 146_097
    doe = z - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    year = yoe + era * 400 + (1 if month <= 2 else 0)
    return year, month, day


def format_mod_time(seconds: int, nanos: int = 0) -> str:
    """Go's `time.Unix(seconds, nanos).UTC().MarshalText()`, or `""` where Go fails.

    `nanos` may lie outside `[0, 1e9)`; it is carried into the seconds as `time.Unix` does.
    The fraction has its trailing zeros trimmed and is omitted when zero. Years outside
    0..9999 make `MarshalText` fail; the AWS builder ignores that error and stores an empty
    string, so this returns `""` (never raises).
    """
    carry, nanos = divmod(nanos, NANOS_PER_SECOND)
    seconds += carry
    days, rem = divmod(seconds, _SECONDS_PER_DAY)
    year, month, day = civil_from_days(days)
    if not 0 <= year <= 9999:
        return ""
    hour, rem = divmod(rem, 3600)
    minute, second = divmod(rem, 60)
    text = f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}"
    if nanos:
        text += "." + f"{nanos:09d}".rstrip("0")
    return text + "Z"
