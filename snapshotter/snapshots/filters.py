"""containerd's filter grammar for List, applied to snapshot `Info`.

Grammar (containerd `filters` package):

    filter    := selector ("," selector)*          all selectors must match
    selector  := fieldpath [op value]               no op: field is present
    fieldpath := field ("." field)*
    field     := [A-Za-z0-9_]+ | quoted
    op        := "==" | "!=" | "~="
    value     := quoted | bare                      bare: run of non-space, non-comma
    quoted    := Go string literal "..."; for "~=" also /.../ or |...|

Several filter strings are ORed; no strings (or an empty string) match
everything. Snapshot fields: `name`, `parent`, `kind` (active|view|committed)
are always present; `labels.<key>` is present when the label exists (a key may
contain dots: `labels.a.b` is label "a.b"). Matching follows containerd:
`==` needs presence and equality, `!=` compares the value ("" when absent),
`~=` is a regular-expression search.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import InvalidArgument
from .model import Info, quote

_FIELD_CHARS = re.compile(r"[A-Za-z0-9_]+")
_OPS = ("==", "!=", "~=")
_SIMPLE_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
    '"': '"',
    "'": "'",
}


@dataclass(frozen=True)
class Selector:
    """One `fieldpath [op value]` term; `op` is None for a presence test."""

    fieldpath: tuple[str, ...]
    op: str | None = None
    value: str = ""
    regex: re.Pattern[str] | None = None

    def matches(self, info: Info) -> bool:
        """True if `info` satisfies this selector."""
        value, present = field_of(info, self.fieldpath)
        if self.op is None:
            return present
        if self.op == "==":
            return present and value == self.value
        if self.op == "!=":
            return value != self.value
        assert self.regex is not None
        return self.regex.search(value) is not None


Filter = Callable[[Info], bool]


def field_of(info: Info, fieldpath: Sequence[str]) -> tuple[str, bool]:
    """Value and presence of a field path on `info` (containerd's snapshot adaptor)."""
    if not fieldpath:
        return "", False
    head = fieldpath[0]
    if head == "name":
        return info.name, True
    if head == "parent":
        return info.parent, True
    if head == "kind":
        return info.kind.filter_name, True
    if head == "labels" and len(fieldpath) > 1:
        key = ".".join(fieldpath[1:])
        if key in info.labels:
            return info.labels[key], True
    return "", False


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, msg: str) -> InvalidArgument:
        return InvalidArgument(f"invalid filter {quote(self.text)} at offset {self.pos}: {msg}")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def parse(self) -> list[Selector]:
        selectors = [self.selector()]
        while self.peek() == ",":
            self.pos += 1
            selectors.append(self.selector())
        if self.peek():
            raise self.error(f"unexpected {quote(self.text[self.pos])}")
        return selectors

    def selector(self) -> Selector:
        path = [self.field()]
        while self.peek() == ".":
            self.pos += 1
            path.append(self.field())
        if self.peek() in ("", ","):
            return Selector(tuple(path))
        op = self.text[self.pos : self.pos + 2]
        if op not in _OPS:
            raise self.error('expected an operator ("=="|"!="|"~=")')
        self.pos += 2
        value = self.value(op)
        regex = None
        if op == "~=":
            try:
                regex = re.compile(value)
            except re.error as e:
                raise self.error(f"bad regular expression {quote(value)}: {e}") from e
        return Selector(tuple(path), op, value, regex)

    def field(self) -> str:
        c = self.peek()
        if c == '"':
            return self.go_string()
        m = _FIELD_CHARS.match(self.text, self.pos)
        if m is None:
            raise self.error("expected a field name or a quoted field")
        self.pos = m.end()
        return m.group()

    def value(self, op: str) -> str:
        c = self.peek()
        if c == '"':
            return self.go_string()
        if c in ("/", "|"):
            if op != "~=":
                raise self.error(f"{c}...{c} quoting is only allowed with ~=")
            return self.delimited(c)
        start = self.pos
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            if ch == "," or ch.isspace():
                break
            self.pos += 1
        if self.pos == start:
            raise self.error("expected a value")
        return self.text[start : self.pos]

    def delimited(self, delim: str) -> str:
        self.pos += 1
        out: list[str] = []
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            if ch == "\\" and self.text[self.pos + 1 : self.pos + 2] == delim:
                out.append(delim)
                self.pos += 2
                continue
            if ch == delim:
                self.pos += 1
                return "".join(out)
            out.append(ch)
            self.pos += 1
        raise self.error(f"unterminated {delim}...{delim} value")

    def go_string(self) -> str:
        """Decode a Go interpreted string literal starting at the quote."""
        self.pos += 1
        out: list[str] = []
        text = self.text
        while self.pos < len(text):
            ch = text[self.pos]
            if ch == '"':
                self.pos += 1
                return "".join(out)
            if ch == "\n":
                break
            if ch != "\\":
                out.append(ch)
                self.pos += 1
                continue
            esc = text[self.pos + 1 : self.pos + 2]
            if esc in _SIMPLE_ESCAPES:
                out.append(_SIMPLE_ESCAPES[esc])
                self.pos += 2
            elif esc in ("x", "u", "U"):
                width = {"x": 2, "u": 4, "U": 8}[esc]
                digits = text[self.pos + 2 : self.pos + 2 + width]
                if len(digits) != width or not all(d in "0123456789abcdefABCDEF" for d in digits):
                    raise self.error(f"bad \\{esc} escape in quoted string")
                out.append(chr(int(digits, 16)))
                self.pos += 2 + width
            elif esc and esc in "01234567":
                digits = text[self.pos + 1 : self.pos + 4]
                if len(digits) != 3 or not all(d in "01234567" for d in digits):
                    raise self.error("bad octal escape in quoted string")
                out.append(chr(int(digits, 8)))
                self.pos += 4
            else:
                raise self.error(f"unknown escape {quote(esc)} in quoted string")
        raise self.error("unterminated quoted string")


def parse(text: str) -> list[Selector]:
    """Parse one filter string into ANDed selectors ([] for "": match all).

    Raises InvalidArgument naming the filter and the offset of the problem.
    """
    if not text.strip():
        return []
    return _Parser(text).parse()


def parse_all(filters: Sequence[str]) -> Filter:
    """Compile filter strings (ORed) into a predicate over Info.

    Raises InvalidArgument if any string is malformed.
    """
    parsed = [parse(f) for f in filters]
    if not parsed or any(not sels for sels in parsed):
        return lambda info: True

    def match(info: Info) -> bool:
        return any(all(s.matches(info) for s in sels) for sels in parsed)

    return match
