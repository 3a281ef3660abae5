"""containerd `hosts.toml` registry host configuration (the `config_path` directory layout).

`HostsConfig.load(roots, registry)` finds the configuration directory of `registry` under the
first root that has one (`<host>_<port>_`, then the host verbatim, then `_default`), reads its
`hosts.toml` (or Docker-style `*.crt`/`*.cert`/`*.key` files), and yields the ordered list of
endpoints: the `[host."…"]` mirrors in file order, then the upstream `server` last.
"""

from __future__ import annotations

import ipaddress
import logging
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from index.oci.errors import HostsConfigError
from index.oci.reference import DOCKER_HUB, DOCKER_HUB_API_HOST

log = logging.getLogger(__name__)

CAP_PULL = "pull"
CAP_RESOLVE = "resolve"
CAP_PUSH = "push"
CAP_REFERRERS = "referrers"
ALL_CAPABILITIES = frozenset({CAP_PULL, CAP_RESOLVE, CAP_PUSH})
_KNOWN_CAPABILITIES = frozenset({CAP_PULL, CAP_RESOLVE, CAP_PUSH, CAP_REFERRERS})
HOSTS_FILE = "hosts.toml"
DEFAULT_DIR = "_default"


def is_local_host(host: str) -> bool:
    """True for `localhost` and loopback addresses (with or without port)."""
    name = host
    if name.startswith("["):
        name = name[1 : name.find("]")]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def default_scheme(host: str) -> str:
    """`http` for localhost/loopback, else `https` (containerd's default)."""
    return "http" if is_local_host(host) else "https"


@dataclass(frozen=True, slots=True)
class RegistryHost:
    """One endpoint to send distribution API requests to.

    `api_root` is the URL path the API lives under (usually `/v2`); `host` includes the port.
    `ca` and `client` are certificate files (absolute paths); `client` pairs are (cert, key),
    key None when it is inside the cert file. `headers` maps a name to its values.
    """

    scheme: str
    host: str
    api_root: str = "/v2"
    capabilities: frozenset[str] = ALL_CAPABILITIES
    ca: tuple[Path, ...] = ()
    client: tuple[tuple[Path, Path | None], ...] = ()
    skip_verify: bool = False
    headers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    is_upstream: bool = True
    source: Path | None = field(default=None, compare=False)
    """The hosts.toml this endpoint was configured by (None: built-in default)."""

    @property
    def base_url(self) -> str:
        """`scheme://host/v2` (no trailing slash)."""
        return f"{self.scheme}://{self.host}{self.api_root}"

    def can(self, capability: str) -> bool:
        return capability in self.capabilities


def _str_list(value: Any, key: str, where: Path) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise HostsConfigError(f"{where}: {key} must be a string or an array of strings")


def _parse_table(
    table: Mapping[str, Any], url: str, base_dir: Path, where: Path, *, upstream: bool
) -> RegistryHost:
    """Build a RegistryHost from a hosts.toml table for the endpoint `url`."""
    raw = url if "://" in url else "//" + url
    try:
        parts = urlsplit(raw)
    except ValueError as e:  # an unclosed "[" of an IPv6 address
        raise HostsConfigError(f"{where}: host {url!r} is not a URL: {e}") from e
    if not parts.netloc:
        raise HostsConfigError(f"{where}: host {url!r} has no host name")
    scheme = parts.scheme or default_scheme(parts.netloc)
    if scheme not in ("http", "https"):
        raise HostsConfigError(f"{where}: host {url!r} has unsupported scheme {scheme!r}")
    override_path = table.get("override_path", False)
    if not isinstance(override_path, bool):
        raise HostsConfigError(f"{where}: override_path of {url!r} must be a boolean")
    path = parts.path.rstrip("/")
    if not override_path and not path.endswith("/v2"):
        path += "/v2"
    if any(c.isspace() for c in parts.netloc):
        raise HostsConfigError(f"{where}: host {url!r} has a space in its host name")
    import httpx  # here, not at the top: the install command reads hosts.toml without httpx

    try:
        parts.port  # noqa: B018 (raises for a port that is not a number in 0..65535)
        httpx.URL(f"{scheme}://{parts.netloc}{path}/")  # the check every request's URL gets
    except (ValueError, httpx.InvalidURL) as e:
        raise HostsConfigError(f"{where}: host {url!r} is not a usable URL: {e}") from e

    caps_raw = table.get("capabilities")
    if caps_raw is None:
        caps = ALL_CAPABILITIES
    else:
        caps_list = _str_list(caps_raw, "capabilities", where)
        unknown = set(caps_list) - _KNOWN_CAPABILITIES
        if unknown:
            raise HostsConfigError(f"{where}: unknown capabilities {sorted(unknown)} for {url!r}")
        caps = frozenset(caps_list)

    def resolve(p: str) -> Path:
        q = Path(p)
        return q if q.is_absolute() else base_dir / q

    ca = tuple(resolve(p) for p in _str_list(table["ca"], "ca", where)) if "ca" in table else ()
    client: list[tuple[Path, Path | None]] = []
    raw_client = table.get("client", [])
    if not isinstance(raw_client, str | list):
        raise HostsConfigError(f"{where}: client of {url!r} must be a string or an array")
    for item in [raw_client] if isinstance(raw_client, str) else raw_client:
        if isinstance(item, str):
            client.append((resolve(item), None))
        elif isinstance(item, list) and len(item) == 2 and all(isinstance(s, str) for s in item):
            client.append((resolve(item[0]), resolve(item[1]) if item[1] else None))
        else:
            raise HostsConfigError(f"{where}: bad client entry {item!r} for {url!r}")
    skip_verify = table.get("skip_verify", False)
    if not isinstance(skip_verify, bool):
        raise HostsConfigError(f"{where}: skip_verify of {url!r} must be a boolean")
    headers: dict[str, tuple[str, ...]] = {}
    raw_headers = table.get("header", {})
    if not isinstance(raw_headers, dict):
        raise HostsConfigError(f"{where}: header of {url!r} must be a table")
    for name, value in raw_headers.items():
        headers[name] = tuple(_str_list(value, f"header {name}", where))
    return RegistryHost(
        scheme=scheme,
        host=parts.netloc,
        api_root=path,
        capabilities=caps,
        ca=ca,
        client=tuple(client),
        skip_verify=skip_verify,
        headers=headers,
        is_upstream=upstream,
        source=where,
    )


def default_host(
    registry: str, *, plain_http: bool | None = None, skip_verify: bool = False
) -> RegistryHost:
    """The upstream endpoint of `registry` with no configuration.

    `docker.io` is served by `registry-1.docker.io`. `plain_http=None` means http only for
    localhost/loopback.
    """
    host = DOCKER_HUB_API_HOST if registry == DOCKER_HUB else registry
    scheme = ("http" if plain_http else "https") if plain_http is not None else default_scheme(host)
    return RegistryHost(scheme=scheme, host=host, skip_verify=skip_verify)


def host_directories(root: Path, registry: str) -> list[Path]:
    """Candidate directories for `registry` under `root`, in lookup order."""
    out: list[Path] = []
    idx = registry.rfind(":")
    if idx > 0 and not registry.endswith("]"):
        out.append(root / (registry[:idx] + "_" + registry[idx + 1 :] + "_"))
    out.append(root / registry)
    out.append(root / DEFAULT_DIR)
    return out


@dataclass(frozen=True, slots=True)
class HostsConfig:
    """The endpoints configured for one registry namespace. `source` is the file read, if any."""

    registry: str
    mirrors: tuple[RegistryHost, ...]
    upstream: RegistryHost
    source: Path | None = None

    @classmethod
    def default(
        cls, registry: str, *, plain_http: bool | None = None, skip_verify: bool = False
    ) -> HostsConfig:
        """No mirrors; the registry itself."""
        return cls(
            registry, (), default_host(registry, plain_http=plain_http, skip_verify=skip_verify)
        )

    @classmethod
    def load(
        cls,
        config_path_roots: Iterable[str | Path] | str,
        registry_host: str,
        *,
        plain_http: bool | None = None,
        skip_verify: bool = False,
    ) -> HostsConfig:
        """Load the configuration of `registry_host` (e.g. `docker.io`, `localhost:5000`).

        `config_path_roots` is a list of roots or one `:`-separated string, like containerd's
        `config_path`; the first root with a matching directory wins. Without one, the default
        (no mirrors) is returned. `plain_http`/`skip_verify` apply to the default upstream.
        Raises HostsConfigError on a file that cannot be read or has invalid values.
        """
        roots = (
            config_path_roots.split(":")
            if isinstance(config_path_roots, str)
            else config_path_roots
        )
        for root in roots:
            if not str(root):
                continue
            for directory in host_directories(Path(root), registry_host):
                if directory.is_dir():
                    return cls._load_dir(directory, registry_host, plain_http, skip_verify)
        return cls.default(registry_host, plain_http=plain_http, skip_verify=skip_verify)

    @classmethod
    def _load_dir(
        cls, directory: Path, registry: str, plain_http: bool | None, skip_verify: bool
    ) -> HostsConfig:
        upstream = default_host(registry, plain_http=plain_http, skip_verify=skip_verify)
        path = directory / HOSTS_FILE
        if not path.is_file():
            return cls(registry, (), _docker_cert_files(directory, upstream), None)
        try:
            doc = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise HostsConfigError(f"cannot read {path}: {e}") from e
        hosts = doc.get("host", {})
        if not isinstance(hosts, dict):
            raise HostsConfigError(f'{path}: host must be a table of [host."URL"] tables')
        if not hosts:
            log.warning(
                "%s has no [host] table: containerd 1.6/1.7 ignores such a file entirely "
                '(its `server` is not used); add a [host."…"] table',
                path,
            )
        mirrors: list[RegistryHost] = []
        for url, table in hosts.items():
            if not isinstance(table, dict):
                raise HostsConfigError(f"{path}: host {url!r} must be a table")
            mirrors.append(_parse_table(table, url, directory, path, upstream=False))
        server = doc.get("server")
        if server is not None:
            if not isinstance(server, str):
                raise HostsConfigError(f"{path}: server must be a string")
            upstream = _parse_table(doc, server, directory, path, upstream=True)
        elif any(k in doc for k in ("capabilities", "ca", "client", "skip_verify", "header")):
            top = _parse_table(
                doc, f"{upstream.scheme}://{upstream.host}", directory, path, upstream=True
            )
            upstream = replace(top, skip_verify=top.skip_verify or skip_verify)
        return cls(registry, tuple(mirrors), upstream, path)

    def endpoints(self, capability: str | None = None) -> list[RegistryHost]:
        """Mirrors in file order, then the upstream; only those with `capability` if given.

        For `referrers`, hosts without that capability but with `resolve` are used (the
        tag-schema fallback only needs manifest reads).
        """
        all_hosts = [*self.mirrors, self.upstream]
        if capability is None:
            return all_hosts
        if capability == CAP_REFERRERS:
            return [h for h in all_hosts if h.can(CAP_REFERRERS) or h.can(CAP_RESOLVE)]
        return [h for h in all_hosts if h.can(capability)]


def _docker_cert_files(directory: Path, upstream: RegistryHost) -> RegistryHost:
    """Apply Docker-style `*.crt` (CA) and `*.cert`+`*.key` (client) files to `upstream`."""
    cas = tuple(sorted(directory.glob("*.crt")))
    pairs: list[tuple[Path, Path | None]] = []
    for cert in sorted(directory.glob("*.cert")):
        key = cert.with_suffix(".key")
        if key.exists():
            pairs.append((cert, key))
    if not cas and not pairs:
        return upstream
    return replace(upstream, ca=cas, client=tuple(pairs))


def needs_namespace_param(endpoint_host: str, registry: str) -> bool:
    """True if requests to `endpoint_host` must carry `?ns=<registry>` (it proxies for it)."""
    return endpoint_host != registry and not (
        registry == DOCKER_HUB and endpoint_host == DOCKER_HUB_API_HOST
    )


def hosts_from_dirs(dirs: Sequence[str | Path], registry: str, **kwargs: Any) -> HostsConfig:
    """`HostsConfig.load` when `dirs` is non-empty, else the default for `registry`."""
    if dirs:
        return HostsConfig.load(dirs, registry, **kwargs)
    return HostsConfig.default(registry, **kwargs)
