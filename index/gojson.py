"""JSON bytes exactly as Go's `encoding/json.Marshal` writes them (the byte form SOCI's Go tools produce).

No whitespace, fields in the order the caller built the dict (Go struct declaration order),
`<`, `>`, `&`, U+2028 and U+2029 escaped, non-ASCII written as UTF-8, no trailing newline.
Go sorts map keys: callers pass maps (annotations, labels) through `sorted_map`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


def _escape(text: str) -> str:
    for raw, esc in _ESCAPES.items():
        text = text.replace(raw, esc)
    return text


def marshal(value: Any) -> bytes:
    """Serialize `value` (dicts, lists, str, int, bool, None) as Go would."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    # The characters escaped here can only occur inside JSON strings, so a global replace is safe.
    return _escape(text).encode("utf-8")


def sorted_map(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `mapping` with keys in Go's map order (bytewise on UTF-8)."""
    return {k: mapping[k] for k in sorted(mapping, key=lambda k: k.encode("utf-8"))}
