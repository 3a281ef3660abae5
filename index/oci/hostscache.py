"""The `hosts.toml` configurations of the registries a client talks to, kept fresh.

Each registry's `HostsConfig` is read once and re-read when anything that decides it changed:
any candidate configuration directory (`<host>_<port>_`, `<host>`, `_default` under every
root) appearing, disappearing or changing (its mtime: certificate files added or removed),
or its `hosts.toml` changing (mtime, size, inode: an atomic replace counts). The check is a
few `stat` calls, done at most every `recheck_sec` seconds per registry. At most
`max_registries` configurations are kept (least recently used evicted).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from index.oci.hosts import HOSTS_FILE, HostsConfig, host_directories, hosts_from_dirs
from index.oci.lru import TtlLru

DEFAULT_RECHECK_SEC = 2.0
DEFAULT_MAX_REGISTRIES = 64

_Stamp = tuple[tuple[str, tuple[int, int, int] | None, tuple[int, int, int] | None], ...]


def _stat(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


@dataclass(slots=True)
class _Entry:
    config: HostsConfig
    stamp: _Stamp
    checked_at: float


class HostsCache:
    """`get(registry)` → its current `HostsConfig` (see the module doc).

    Not thread-safe (used from one event loop). Raises HostsConfigError from `get` for an
    invalid hosts.toml (not cached: the next call reads it again). Mirrors whose `host`
    (`HOST[:PORT]`) is in `skip_mirrors` are left out (a daemon that is itself the first
    mirror in containerd's hosts.toml must not ask itself); the upstream never is.
    """

    def __init__(
        self,
        hosts_dirs: Sequence[str | Path],
        *,
        plain_http: bool | None = None,
        skip_verify: bool = False,
        recheck_sec: float = DEFAULT_RECHECK_SEC,
        max_registries: int = DEFAULT_MAX_REGISTRIES,
        clock: Callable[[], float] = time.monotonic,
        skip_mirrors: Collection[str] = (),
    ) -> None:
        self.hosts_dirs = [Path(d) for d in hosts_dirs if str(d)]
        self._skip = frozenset(skip_mirrors)
        self._plain_http = plain_http
        self._skip_verify = skip_verify
        self.recheck_sec = recheck_sec
        self._clock = clock
        self._entries: TtlLru[str, _Entry] = TtlLru(max_registries, clock=clock)
        self.loads = 0
        """How many times a configuration was read (for tests and `repr`)."""

    def __repr__(self) -> str:
        return f"<HostsCache dirs={[str(d) for d in self.hosts_dirs]} entries={len(self._entries)}>"

    def _stamp(self, registry: str) -> _Stamp:
        out = []
        for root in self.hosts_dirs:
            for directory in host_directories(root, registry):
                out.append((str(directory), _stat(directory), _stat(directory / HOSTS_FILE)))
        return tuple(out)

    def get(self, registry: str) -> HostsConfig:
        now = self._clock()
        entry = self._entries.get(registry)
        if entry is not None and now - entry.checked_at < self.recheck_sec:
            return entry.config
        stamp = self._stamp(registry) if self.hosts_dirs else ()
        if entry is not None and entry.stamp == stamp:
            entry.checked_at = now
            return entry.config
        config = hosts_from_dirs(
            self.hosts_dirs, registry, plain_http=self._plain_http, skip_verify=self._skip_verify
        )
        if self._skip and any(m.host in self._skip for m in config.mirrors):
            config = replace(
                config, mirrors=tuple(m for m in config.mirrors if m.host not in self._skip)
            )
        self.loads += 1
        self._entries.put(registry, _Entry(config, stamp, now))
        return config
