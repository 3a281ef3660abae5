"""Fuzz tests of every boundary that takes outside input (hypothesis).

Each target feeds one boundary mutations of valid samples (truncation, bit flips, overwritten
words, random bytes, wrong JSON/TOML types, huge numbers, odd unicode) and checks that it
answers with its documented error type, never an `IndexError`, `KeyError`, `struct.error`,
`UnicodeDecodeError` or another bug leaking, and that valid input round-trips.

Budget: `tests.fuzz.strategies.fuzz_settings(n)` runs `n` examples per target, derandomized
(the same examples on every run), so `make test` spends about 90 s here in all. A longer,
random run:

    SOCIABLE_FUZZ=long python3 -m pytest tests/fuzz

multiplies every target's examples by 50 (or by `SOCIABLE_FUZZ_FACTOR`) and draws new
examples each run; a failure prints the `@example` to pin in the test.
"""
