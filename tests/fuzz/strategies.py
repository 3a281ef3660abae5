"""The fuzz settings profile and the mutation strategies every fuzz target shares.

`fuzz_settings(n)`: `n` derandomized examples in CI; `SOCIABLE_FUZZ=long` multiplies them (by
`SOCIABLE_FUZZ_FACTOR`, default 50) and randomizes. `mutated_bytes(sample)` damages a valid
sample; `mutated_json(doc)` changes one to three nodes of a JSON document to a wrong type, a
huge number or an odd string, or deletes them; `odd_text()` is text meant to break parsers.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import warnings
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# Hypothesis reports a failing example with a patch made by libcst, whose import warns
# (DeprecationWarning); under the strict warning filter that warning would become an internal
# error hiding the example. Imported once here, with the warning ignored.
with contextlib.suppress(ImportError), warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import hypothesis.extra._patching  # noqa: F401

LONG = os.environ.get("SOCIABLE_FUZZ", "") == "long"
FACTOR = int(os.environ.get("SOCIABLE_FUZZ_FACTOR", "50")) if LONG else 1

_HEALTH = [
    HealthCheck.too_slow,
    HealthCheck.data_too_large,
    HealthCheck.filter_too_much,
    HealthCheck.function_scoped_fixture,
    HealthCheck.large_base_example,
]


def fuzz_settings(max_examples: int) -> settings:
    """The settings of one fuzz target: `max_examples` derandomized examples (x FACTOR and
    random with SOCIABLE_FUZZ=long), no deadline (the machine is shared)."""
    return settings(
        max_examples=max_examples * FACTOR,
        deadline=None,
        derandomize=not LONG,
        database=None,
        suppress_health_check=_HEALTH,
        print_blob=True,
    )


ODD_STRINGS: tuple[str, ...] = (
    "",
    " ",
    "\x00",
    "a\x00b",
    "\n",
    "\u202e",
    "\ufeff",
    "\ud800",
    "\udcff",
    "😀",
    "ß",
    "İ",
    "../../etc/passwd",
    "/etc/passwd",
    "sha256:",
    "sha256:" + "0" * 64,
    "sha256:" + "G" * 64,
    "sha512:" + "0" * 128,
    "-1",
    "1e999",
    "NaN",
    "0x10",
    "9" * 40,
    "A" * 5000,
    "%s%n",
    "${HOME}",
    "[",
    "]",
    "http://[::1",
    "https://",
    "unix:///",
)

HUGE_INTS: tuple[int, ...] = (
    -1,
    0,
    (1 << 31) - 1,
    1 << 31,
    (1 << 32) - 1,
    1 << 32,
    (1 << 63) - 1,
    1 << 63,
    1 << 64,
    -(1 << 63),
    -(1 << 64),
    10**30,
)


def odd_text(max_size: int = 40) -> st.SearchStrategy[str]:
    """Strings meant to break parsers: known bad ones, control and surrogate characters."""
    return st.one_of(
        st.sampled_from(ODD_STRINGS),
        st.text(max_size=max_size),
        st.text(
            alphabet=st.characters(
                codec=None, categories=("Cc", "Cs", "Zs", "So", "Mn", "Lo", "Nd", "Pd", "Po")
            ),
            max_size=max_size,
        ),
    )


def safe_text(max_size: int = 40) -> st.SearchStrategy[str]:
    """`odd_text` without lone surrogates (what UTF-8 wire formats can carry)."""
    return odd_text(max_size).map(lambda s: s.encode("utf-8", "replace").decode("utf-8"))


def odd_values() -> st.SearchStrategy[Any]:
    """A JSON value of any type, often the wrong one: null, bools, huge numbers, odd text,
    floats (inf and nan too), small lists and objects."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.sampled_from(HUGE_INTS),
        st.integers(),
        st.floats(),
        odd_text(),
    )
    return st.one_of(
        scalars,
        st.lists(scalars, max_size=3),
        st.dictionaries(odd_text(8), scalars, max_size=3),
    )


_WORDS: tuple[bytes, ...] = tuple(
    struct.pack("<I", v) for v in (0, 1, 4, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xFFFFFFFC)
)


@st.composite
def mutated_bytes(draw: st.DrawFn, sample: bytes, *, max_ops: int = 4) -> bytes:
    """`sample` with 1..max_ops damages: truncated, bits flipped, bytes overwritten, inserted
    or deleted, an aligned 32-bit word replaced by an extreme value, a run duplicated."""
    buf = bytearray(sample)
    for _ in range(draw(st.integers(1, max_ops))):
        op = draw(
            st.sampled_from(("truncate", "flip", "overwrite", "insert", "delete", "word", "dup"))
        )
        n = len(buf)
        if op == "truncate":
            del buf[draw(st.integers(0, n)) :]
        elif op == "flip" and n:
            bit = draw(st.integers(0, n * 8 - 1))
            buf[bit // 8] ^= 1 << (bit % 8)
        elif op == "overwrite" and n:
            pos = draw(st.integers(0, n - 1))
            data = draw(st.binary(min_size=1, max_size=16))
            buf[pos : pos + len(data)] = data
        elif op == "insert":
            pos = draw(st.integers(0, n))
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete" and n:
            pos = draw(st.integers(0, n - 1))
            del buf[pos : pos + draw(st.integers(1, 64))]
        elif op == "word" and n >= 4:
            pos = draw(st.integers(0, n // 4 - 1)) * 4
            buf[pos : pos + 4] = draw(st.sampled_from(_WORDS))
        elif op == "dup" and n:
            pos = draw(st.integers(0, n - 1))
            run = buf[pos : pos + draw(st.integers(1, 256))]
            buf[pos:pos] = run
    return bytes(buf)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out.extend(_paths(v, (*prefix, k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.extend(_paths(v, (*prefix, i)))
    return out


def _copy(node: Any) -> Any:
    return json.loads(json.dumps(node))


@st.composite
def mutated_doc(draw: st.DrawFn, doc: Any, *, max_ops: int = 3) -> Any:
    """A copy of JSON-shaped `doc` with 1..max_ops nodes replaced by `odd_values()`,
    deleted, or given an odd extra key."""
    out = _copy(doc)
    for _ in range(draw(st.integers(1, max_ops))):
        path = draw(st.sampled_from(_paths(out)))
        op = draw(st.sampled_from(("replace", "replace", "delete", "add")))
        if not path:
            if op == "replace":
                out = draw(odd_values())
            continue
        parent = out
        for key in path[:-1]:
            parent = parent[key]
        last = path[-1]
        if op == "replace":
            parent[last] = draw(odd_values())
        elif op == "delete":
            del parent[last]
        elif isinstance(parent[last], dict):
            parent[last][draw(odd_text(12))] = draw(odd_values())
        else:
            parent[last] = [parent[last]]
    return out


@st.composite
def mutated_json(draw: st.DrawFn, doc: Any) -> bytes:
    """The bytes of `doc` with nodes mutated (`mutated_doc`), serialised as JSON (lone
    surrogates as `\\udXXX` escapes, nan and inf as Python writes them), sometimes also
    damaged as bytes."""
    value = draw(mutated_doc(doc)) if draw(st.integers(0, 9)) else _copy(doc)
    data = json.dumps(value, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 3)) == 0:
        data = draw(mutated_bytes(data, max_ops=2))
    return data
