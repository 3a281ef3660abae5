"""containerd `hosts.toml` files that make containerd ask this node's registry mirror first.

The daemon serves the OCI distribution read API on its peer listener. containerd learns
about it from the `hosts.toml` files under CRI's `registry.config_path` (`ctr --hosts-dir`):
for a registry it reads the first existing directory of `<host>_<port>_`, `<host>:<port>`
(or `<host>`) and `_default`, tries the `[host."…"]` tables of its `hosts.toml` in file order
and the top-level `server` (the upstream) last. Files are read on every pull.

What `configure` does to one file (each rule has a unit test):

- our table, `[host."<mirror>"]` with `capabilities = ["pull", "resolve"]`, with the comment
  line `# sociable mirror` just above it, becomes the first `[host]` table; every other table
  (a Harbor or pull-through cache the operator configured), comment and blank line keeps its
  bytes and its order after it, and the existing `server` stays the upstream;
- a file without `server` (other than `_default`) gets one, the registry itself
  (`docker.io` → `https://registry-1.docker.io`), marked by a trailing comment so that
  `unconfigure` can take it out again;
- a table for the mirror URL, or one marked `# sociable mirror` (an older mirror address), is
  ours: it is replaced, never duplicated, so configuring twice changes nothing.

`unconfigure` removes our table and the `server` we added and nothing else: configuring a file
that ends in a newline and unconfiguring it gives back its bytes. A file left with nothing is
deleted, with its directory when that is empty.

The edit is a splice of the file's text, not a re-rendering: tomlkit parses the file (to refuse
invalid TOML and read its values) and parses the result, which must hold exactly the old
settings with ours first, before anything is written. (In tomlkit's tree the comment lines
above a table belong to the table before it, so a table inserted through the tree would put
the operator's comment above ours.)

Versions: every containerd that reads `hosts.toml` requires a `[host]` table in 1.6/1.7 (a
file with only `server` is ignored), which our table provides. `dial_timeout` exists from
containerd 2.1; containerd 1.6.20's parser ignores unknown keys (it reads a file with
`dial_timeout`, and uses its hosts), so the key is harmless there but does nothing. It is
written only when the installed containerd reads it (`dial_timeout_for`).
"""

from __future__ import annotations

import difflib
import errno
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TextIO
from urllib.parse import urlsplit

import tomlkit
import tomlkit.exceptions

from index.fsutil import atomic_file
from index.oci.hosts import DEFAULT_DIR, HOSTS_FILE, default_host, host_directories

from ..errors import ConfigError, UsageError
from ..peers.address import AddressError, format_address, parse_address

MARKER: Final = "# sociable mirror"
"""The comment line just above our `[host]` table."""
SERVER_COMMENT: Final = "# sociable mirror: the upstream, tried last"
"""The trailing comment of a `server` line `configure` added."""
DEFAULT_MIRROR: Final = "http://127.0.0.1:8472"
MIRROR_CAPABILITIES: Final = ("pull", "resolve")
DIAL_TIMEOUT: Final = "1s"
"""Connect timeout of our table (containerd 2.1+): the mirror is on this node, so a connect
that takes longer means it is not there and the next host should be asked."""
DIAL_TIMEOUT_SINCE: Final = (2, 1)
BACKUP_SUFFIX: Final = ".bak"
FILE_MODE: Final = 0o644
DIR_MODE: Final = 0o755


class HostsFileError(ConfigError):
    """A `hosts.toml` cannot be merged: not UTF-8, not TOML, a `host` or `server` that is not
    what containerd reads, or Docker-style certificate files a new `hosts.toml` would hide.
    The file is left as it is."""


# -- names -----------------------------------------------------------------------------------

_REGISTRY = re.compile(
    r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(?::[0-9]{1,5})?"
)


def check_registry(name: str) -> str:
    """`name` if it is a registry host as containerd names its directory (`docker.io`,
    `10.0.0.5:5000`, `[fd00::1]:5000`). Raises UsageError otherwise."""
    if name == DEFAULT_DIR:
        raise UsageError(f"--registry {name}: use --default for the {DEFAULT_DIR} directory")
    if not _REGISTRY.fullmatch(name):
        raise UsageError(
            f"--registry {name!r} is not a registry host (HOST or HOST:PORT, no scheme or path)"
        )
    return name


def check_mirror(url: str) -> str:
    """The mirror URL normalised (no trailing `/`). Raises UsageError unless it is an
    `http://` or `https://` URL with a host and no user, query or fragment."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        raise UsageError(f"--mirror {url!r}: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--mirror {url!r} is not an http:// or https:// URL with a host")
    if parts.username is not None or parts.query or parts.fragment:
        raise UsageError(f"--mirror {url!r}: no user, query or fragment")
    return url.rstrip("/")


def default_mirror(listen: str) -> str:
    """The mirror URL of a peer listener `listen` (`ADDR:PORT`) as seen from this node:
    `0.0.0.0` is reached at 127.0.0.1 and `::` at ::1. Raises UsageError on a bad address."""
    try:
        host, port = parse_address(listen)
    except AddressError as e:
        raise UsageError(f"[peers] listen: {e}") from None
    if host == "0.0.0.0":
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://{format_address(host, port)}"


def upstream_server(registry: str) -> str:
    """The `server` containerd would use for `registry` with no file: the registry itself,
    `https://` (`http://` for loopback), `docker.io` → `https://registry-1.docker.io`."""
    host = default_host(registry)
    return f"{host.scheme}://{host.host}"


def _same_url(a: str, b: str) -> bool:
    pa, pb = urlsplit(a.rstrip("/")), urlsplit(b.rstrip("/"))
    return (pa.scheme.lower(), pa.netloc.lower(), pa.path) == (
        pb.scheme.lower(),
        pb.netloc.lower(),
        pb.path,
    )


# -- the text of a file ----------------------------------------------------------------------


def _split_lines(text: str) -> list[str]:
    """Lines with their `\\n` (only `\\n` ends a line in TOML; `\\r\\n` keeps its `\\r`)."""
    return [line for line in re.split(r"(?<=\n)", text) if line]


def _header_path(line: str) -> tuple[str, ...]:
    """The key path of a table header line: `[host."x".header]` → (host, x, header)."""
    node: Any = tomlkit.parse(line if line.endswith("\n") else line + "\n").unwrap()
    path: list[str] = []
    while isinstance(node, dict) and len(node) == 1:
        key = next(iter(node))
        path.append(key)
        node = node[key]
        if isinstance(node, list) and node:  # [[array.of.tables]]
            node = node[0]
    return tuple(path)


def _skip_string(line: str, j: int) -> int:
    """The index after the one-line string that starts at `line[j]`."""
    quote = line[j]
    j += 1
    while j < len(line):
        if quote == '"' and line[j] == "\\":
            j += 2
            continue
        if line[j] == quote:
            return j + 1
        j += 1
    return j


@dataclass(frozen=True, slots=True)
class _Layout:
    """A valid TOML text as lines: which lines start outside any value (`top`), and where
    the table headers are with their key paths."""

    lines: list[str]
    top: list[bool]
    headers: list[tuple[int, tuple[str, ...]]]

    def is_comment(self, i: int) -> bool:
        return self.top[i] and self.lines[i].lstrip().startswith("#")

    def is_blank(self, i: int) -> bool:
        return self.top[i] and not self.lines[i].strip()

    def lead_start(self, line: int) -> int:
        """The first of the comment lines directly above `line` (`line` when there is none)."""
        while line > 0 and self.is_comment(line - 1):
            line -= 1
        return line


def _scan(text: str) -> _Layout:
    """Find the table headers of `text`, which must be valid TOML: a line that starts outside
    a multi-line string, array or inline table, with `[`, is a header."""
    lines = _split_lines(text)
    top: list[bool] = []
    headers: list[tuple[int, tuple[str, ...]]] = []
    depth = 0
    open_ml: str | None = None  # the delimiter of the multi-line string we are in
    for i, line in enumerate(lines):
        at_top = open_ml is None and depth == 0
        top.append(at_top)
        if at_top and line.lstrip().startswith("["):
            headers.append((i, _header_path(line)))
            continue
        j = 0
        while j < len(line):
            c = line[j]
            if open_ml is not None:
                if open_ml == '"""' and c == "\\":
                    j += 2
                elif line.startswith(open_ml, j):
                    j += 3
                    while j < len(line) and line[j] == open_ml[0]:
                        j += 1  # up to two quotes before the delimiter are content
                    open_ml = None
                else:
                    j += 1
                continue
            if c == "#":
                break
            if c in "\"'":
                if line.startswith(c * 3, j):
                    open_ml = c * 3
                    j += 3
                else:
                    j = _skip_string(line, j)
                continue
            if c in "[{":
                depth += 1
            elif c in "]}":
                depth -= 1
            j += 1
    return _Layout(lines, top, headers)


@dataclass(frozen=True, slots=True)
class _HostTable:
    """One `[host."url"]` table in the text: lines `start` (its marker line, if any, else its
    header) to `end` (the next table's comment lines, or the end of the file)."""

    url: str
    start: int
    end: int
    marked: bool


def _host_tables(layout: _Layout) -> list[_HostTable]:
    """The `[host."…"]` tables in file order, each with its sub-tables (`.header`)."""
    found: list[_HostTable] = []
    headers = layout.headers
    k = 0
    while k < len(headers):
        line, path = headers[k]
        if len(path) < 2 or path[0] != "host":
            k += 1
            continue
        url = path[1]
        k += 1
        while k < len(headers) and headers[k][1][:2] == ("host", url):
            k += 1
        end = layout.lead_start(headers[k][0]) if k < len(headers) else len(layout.lines)
        marked = (
            line > 0 and layout.is_comment(line - 1) and layout.lines[line - 1].strip() == MARKER
        )
        found.append(_HostTable(url, line - 1 if marked else line, end, marked))
    return found


def _parse(text: str, where: str) -> dict[str, Any]:
    """The values of `text`. Raises HostsFileError when it is not TOML or its `host` and
    `server` are not what containerd reads."""
    try:
        doc: dict[str, Any] = tomlkit.parse(text).unwrap()
    except tomlkit.exceptions.ParseError as e:
        raise HostsFileError(f"{where}: not valid TOML ({e}); left as it is") from e
    hosts = doc.get("host", {})
    if not isinstance(hosts, dict) or not all(isinstance(t, dict) for t in hosts.values()):
        raise HostsFileError(f'{where}: host must be [host."URL"] tables; left as it is')
    if not isinstance(doc.get("server", ""), str):
        raise HostsFileError(f"{where}: server must be a string; left as it is")
    return doc


def _checked_layout(text: str, doc: dict[str, Any], where: str) -> _Layout:
    layout = _scan(text)
    order = [t.url for t in _host_tables(layout)]
    if sorted(order) != sorted(doc.get("host", {})) or len(set(order)) != len(order):
        raise HostsFileError(
            f'{where}: every host must be its own [host."URL"] table header (not dotted keys '
            "or an inline table); left as it is"
        )
    return layout


def _remove_lines(lines: list[str], start: int, end: int) -> None:
    """Delete lines [start, end); at the end of the file also the blank line above them."""
    at_end = end == len(lines)
    del lines[start:end]
    if at_end and start > 0 and not lines[start - 1].strip():
        del lines[start - 1]


def _is_ours(table: _HostTable, mirror: str) -> bool:
    return table.marked or _same_url(table.url, mirror)


def _without_ours(
    text: str, doc: dict[str, Any], mirror: str, where: str, *, server: bool
) -> tuple[str, dict[str, Any]]:
    """`text` and `doc` without our tables (and, with `server`, the `server` we added)."""
    layout = _checked_layout(text, doc, where)
    lines = list(layout.lines)
    ours = [t for t in _host_tables(layout) if _is_ours(t, mirror)]
    expected = dict(doc)
    if ours:
        expected["host"] = {
            url: table for url, table in doc["host"].items() if url not in {t.url for t in ours}
        }
        if not expected["host"]:
            del expected["host"]
    for table in reversed(ours):
        _remove_lines(lines, table.start, table.end)
    if server:
        # Top-level keys come before the first header's comment lines; the tables removed
        # above all start there or later, so these indexes still hold the same lines.
        limit = layout.lead_start(layout.headers[0][0]) if layout.headers else len(lines)
        for i in range(min(limit, len(lines))):
            if layout.top[i] and lines[i].rstrip().endswith(SERVER_COMMENT):
                blank_after = i + 1 < len(lines) and not lines[i + 1].strip()
                del lines[i : i + (2 if blank_after else 1)]
                expected.pop("server", None)
                break
    return "".join(lines), expected


def _newline(text: str) -> str:
    return "\r\n" if "\r\n" in text else "\n"


def mirror_table(mirror: str, *, dial_timeout: str | None = None, newline: str = "\n") -> str:
    """The text of our table: the marker line, `[host."<mirror>"]` and its keys."""
    caps = ", ".join(tomlkit.string(c).as_string() for c in MIRROR_CAPABILITIES)
    lines = [MARKER, f"[host.{tomlkit.string(mirror).as_string()}]", f"  capabilities = [{caps}]"]
    if dial_timeout is not None:
        lines.append(f"  dial_timeout = {tomlkit.string(dial_timeout).as_string()}")
    return newline.join(lines) + newline


def _mirror_values(dial_timeout: str | None) -> dict[str, Any]:
    values: dict[str, Any] = {"capabilities": list(MIRROR_CAPABILITIES)}
    if dial_timeout is not None:
        values["dial_timeout"] = dial_timeout
    return values


def _verify(new_text: str, expected: dict[str, Any], order: list[str], where: str) -> str:
    """`new_text` if it parses to `expected` with its host tables in `order`."""
    try:
        got = _parse(new_text, where)
        layout = _checked_layout(new_text, got, where)
    except HostsFileError as e:
        raise HostsFileError(f"{where}: the merged file would not be valid ({e})") from e
    scanned = [t.url for t in _host_tables(layout)]
    if got != expected or list(got.get("host", {})) != order or scanned != order:
        raise HostsFileError(
            f"{where}: the mirror table cannot be put first without changing other settings; "
            "left as it is"
        )
    return new_text


def configure_text(
    text: str | None,
    mirror: str,
    *,
    upstream: str | None,
    dial_timeout: str | None = None,
    where: str = HOSTS_FILE,
) -> str:
    """`text` (None: no file) with our table for `mirror` first, and `server = upstream` when
    it has no `server` (`upstream` None: never, as for `_default`).

    Pure. Raises HostsFileError (naming `where`) when `text` cannot be merged.
    """
    text = text or ""
    doc = _parse(text, where)
    base, expected = _without_ours(text, doc, mirror, where, server=False)
    layout = _scan(base)
    lines = list(layout.lines)
    nl = _newline(text)
    block = mirror_table(mirror, dial_timeout=dial_timeout, newline=nl)
    add_server = upstream is not None and "server" not in doc
    server_line = f"server = {tomlkit.string(upstream or '').as_string()}  {SERVER_COMMENT}{nl}"
    hosts = _host_tables(layout)
    if not layout.headers and lines and not lines[-1].endswith("\n"):
        lines[-1] += nl  # the server line and our table go after the last line
    edits: list[tuple[int, str]] = []  # (line index, text to insert before it)
    if hosts:
        edits.append((layout.lead_start(hosts[0].start), block + nl))
    if add_server:
        first = layout.lead_start(layout.headers[0][0]) if layout.headers else len(lines)
        edits.append((first, server_line + (nl if layout.headers else "")))
    for index, inserted in sorted(edits, key=lambda e: e[0], reverse=True):
        lines.insert(index, inserted)
    out = "".join(lines)
    if not hosts:
        if out and not out.endswith("\n"):
            out += nl
        out += (nl if out else "") + block
    if add_server:
        expected["server"] = upstream
    others = dict(expected.get("host", {}))
    expected["host"] = {mirror: _mirror_values(dial_timeout), **others}
    return _verify(out, expected, [mirror, *others], where)


def unconfigure_text(text: str, mirror: str, *, where: str = HOSTS_FILE) -> str:
    """`text` without our table (marked, or for `mirror`) and without the `server` line
    `configure_text` added. Pure. Raises HostsFileError when `text` cannot be read."""
    doc = _parse(text, where)
    out, expected = _without_ours(text, doc, mirror, where, server=True)
    return _verify(out, expected, list(expected.get("host", {})), where)


def has_ours(text: str, mirror: str, *, where: str = HOSTS_FILE) -> bool:
    """Whether `text` holds our table (marked, or for `mirror`)."""
    layout = _checked_layout(text, _parse(text, where), where)
    return any(_is_ours(t, mirror) for t in _host_tables(layout))


# -- containerd's version ---------------------------------------------------------------------


def parse_containerd_version(text: str) -> tuple[int, int] | None:
    """(major, minor) from `containerd --version` output, e.g.
    `containerd github.com/containerd/containerd 1.6.20~ds1 …` → (1, 6); None if absent."""
    for token in text.split()[1:]:
        m = re.match(r"v?(\d+)\.(\d+)(?:[.~+-]|$)", token)
        if m:
            return int(m.group(1)), int(m.group(2))
    return None


def containerd_version(binary: str = "containerd") -> tuple[int, int] | None:
    """The installed containerd's (major, minor); None when it is not on PATH or says nothing
    we can read."""
    path = shutil.which(binary)
    if path is None:
        return None
    try:
        done = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_containerd_version(done.stdout)


def dial_timeout_for(version: tuple[int, int] | None) -> str | None:
    """`DIAL_TIMEOUT` when containerd `version` reads `dial_timeout` (2.1+), else None."""
    return DIAL_TIMEOUT if version is not None and version >= DIAL_TIMEOUT_SINCE else None


# -- files ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    """What one command does to one `hosts.toml`.

    `old` None: there is no file; `new` None: the file is deleted (with its directory when
    `remove_dir` and it is empty). `backup`: the old content holds settings other than ours
    and is kept as `hosts.toml.bak` first.
    """

    path: Path
    old: str | None
    new: str | None
    backup: bool = False
    remove_dir: bool = False

    @property
    def changed(self) -> bool:
        return self.old != self.new

    @property
    def backup_path(self) -> Path:
        return self.path.with_name(self.path.name + BACKUP_SUFFIX)

    def describe(self) -> str:
        """One line: `created P`, `updated P (backup P.bak)`, `deleted P`, `unchanged P`."""
        if not self.changed:
            return f"unchanged {self.path}"
        if self.old is None:
            return f"created {self.path}"
        if self.new is None:
            return f"deleted {self.path}"
        backup = f" (backup {self.backup_path})" if self.backup else ""
        return f"updated {self.path}{backup}"

    def diff(self) -> str:
        """A unified diff (empty when nothing changes; /dev/null for a new or deleted file)."""
        if not self.changed:
            return ""
        old_name = "/dev/null" if self.old is None else str(self.path)
        new_name = "/dev/null" if self.new is None else str(self.path)
        lines = difflib.unified_diff(
            _split_lines(self.old or ""),
            _split_lines(self.new or ""),
            old_name,
            new_name,
        )
        out = []
        for line in lines:
            out.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
        return "".join(out)


@dataclass(frozen=True, slots=True)
class Plan:
    """The changes a command would make, the errors that stop it, and warnings to show."""

    changes: tuple[Change, ...] = ()
    errors: tuple[Exception, ...] = ()
    warnings: tuple[str, ...] = ()


def _not_a_directory(path: Path) -> OSError:
    return NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))


def _read(path: Path) -> str | None:
    """The text of `path`, None when it does not exist. Raises OSError, HostsFileError."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HostsFileError(f"{path}: not UTF-8 text ({e.reason}); left as it is") from e


def _check_hosts_dir(hosts_dir: Path) -> None:
    if hosts_dir.exists() and not hosts_dir.is_dir():
        raise _not_a_directory(hosts_dir)


def _registry_dirs(hosts_dir: Path, registry: str) -> list[Path]:
    """The directories containerd looks at for `registry` before `_default`."""
    return [d for d in host_directories(hosts_dir, registry) if d.name != DEFAULT_DIR]


def configure_dir(hosts_dir: Path, name: str) -> Path:
    """The directory to write for `name` (a registry or `_default`): the one containerd reads
    (`<host>_<port>_` if it exists, else `<host>:<port>`). Raises OSError when it is a file."""
    candidates = (
        [hosts_dir / DEFAULT_DIR] if name == DEFAULT_DIR else _registry_dirs(hosts_dir, name)
    )
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
        if candidate.exists():
            raise _not_a_directory(candidate)
    return candidates[-1]


def _docker_cert_files(directory: Path) -> list[str]:
    if not directory.is_dir():
        return []
    return sorted(
        p.name for p in directory.iterdir() if p.suffix in (".crt", ".cert", ".key") and p.is_file()
    )


def _plan_configure_one(
    hosts_dir: Path, name: str, mirror: str, dial_timeout: str | None
) -> tuple[Change, list[str]]:
    directory = configure_dir(hosts_dir, name)
    path = directory / HOSTS_FILE
    old = _read(path)
    warnings: list[str] = []
    if old is None:
        certs = _docker_cert_files(directory)
        if certs:
            raise HostsFileError(
                f"{directory} has Docker-style certificate files ({', '.join(certs)}) and no "
                f"{HOSTS_FILE}; containerd ignores them once {HOSTS_FILE} exists: write a "
                f"{HOSTS_FILE} with ca/client for them first"
            )
        default_file = hosts_dir / DEFAULT_DIR / HOSTS_FILE
        if name != DEFAULT_DIR and not directory.exists() and default_file.exists():
            warnings.append(
                f"{directory} is new: containerd will read it instead of {default_file} for {name}"
            )
    upstream = None if name == DEFAULT_DIR else upstream_server(name)
    new = configure_text(old, mirror, upstream=upstream, dial_timeout=dial_timeout, where=str(path))
    backup = old is not None and new != old and bool(unconfigure_text(old, mirror).strip())
    return Change(path, old, new, backup=backup), warnings


def plan_configure(
    hosts_dir: Path,
    registries: Sequence[str],
    *,
    default: bool,
    mirror: str,
    dial_timeout: str | None = None,
) -> Plan:
    """What `configure` would change for each registry (and `_default` with `default`).
    Reads only; every error is collected (the command then changes nothing)."""
    names = [*registries, *([DEFAULT_DIR] if default else [])]
    changes: list[Change] = []
    errors: list[Exception] = []
    warnings: list[str] = []
    try:
        _check_hosts_dir(hosts_dir)
    except OSError as e:
        return Plan(errors=(e,))
    for name in dict.fromkeys(names):
        try:
            change, notes = _plan_configure_one(hosts_dir, name, mirror, dial_timeout)
        except (HostsFileError, OSError) as e:
            errors.append(e)
            continue
        if change.path not in {c.path for c in changes}:
            changes.append(change)
        warnings.extend(notes)
    return Plan(tuple(changes), tuple(errors), tuple(warnings))


def _unconfigure_dirs(hosts_dir: Path, registries: Sequence[str], default: bool) -> list[Path]:
    if not registries and not default:
        return sorted(p for p in hosts_dir.iterdir() if (p / HOSTS_FILE).is_file())
    out = [d for r in registries for d in _registry_dirs(hosts_dir, r)]
    if default:
        out.append(hosts_dir / DEFAULT_DIR)
    return list(dict.fromkeys(out))


def plan_unconfigure(
    hosts_dir: Path, registries: Sequence[str], *, default: bool, mirror: str
) -> Plan:
    """What `unconfigure` would change: our table (and the `server` we added) out of the
    registries' files (`_default`'s with `default`; every directory when neither is given).
    Reads only; every error is collected."""
    changes: list[Change] = []
    errors: list[Exception] = []
    try:
        _check_hosts_dir(hosts_dir)
        directories = (
            _unconfigure_dirs(hosts_dir, registries, default) if hosts_dir.is_dir() else []
        )
    except OSError as e:
        return Plan(errors=(e,))
    for directory in directories:
        path = directory / HOSTS_FILE
        try:
            if directory.exists() and not directory.is_dir():
                raise _not_a_directory(directory)
            old = _read(path)
            if old is None or not has_ours(old, mirror, where=str(path)):
                continue
            new: str | None = unconfigure_text(old, mirror, where=str(path))
        except (HostsFileError, OSError) as e:
            errors.append(e)
            continue
        if new is not None and not new.strip():
            changes.append(Change(path, old, None, remove_dir=True))
        else:
            changes.append(Change(path, old, new, backup=True))
    return Plan(tuple(changes), tuple(errors))


def _write(path: Path, text: str, mode: int) -> None:
    with atomic_file(path, durable=True) as f:
        os.fchmod(f.fileno(), mode)
        f.write(text.encode("utf-8"))


def apply(changes: Iterable[Change]) -> None:
    """Make the changes: each file replaced atomically (a symbolic link is written through,
    its mode kept), its backup written first. Raises OSError (changes before it are made)."""
    for change in changes:
        if not change.changed:
            continue
        if change.new is None:
            change.path.unlink()
            if change.remove_dir:
                try:
                    change.path.parent.rmdir()
                except OSError as e:
                    if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
            continue
        change.path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        target = Path(os.path.realpath(change.path))
        try:
            mode = target.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = FILE_MODE
        if change.backup and change.old is not None:
            _write(change.backup_path, change.old, mode)
        _write(target, change.new, mode)


# -- the command ------------------------------------------------------------------------------


def run_mirror_command(
    command: Literal["configure", "unconfigure"],
    *,
    hosts_dir: Path,
    registries: Sequence[str],
    default: bool,
    mirror: str,
    dry_run: bool,
    report_error: Callable[[Exception], int],
    out: TextIO,
    err: TextIO,
    containerd: str = "containerd",
) -> int:
    """`sociable-snapshotter mirror configure|unconfigure` (docs/cli.md); returns the exit status.

    Every file is read and merged before any is written: any error (each reported as one line
    by `report_error`, which returns its exit status) changes nothing. `--dry-run` prints the
    unified diffs. Raises UsageError (bad operands) and OSError (a write failed).
    """
    mirror = check_mirror(mirror)
    names = [check_registry(r) for r in registries]
    if command == "configure":
        if not names and not default:
            raise UsageError("mirror configure: name at least one --registry or --default")
        dial_timeout = dial_timeout_for(containerd_version(containerd))
        plan = plan_configure(
            hosts_dir, names, default=default, mirror=mirror, dial_timeout=dial_timeout
        )
    else:
        plan = plan_unconfigure(hosts_dir, names, default=default, mirror=mirror)
    for warning in plan.warnings:
        print(f"warning: {warning}", file=err)
    if plan.errors:
        codes = [report_error(e) for e in plan.errors]
        return codes[0]
    if dry_run:
        out.write("".join(c.diff() for c in plan.changes))
        return 0
    apply(plan.changes)
    for change in plan.changes:
        print(change.describe(), file=out)
    if not plan.changes:
        print(f"nothing to {command} under {hosts_dir}", file=out)
    return 0


__all__ = [
    "BACKUP_SUFFIX",
    "DEFAULT_MIRROR",
    "DIAL_TIMEOUT",
    "MARKER",
    "MIRROR_CAPABILITIES",
    "SERVER_COMMENT",
    "Change",
    "HostsFileError",
    "Plan",
    "apply",
    "check_mirror",
    "check_registry",
    "configure_dir",
    "configure_text",
    "containerd_version",
    "default_mirror",
    "dial_timeout_for",
    "has_ours",
    "mirror_table",
    "parse_containerd_version",
    "plan_configure",
    "plan_unconfigure",
    "run_mirror_command",
    "unconfigure_text",
    "upstream_server",
]
