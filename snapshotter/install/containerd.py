"""containerd's `config.toml` with the proxy plugin and CRI's settings merged in.

What is set (docs/install.md), in the format of the file (`version = 2`: containerd 1.6/1.7,
plugin `io.containerd.grpc.v1.cri`; `version = 3`: containerd 2.x,
`io.containerd.cri.v1.images`), or, for a new file, of the installed containerd:

- `[proxy_plugins.<name>]`: `type = "snapshot"`, `address` = our socket, and `exports.root`
  = our root (where CRI's ImageFsInfo looks for the image filesystem) when the containerd
  reads it (2.x, 1.7.16+, 1.6.32+: `configcheck.has_root_export`);
- CRI's `snapshotter = "<name>"` and `disable_snapshot_annotations = false`;
- CRI's `registry.config_path`, only when it has none (an existing value is kept);
- with the registry mirror on (`[peers]` and `[mirror] enable`): `discard_unpacked_layers =
  false`, and on version 3 `use_local_image_pull = true`.

The merge goes through tomlkit's tree, so comments, order and every other setting keep their
bytes. The result is checked before it is returned: parsed again, it must hold exactly the old
settings plus ours, and `config check` must find nothing wrong with it.

containerd's `imports` replace a plugin's whole table with the imported file's, so the CRI
settings are never put in a drop-in; a config that imports files gets a warning and is merged
all the same (the main file's CRI table is the one that counts unless a drop-in overrides it).
"""

from __future__ import annotations

import copy
import dataclasses
import tomllib
from dataclasses import dataclass
from typing import Any, Final

import tomlkit
import tomlkit.exceptions
from tomlkit.container import Container
from tomlkit.items import AoT, Table

from ..config import DEFAULT_ADDRESS, Config
from ..configcheck import (
    CRI_V2,
    CRI_V3_IMAGES,
    ContainerdVersion,
    check_containerd,
    has_root_export,
)
from ..errors import ConfigError

DEFAULT_HOSTS_DIR: Final = "/etc/containerd/certs.d"
"""CRI's `registry.config_path` written when the file has none."""


class ContainerdConfigError(ConfigError):
    """containerd's config cannot be merged: not UTF-8 or TOML, a version this containerd
    does not read (1, or 3 on containerd 1.x), or a key of ours holding something that is not
    a table. The file is left as it is."""


@dataclass(frozen=True, slots=True)
class OurSettings:
    """What containerd must know about this daemon."""

    plugin_name: str
    address: str
    root: str
    mirror: bool = False

    @classmethod
    def of(cls, cfg: Config) -> OurSettings:
        address = cfg.daemon.address
        return cls(
            plugin_name=cfg.containerd.plugin_name,
            address=DEFAULT_ADDRESS if address == "fd://" else address,
            root=cfg.daemon.root,
            mirror=cfg.peers.enable and cfg.mirror.enable,
        )


def config_version_for(containerd: ContainerdVersion) -> int:
    """The config `version` `containerd` reads natively."""
    return 3 if containerd.major >= 2 else 2


def _cri_paths(version: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the table of `snapshotter` & co., the table of `registry`) for config `version`."""
    if version == 3:
        return ("plugins", CRI_V3_IMAGES), ("plugins", CRI_V3_IMAGES, "registry")
    return ("plugins", CRI_V2, "containerd"), ("plugins", CRI_V2, "registry")


def our_values(
    version: int, ours: OurSettings, *, root_export: bool
) -> list[tuple[tuple[str, ...], Any, bool]]:
    """Every (key path, value, replace) we set for config `version`; `replace` False: only
    when the key is absent or empty. `root_export`: containerd reads `exports.root`
    (`configcheck.has_root_export`)."""
    plugin = ("proxy_plugins", ours.plugin_name)
    images, registry = _cri_paths(version)
    values: list[tuple[tuple[str, ...], Any, bool]] = [
        ((*plugin, "type"), "snapshot", True),
        ((*plugin, "address"), ours.address, True),
    ]
    if root_export or version == 3:
        values.append(((*plugin, "exports", "root"), ours.root, True))
    values += [
        ((*images, "snapshotter"), ours.plugin_name, True),
        ((*images, "disable_snapshot_annotations"), False, True),
    ]
    if ours.mirror:
        values.append(((*images, "discard_unpacked_layers"), False, True))
        if version == 3:
            values.append(((*images, "use_local_image_pull"), True, True))
    values.append(((*registry, "config_path"), DEFAULT_HOSTS_DIR, False))
    return values


def fragment(containerd: ContainerdVersion, ours: OurSettings, *, registry: bool = True) -> str:
    """Our settings alone as TOML for `containerd`, without a `version` line: what a tool
    that merges config files itself (EKS nodeadm) is given. `registry` False leaves
    `registry.config_path` out (the base config sets one)."""
    doc = tomlkit.document()
    version = config_version_for(containerd)
    for path, value, replace in our_values(version, ours, root_export=has_root_export(containerd)):
        if replace or registry:
            _set(doc, path, value, where="fragment")
    return doc.as_string()


def _is_table(item: Any) -> bool:
    return isinstance(item, dict)


def _child(container: Any, key: str, *, super_table: bool, where: str) -> Any:
    """`container[key]`, a table created (at the end) when absent."""
    if key in container:
        item = container[key]
        if not _is_table(item):
            raise ContainerdConfigError(f"{where}: {key!r} is not a table; left as it is")
        return item
    table = tomlkit.table(is_super_table=super_table)
    container.append(key, table)
    return container[key]


def _set(doc: Container, path: tuple[str, ...], value: Any, *, where: str) -> None:
    cur: Any = doc
    for depth, key in enumerate(path[:-1]):
        # Tables that only hold tables (`plugins`, a plugin id) are written as super tables:
        # `[plugins."io.containerd.grpc.v1.cri".containerd]` without empty parent headers.
        leaf_parent = depth == len(path) - 2
        cur = _child(cur, key, super_table=not leaf_parent, where=where)
    indent = _indent_of(cur)
    cur[path[-1]] = value
    if indent is not None:
        cur.item(path[-1]).trivia.indent = indent


def _indent_of(table: Any) -> str | None:
    """The indentation of the first value in `table` (new keys get the same)."""
    body = getattr(getattr(table, "value", None), "body", None) or getattr(table, "body", [])
    for key, item in body:
        if key is not None and not isinstance(item, Table | AoT) and hasattr(item, "trivia"):
            return str(item.trivia.indent)
    return None


def _get(data: dict[str, Any], path: tuple[str, ...]) -> Any:
    cur: Any = data
    for key in path:
        if not isinstance(cur, dict) or key not in cur:
            return None
        cur = cur[key]
    return cur


def _put(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    cur = data
    for key in path[:-1]:
        cur = cur.setdefault(key, {})
    cur[path[-1]] = value


@dataclass(frozen=True, slots=True)
class Merged:
    """The merged text and the warnings to show (e.g. `imports`)."""

    text: str
    warnings: tuple[str, ...] = ()


def merge(
    text: str | None, ours: OurSettings, *, containerd: ContainerdVersion, where: str
) -> Merged:
    """`text` (None: no file) with our settings merged in, for the installed `containerd`
    version. Pure. Raises ContainerdConfigError (naming `where`) when it cannot be merged."""
    native = config_version_for(containerd)
    source = text or ""
    try:
        doc = tomlkit.parse(source)
        before = tomllib.loads(source)
    except (tomlkit.exceptions.TOMLKitError, tomllib.TOMLDecodeError) as e:
        raise ContainerdConfigError(f"{where}: not valid TOML: {e}") from None
    warnings: list[str] = []
    version = before.get("version")
    if version is None:
        if before:
            raise ContainerdConfigError(
                f"{where} has no `version`, so containerd reads it as version 1 (old plugin "
                f"names); rewrite it as version {native} first"
            )
        doc.add("version", native)
        if text is None:
            doc.add(tomlkit.nl())
        version = native
    elif version not in (2, 3):
        raise ContainerdConfigError(
            f"{where}: version = {version!r}; containerd {containerd} needs version = {native}"
        )
    elif version == 3 and native == 2:
        raise ContainerdConfigError(
            f"{where}: version = 3 but containerd {containerd} reads version 2 only"
        )
    imports = before.get("imports")
    if imports:
        warnings.append(
            f"{where} imports {imports!r}: a drop-in that sets any key of a plugin replaces "
            "that plugin's whole table, so the settings were merged into this file; keep CRI "
            "keys out of the drop-ins"
        )
    expected = copy.deepcopy(before)
    expected["version"] = version
    values = our_values(version, ours, root_export=has_root_export(containerd))
    for path, value, replace in values:
        if not replace and _get(before, path):
            continue
        _set(doc, path, value, where=where)
        _put(expected, path, value)
    out = doc.as_string()
    _verify(out, expected, ours, where)
    return Merged(out, tuple(warnings))


def _verify(out: str, expected: dict[str, Any], ours: OurSettings, where: str) -> None:
    """The merge kept every setting and `config check` accepts ours. Raises
    ContainerdConfigError (a bug in the merge, or a layout tomlkit cannot edit)."""
    try:
        after = tomllib.loads(out)
    except tomllib.TOMLDecodeError as e:
        raise ContainerdConfigError(
            f"{where}: merging made invalid TOML ({e}); left as it is"
        ) from None
    if after != expected:
        raise ContainerdConfigError(
            f"{where}: merging would change other settings; left as it is (edit it by hand: "
            "docs/configuration.md)"
        )
    base = Config()
    cfg = dataclasses.replace(
        base, containerd=dataclasses.replace(base.containerd, plugin_name=ours.plugin_name)
    )
    problems = [
        p for p in check_containerd(cfg, ours.address, out, where) if "config_path" not in p
    ]
    if problems:
        raise ContainerdConfigError(problems[0])


__all__ = [
    "DEFAULT_HOSTS_DIR",
    "ContainerdConfigError",
    "Merged",
    "OurSettings",
    "config_version_for",
    "fragment",
    "merge",
    "our_values",
]
