"""Shared pytest plugins: each fixture module of `tests/support` is listed here once."""

pytest_plugins = [
    "tests.support.registry",
    "tests.support.containerd",
]
