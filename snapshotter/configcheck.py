"""`config check`: find problems in our config and in containerd's, one line each.

Like Spegel's startup checks, every problem is a sentence saying what is wrong
and what to set, e.g.

    containerd config /etc/containerd/config.toml: [proxy_plugins.sociable] is missing; add type = "snapshot" and address = "/run/sociable/sociable.sock"

Checked in the containerd file (version 2 = containerd 1.6/1.7, version 3 = 2.x):
the proxy plugin table (type, address equal to ours), CRI's `snapshotter`,
`disable_snapshot_annotations = false`, a registry `config_path` (needed for
hosts.toml mirrors), and where CRI's ImageFsInfo (kubelet's image-filesystem stats and
image GC) looks for the snapshotter's disk: `<containerd root>/io.containerd.snapshotter.v1.<name>`
on 1.6/1.7, `[proxy_plugins.<name>.exports] root` on 2.x. With `[peers] enable`: the
listen address is one of this node's, the advertised one too (a warning: NAT), some member
source is set, and the token and kubeconfig files exist. With the registry mirror on as well:
hosts.toml enabled, `discard_unpacked_layers` not true, `use_local_image_pull` on 2.x, the
containerd socket present (a warning). The credential providers' config file and bin dir
exist; with `[cri] enable`, kubelet's config (where found: EKS AL2023, AL2, kubeadm paths)
names the proxy as its image service (a warning with the flag to set). The metrics
listener is not on the peer listener's port (every address is a warning). containerd's own
version (`containerd --version`, or `config check --containerd-version`): before 1.7.16
(1.6.32 on 1.6) it cannot be told where a proxy snapshotter's disk is (a warning).

A finding is an error (the snapshotter will not work as configured) unless it starts with
`warning: ` (it works, but something is degraded): the image-filesystem findings are
warnings, because containerd creates `io.containerd.snapshotter.v1.<name>` itself once it
has used the snapshotter, so a fresh machine could otherwise never pass the check.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any, NamedTuple

from .config import DEFAULT_ADDRESS, Config

SNAPSHOT_PLUGIN_TYPES = ("snapshot", "io.containerd.snapshotter.v1")
CRI_V2 = "io.containerd.grpc.v1.cri"
CRI_V3_IMAGES = "io.containerd.cri.v1.images"
DEFAULT_CONTAINERD_ROOT = "/var/lib/containerd"
WARNING_PREFIX = "warning: "


def is_warning(finding: str) -> bool:
    """Whether a finding of `check_all` is a warning (it does not fail the check)."""
    return finding.startswith(WARNING_PREFIX)


def _table(data: dict[str, Any], *path: str) -> dict[str, Any] | None:
    cur: Any = data
    for p in path:
        if not isinstance(cur, dict) or not isinstance(cur.get(p), dict):
            return None
        cur = cur[p]
    return cur if isinstance(cur, dict) else None


def check_containerd(cfg: Config, address: str, text: str, where: str) -> list[str]:
    """Problems in containerd config `text` (named `where` in messages) for our `address`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        return [f"{where}: not valid TOML: {e}"]
    problems: list[str] = []
    name = cfg.containerd.plugin_name
    expected_address = DEFAULT_ADDRESS if address == "fd://" else address
    version = data.get("version", 1)
    if version not in (2, 3):
        problems.append(
            f"{where}: version = {version!r}; containerd 1.6/1.7 need version = 2 "
            "(2.x: version = 3) for the settings below to apply"
        )
    plugin = _table(data, "proxy_plugins", name)
    if plugin is None:
        problems.append(
            f'{where}: [proxy_plugins.{name}] is missing; add type = "snapshot" and '
            f'address = "{expected_address}"'
        )
    else:
        if plugin.get("type") not in SNAPSHOT_PLUGIN_TYPES:
            problems.append(
                f'{where}: [proxy_plugins.{name}] type = {plugin.get("type")!r}; set type = "snapshot"'
            )
        if plugin.get("address") != expected_address:
            problems.append(
                f"{where}: [proxy_plugins.{name}] address = {plugin.get('address')!r} but the "
                f'snapshotter listens on "{expected_address}"'
            )
    if version == 3:
        cri = _table(data, "plugins", CRI_V3_IMAGES) or {}
        cri_name = f'[plugins."{CRI_V3_IMAGES}"]'
        registry = cri.get("registry") if isinstance(cri.get("registry"), dict) else {}
        registry_name = f'[plugins."{CRI_V3_IMAGES}".registry]'
    else:
        cri = _table(data, "plugins", CRI_V2, "containerd") or {}
        cri_name = f'[plugins."{CRI_V2}".containerd]'
        registry = _table(data, "plugins", CRI_V2, "registry") or {}
        registry_name = f'[plugins."{CRI_V2}".registry]'
    if cri.get("snapshotter") != name:
        problems.append(
            f"{where}: {cri_name} snapshotter = {cri.get('snapshotter', 'overlayfs')!r}; "
            f'set snapshotter = "{name}" so CRI pulls and runs images with it'
        )
    if cri.get("disable_snapshot_annotations", True) is not False:
        problems.append(
            f"{where}: {cri_name} disable_snapshot_annotations is not false (the default is "
            "true); set it to false or CRI will not pass image labels to the snapshotter"
        )
    assert isinstance(registry, dict)
    if not registry.get("config_path"):
        problems.append(
            f"{where}: {registry_name} config_path is not set; set it (e.g. "
            '"/etc/containerd/certs.d") so registry hosts.toml mirrors apply'
        )
    return problems


def check_image_fs(cfg: Config, text: str, where: str, root: Path) -> list[str]:
    """Whether CRI's ImageFsInfo can find the disk our snapshots live on (`root`)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return []  # reported by check_containerd
    name = cfg.containerd.plugin_name
    if data.get("version", 1) == 3:
        exports = _table(data, "proxy_plugins", name, "exports") or {}
        if not exports.get("root"):
            return [
                f"{WARNING_PREFIX}{where}: [proxy_plugins.{name}.exports] root is not set; set root = "
                f'"{root}" so CRI can report the image filesystem kubelet garbage-collects'
            ]
        return []
    ctd_root = Path(str(data.get("root", DEFAULT_CONTAINERD_ROOT)))
    fs_dir = ctd_root / f"io.containerd.snapshotter.v1.{name}"
    if not fs_dir.exists():
        return [
            f"{WARNING_PREFIX}{where}: {fs_dir} does not exist (containerd creates it once it has used the snapshotter); CRI's ImageFsInfo (kubelet image stats and "
            f"image GC) looks there: create it on the same filesystem as {root}, or bind-mount "
            f"{root} there"
        ]
    return []


def check_ours(cfg: Config, address: str, root: Path) -> list[str]:
    """Problems with our own settings that loading cannot catch (filesystem state)."""
    problems: list[str] = []
    if address != "fd://" and len(address.encode()) > 107:
        problems.append(f"address {address!r} is longer than a unix socket path may be (107 bytes)")
    if root.exists() and not root.is_dir():
        problems.append(f"root {str(root)!r} exists and is not a directory")
    return problems


def check_peers(cfg: Config) -> list[str]:
    """What would disable the peers at start, or leave a node without any (`[peers]`)."""
    p = cfg.peers
    if not p.enable:
        return []
    from snapshotter.peers.address import parse_address
    from snapshotter.peers.members import is_local_address

    problems: list[str] = []
    host, _ = parse_address(p.listen)
    if host not in ("0.0.0.0", "::") and not is_local_address(host):
        problems.append(f"[peers] listen = {p.listen!r}: {host} is not an address of this node")
    advertised, _ = p.advertised()
    if not is_local_address(advertised):
        problems.append(
            f"{WARNING_PREFIX}[peers] advertise = {p.advertise!r}: {advertised} is not an "
            "address of this node (fine behind NAT; otherwise other nodes cannot reach it)"
        )
    if not (p.static or p.dns or p.kubernetes_service):
        problems.append(
            f"{WARNING_PREFIX}[peers] no members: set static, dns or kubernetes_service "
            "(alone, a node fetches everything from the registry)"
        )
    for key, path in (("token_file", p.token_file), ("kubeconfig", p.kubeconfig)):
        if path and not Path(path).is_file():
            problems.append(f"[peers] {key} = {path!r} does not exist or is not a file")
    return problems


def check_mirror(cfg: Config, text: str, where: str) -> list[str]:
    """What keeps the registry mirror from working (`[peers]` and `[mirror]` enabled), as
    Spegel checks at start: containerd reads hosts.toml (`registry.config_path`), keeps
    layers in its content store (`discard_unpacked_layers = false`), and on 2.x pulls with
    the CRI's own puller (`use_local_image_pull = true`; the transfer service does not use
    mirrors the same way); our socket setting names a socket."""
    if not (cfg.peers.enable and cfg.mirror.enable):
        return []
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return []  # reported by check_containerd
    problems: list[str] = []
    if data.get("version", 1) == 3:
        images = _table(data, "plugins", CRI_V3_IMAGES) or {}
        name = f'[plugins."{CRI_V3_IMAGES}"]'
        registry = images.get("registry") if isinstance(images.get("registry"), dict) else {}
        if images.get("use_local_image_pull") is not True:
            problems.append(
                f"{where}: {name} use_local_image_pull is not true; set it so CRI pulls use "
                "hosts.toml mirrors (the registry mirror)"
            )
    else:
        images = _table(data, "plugins", CRI_V2, "containerd") or {}
        name = f'[plugins."{CRI_V2}".containerd]'
        registry = _table(data, "plugins", CRI_V2, "registry") or {}
    assert isinstance(registry, dict)
    if not registry.get("config_path"):
        problems.append(
            f"{where}: the registry mirror needs hosts.toml: set the CRI registry config_path"
        )
    if images.get("discard_unpacked_layers") is True:
        problems.append(
            f"{where}: {name} discard_unpacked_layers = true; set it to false so layers stay "
            "in the content store the registry mirror serves from"
        )
    if not Path(cfg.mirror.containerd_address).exists():
        problems.append(
            f"{WARNING_PREFIX}[mirror] containerd_address = {cfg.mirror.containerd_address!r} "
            "does not exist (yet): the mirror serves nothing from this node's content store "
            "until containerd runs"
        )
    return problems


KUBELET_CONFIGS = (
    Path("/etc/kubernetes/kubelet/config.json"),  # EKS AL2023 (nodeadm)
    Path("/etc/kubernetes/kubelet/kubelet-config.json"),  # EKS AL2
    Path("/var/lib/kubelet/config.yaml"),  # kubeadm
)


def check_credentials(
    cfg: Config, kubelet_configs: tuple[Path, ...] = KUBELET_CONFIGS
) -> list[str]:
    """The CRI proxy (`[cri]`) and the credential providers (`[credential_providers]`): the
    files exist, and kubelet (where its config file is found) talks to the proxy."""
    problems: list[str] = []
    providers = cfg.credential_providers
    if providers.config:
        if not Path(providers.config).is_file():
            problems.append(f"[credential_providers] config = {providers.config!r} does not exist")
        if not providers.bin_dir or not Path(providers.bin_dir).is_dir():
            problems.append(
                f"[credential_providers] bin_dir = {providers.bin_dir!r} is not a directory "
                "(kubelet's --image-credential-provider-bin-dir)"
            )
    if not cfg.cri.enable:
        return problems
    endpoint = f"unix://{cfg.cri.address}"
    for path in kubelet_configs:
        try:
            text = path.read_text()
        except OSError:
            continue
        if endpoint not in text:
            problems.append(
                f"{WARNING_PREFIX}kubelet config {path} does not name {endpoint}: start kubelet "
                f"with --image-service-endpoint={endpoint} (or imageServiceEndpoint in its "
                "config), else the proxy captures no credentials"
            )
        break
    else:
        problems.append(
            f"{WARNING_PREFIX}[cri] enable: start kubelet with "
            f"--image-service-endpoint={endpoint} so it pulls through the proxy"
        )
    return problems


class ContainerdVersion(NamedTuple):
    """A containerd release: `major.minor.patch`, `prerelease` for an `-alpha`/`-beta`/`-rc`
    build (which comes before the release of the same number)."""

    major: int
    minor: int
    patch: int
    prerelease: bool = False

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}" + (" (a pre-release)" * self.prerelease)


_VERSION_TOKEN = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)(?P<rest>[-~+.].*)?$")
_PRERELEASE = re.compile(r"^-(alpha|beta|rc)", re.IGNORECASE)


def parse_containerd_version(text: str) -> ContainerdVersion | None:
    """The version in `containerd --version`'s output (`containerd github.com/containerd/containerd
    1.6.20~ds1 1.6.20~ds1-1+deb12u3`, `containerd containerd.io 1.7.27 05044ec…`,
    `... v2.0.4 ...`) or a bare version (`1.7.16`, `v2.0.0-rc.1`): the first word that is
    `[v]MAJOR.MINOR.PATCH`, whatever distribution suffix follows (`~ds1`, `-1+deb12u3`);
    None when there is none."""
    for word in text.split():
        m = _VERSION_TOKEN.match(word)
        if m is not None:
            major, minor, patch = (int(m[i]) for i in (1, 2, 3))
            pre = bool(_PRERELEASE.match(m["rest"] or ""))
            return ContainerdVersion(major, minor, patch, pre)
    return None


ROOT_EXPORT_SINCE = {(1, 6): ContainerdVersion(1, 6, 32), (1, 7): ContainerdVersion(1, 7, 16)}
"""The first release of each line whose CRI reads `[proxy_plugins.<name>.exports] root` for
the image filesystem (kubelet's image GC and ephemeral-storage limits); every 2.x does."""


def has_root_export(version: ContainerdVersion) -> bool:
    """Whether containerd `version` can be told where a proxy snapshotter's disk is."""
    if version.major >= 2:
        return True
    since = ROOT_EXPORT_SINCE.get((version.major, version.minor))
    if since is None:
        return version[:3] > (1, 7, 16)
    return version[:3] > since[:3] or (version[:3] == since[:3] and not version.prerelease)


def installed_containerd_version(binary: str = "containerd", timeout_sec: float = 10.0) -> str:
    """What `<binary> --version` prints, stripped; "" when it cannot be run, fails or hangs
    past `timeout_sec`."""
    try:
        done = subprocess.run(
            [binary, "--version"],
            capture_output=True,
            text=True,
            timeout=timeout_sec,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def check_containerd_version(cfg: Config, text: str) -> list[str]:
    """Warnings for containerd's version `text` (`containerd --version`'s output, a bare
    version, or "" when it could not be run): a containerd that cannot be told where this
    snapshotter's disk is (before 1.7.16, or 1.6.32 on 1.6), or a version not found."""
    name = cfg.containerd.plugin_name
    if not text:
        return [
            f"{WARNING_PREFIX}containerd's version is unknown (`containerd --version` did not "
            "run): pass config check --containerd-version to check it"
        ]
    version = parse_containerd_version(text)
    if version is None:
        return [
            f"{WARNING_PREFIX}no version in {text[:80]!r}: pass config check "
            "--containerd-version MAJOR.MINOR.PATCH"
        ]
    if has_root_export(version):
        return []
    return [
        f"{WARNING_PREFIX}containerd {version} is older than 1.7.16 (1.6.32 on 1.6): it cannot "
        f"be told where this snapshotter's disk is ([proxy_plugins.{name}.exports] root), so "
        "kubelet's image garbage collection and ephemeral-storage limits work only while "
        f"<containerd root>/io.containerd.snapshotter.v1.{name} is on the snapshotter root's "
        "filesystem (bind-mount the root there); upgrade containerd (docs/kubernetes.md)"
    ]


def check_metrics(cfg: Config) -> list[str]:
    """The metrics listener (`[metrics] address`; loading checked it is an `ADDR:PORT`): not
    the port of the peer listener, and a warning when any host may read it."""
    from snapshotter.peers.address import parse_address

    if not cfg.metrics.address:
        return []
    host, port = parse_address(cfg.metrics.address)
    problems = []
    if cfg.peers.enable and parse_address(cfg.peers.listen)[1] == port:
        problems.append(
            f"[metrics] address {cfg.metrics.address}: port {port} is the peer listener's "
            f"([peers] listen {cfg.peers.listen}); choose another port"
        )
    if host in ("0.0.0.0", "::"):
        problems.append(
            f"{WARNING_PREFIX}[metrics] address {cfg.metrics.address}: every host that can "
            "reach this node can read the metrics; a node address or 127.0.0.1 limits that"
        )
    return problems


def check_all(
    cfg: Config,
    address: str,
    root: Path,
    containerd_config: Path,
    *,
    containerd_version: str | None = None,
) -> list[str]:
    """Every finding, one line each (warnings start with `warning: `); [] when all is well.
    `containerd_version` is what `containerd --version` printed (see
    `check_containerd_version`); None leaves the version unchecked."""
    problems = check_ours(cfg, address, root) + check_peers(cfg) + check_credentials(cfg)
    problems.extend(check_metrics(cfg))
    if containerd_version is not None:
        problems.extend(check_containerd_version(cfg, containerd_version))
    where = f"containerd config {containerd_config}"
    try:
        text = containerd_config.read_text()
    except OSError as e:
        problems.append(f"{where}: cannot be read: {e.strerror}")
        return problems
    problems.extend(check_containerd(cfg, address, text, where))
    problems.extend(check_image_fs(cfg, text, where, root))
    problems.extend(check_mirror(cfg, text, where))
    return problems
