"""kubelet's credential-provider plugins (the exec protocol), as an async credential source.

A `CredentialProviderConfig` file (kubelet's `--image-credential-provider-config`) lists
plugins; each names the images it serves with `matchImages` globs. For an image, the first
plugin whose globs match is run as `<bin_dir>/<name> <args…>` with a
`CredentialProviderRequest` on stdin; it answers with a `CredentialProviderResponse` on stdout:
an `auth` map (match key → username and password), how long to keep it (`cacheDuration`) and
what it is good for (`cacheKeyType`: the image, its registry, or every image the plugin
serves). `ProviderKeychain` keeps the answers for that long and runs a plugin again shortly
before they run out. See docs/credentials.md.

The matching rules are kubelet's: a glob and an image both read as `https://<text>` (a scheme
on either is ignored); ports must be equal (both absent or the same); the hosts must have the
same number of dot-separated parts, each part matched by Go's `filepath.Match` (`*` never
crosses a dot); the glob's path must be a string prefix of the image's path.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
import yaml

from index.oci.dockerconfig import Credentials
from index.oci.errors import CredentialsError
from snapshotter.singleflight import SingleFlight

if TYPE_CHECKING:
    from snapshotter.config import CredentialProvidersConfig

log = logging.getLogger(__name__)

CONFIG_API_VERSIONS = frozenset(
    {"kubelet.config.k8s.io/v1", "kubelet.config.k8s.io/v1beta1", "kubelet.config.k8s.io/v1alpha1"}
)
PLUGIN_API_VERSIONS = frozenset(
    {
        "credentialprovider.kubelet.k8s.io/v1",
        "credentialprovider.kubelet.k8s.io/v1beta1",
        "credentialprovider.kubelet.k8s.io/v1alpha1",
    }
)
CACHE_KEY_TYPES = frozenset({"Image", "Registry", "Global"})
# kubelet's hard limit on one plugin run.
PLUGIN_TIMEOUT_SEC = 60.0
# An answer is refreshed when less than this much of its lifetime is left: 10 % of the
# duration, at most 5 minutes (a 12 h token is refreshed 5 minutes early, a 2 s one 0.2 s).
REFRESH_FRACTION = 0.1
REFRESH_MAX_SEC = 300.0
# Variables of the daemon's environment a plugin inherits; the provider's `env` adds to them.
_INHERITED_ENV = (
    "PATH",
    "HOME",
    "TMPDIR",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
)
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_PROVIDER_FIELDS = frozenset(
    {"name", "matchImages", "defaultCacheDuration", "apiVersion", "args", "env", "tokenAttributes"}
)

# ---------------------------------------------------------------------------------------------
# Go durations


_DURATION_UNITS_SEC = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # Go accepts both micro signs (U+00B5, U+03BC)
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_go_duration(text: str) -> float:
    """A Go duration string (`12h0m0s`, `1.5h`, `300ms`, `0`) in seconds.

    Raises ValueError when `text` is not one.
    """
    s = text.strip()
    sign = 1.0
    if s[:1] in ("+", "-"):
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f"invalid duration {text!r}")
    total = 0.0
    pos = 0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if m is None:
            raise ValueError(f"invalid duration {text!r}")
        total += float(m.group(1)) * _DURATION_UNITS_SEC[m.group(2)]
        pos = m.end()
    return sign * total


# ---------------------------------------------------------------------------------------------
# Matching


def _go_glob(pattern: str) -> re.Pattern[str] | None:
    """Go's `filepath.Match` pattern as a regex; None for a malformed pattern."""
    out: list[str] = []
    i, n = 0, len(pattern)

    def char_at(j: int) -> tuple[str, int] | None:
        # One class character (escapes allowed); `-` and `]` need an escape here.
        if j >= n or pattern[j] in "-]":
            return None
        if pattern[j] == "\\":
            return (pattern[j + 1], j + 2) if j + 1 < n else None
        return pattern[j], j + 1

    while i < n:
        c = pattern[i]
        if c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "\\":
            if i + 1 >= n:
                return None
            out.append(re.escape(pattern[i + 1]))
            i += 2
        elif c == "[":
            j = i + 1
            negate = j < n and pattern[j] == "^"
            if negate:
                j += 1
            ranges: list[str] = []
            while True:
                if j < n and pattern[j] == "]" and ranges:
                    j += 1
                    break
                lo = char_at(j)
                if lo is None:
                    return None
                lo_c, j = lo
                if j < n and pattern[j] == "-":
                    hi = char_at(j + 1)
                    if hi is None:
                        return None
                    hi_c, j = hi
                    if hi_c < lo_c:
                        return None
                    ranges.append(f"{re.escape(lo_c)}-{re.escape(hi_c)}")
                else:
                    ranges.append(re.escape(lo_c))
            out.append("[" + ("^" if negate else "") + "".join(ranges) + "]")
            i = j
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out), re.DOTALL)


def _split_host_port(hostport: str) -> tuple[str, str]:
    """Go's `net.SplitHostPort`, falling back to (whole, "") where Go reports an error."""
    if hostport.startswith("["):
        end = hostport.find("]")
        if end > 0 and hostport[end + 1 : end + 2] == ":":
            return hostport[1:end], hostport[end + 2 :]
        return hostport, ""
    if hostport.count(":") == 1:
        host, _, port = hostport.partition(":")
        return host, port
    return hostport, ""


@dataclass(frozen=True, slots=True)
class _Url:
    parts: tuple[str, ...]
    port: str
    path: str


def _parse_schemeless(text: str) -> _Url:
    for prefix in ("https://", "http://"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
            break
    text = re.split(r"[?#]", text, maxsplit=1)[0]
    authority, slash, path = text.partition("/")
    authority = authority.rpartition("@")[2]
    host, port = _split_host_port(authority)
    return _Url(tuple(host.split(".")), port, slash + path)


def match_image(pattern: str, image: str) -> bool:
    """Whether the `matchImages` glob or auth key `pattern` matches `image`, as kubelet decides.

    `*.dkr.ecr.*.amazonaws.com` matches `123.dkr.ecr.us-east-1.amazonaws.com/app` but not
    `a.b.dkr.ecr.us-east-1.amazonaws.com/app` (one `*` is one host part); `registry.io:8080/p`
    matches `registry.io:8080/p/app` only (the port must match, the path is a prefix).
    A malformed glob matches nothing.
    """
    glob = _parse_schemeless(pattern)
    target = _parse_schemeless(image)
    if glob.port != target.port or len(glob.parts) != len(target.parts):
        return False
    if not target.path.startswith(glob.path):
        return False
    for glob_part, target_part in zip(glob.parts, target.parts, strict=True):
        regex = _go_glob(glob_part)
        if regex is None or regex.fullmatch(target_part) is None:
            return False
    return True


def _auth_key(key: str) -> str:
    """An `auth` key as kubelet indexes it: no scheme, a `/v1/` or `/v2/` path prefix dropped."""
    text = key
    for prefix in ("https://", "http://"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
            break
    text = re.split(r"[?#]", text, maxsplit=1)[0]
    host, slash, path = text.partition("/")
    path = slash + path
    if path.startswith(("/v1/", "/v2/")):
        path = path[3:]
    return host if path in ("", "/") else host + path


_DOCKER_HUB_KEY = "index.docker.io"


def _is_docker_hub(image: str) -> bool:
    first, slash, _ = image.partition("/")
    if not first:
        return False
    if not slash or first in ("docker.io", _DOCKER_HUB_KEY):
        return True
    return not any(c in first for c in ".:")


def repository_of(image: str) -> str:
    """`host[:port]/repo[:tag][@digest]` without its tag and digest (what a plugin is asked)."""
    name = image.partition("@")[0]
    head, slash, last = name.rpartition("/")
    if slash and ":" in last:
        last = last.partition(":")[0]
    return f"{head}{slash}{last}"


# ---------------------------------------------------------------------------------------------
# The configuration file


@dataclass(frozen=True, slots=True)
class PluginSpec:
    """One entry of `providers`: a plugin binary and the images it serves."""

    name: str
    match_images: tuple[str, ...]
    default_cache_duration_sec: float
    api_version: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()

    def matches(self, image: str) -> bool:
        return any(match_image(glob, image) for glob in self.match_images)

    def __repr__(self) -> str:
        # env values may be secrets
        names = [k for k, _ in self.env]
        return (
            f"PluginSpec(name={self.name!r}, match_images={self.match_images!r}, "
            f"default_cache_duration_sec={self.default_cache_duration_sec!r}, env={names!r})"
        )


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """A parsed `CredentialProviderConfig`; `providers` in file order (earlier ones win)."""

    source: str
    providers: tuple[PluginSpec, ...]


def _config_error(source: str, where: str, problem: str) -> CredentialsError:
    return CredentialsError(f"credential provider config {source}: {where}: {problem}")


def _string(source: str, where: str, value: object, *, empty_ok: bool = False) -> str:
    if not isinstance(value, str) or (not value and not empty_ok):
        raise _config_error(source, where, "must be a non-empty string")
    return value


def _string_list(source: str, where: str, value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _config_error(source, where, "must be a list of strings")
    return tuple(value)


def _parse_provider(source: str, i: int, doc: object) -> PluginSpec:
    at = f"providers[{i}]"
    if not isinstance(doc, Mapping):
        raise _config_error(source, at, "must be a mapping")
    for key in doc:
        if key not in _PROVIDER_FIELDS:
            raise _config_error(source, f"{at}.{key}", "unknown field")
    if "tokenAttributes" in doc:
        raise _config_error(
            source, f"{at}.tokenAttributes", "service-account tokens are not supported"
        )
    name = _string(source, f"{at}.name", doc.get("name"))
    if "/" in name or name in (".", "..") or any(c.isspace() for c in name):
        raise _config_error(source, f"{at}.name", "must be a file name in bin_dir")
    match_images = _string_list(source, f"{at}.matchImages", doc.get("matchImages"))
    if not match_images:
        raise _config_error(source, f"{at}.matchImages", "must list at least one image glob")
    for j, glob in enumerate(match_images):
        url = _parse_schemeless(glob)
        if not glob or any(not part or _go_glob(part) is None for part in url.parts):
            raise _config_error(source, f"{at}.matchImages[{j}]", "is not a valid image glob")
    raw_duration = doc.get("defaultCacheDuration")
    duration_text = _string(source, f"{at}.defaultCacheDuration", raw_duration)
    try:
        duration = parse_go_duration(duration_text)
    except ValueError:
        raise _config_error(
            source, f"{at}.defaultCacheDuration", "must be a duration like 12h0m0s"
        ) from None
    if duration < 0:
        raise _config_error(source, f"{at}.defaultCacheDuration", "must not be negative")
    api_version = _string(source, f"{at}.apiVersion", doc.get("apiVersion"))
    if api_version not in PLUGIN_API_VERSIONS:
        raise _config_error(
            source,
            f"{at}.apiVersion",
            f"must be one of {', '.join(sorted(PLUGIN_API_VERSIONS))}",
        )
    args = _string_list(source, f"{at}.args", doc.get("args"))
    env_doc = doc.get("env")
    env: list[tuple[str, str]] = []
    if env_doc is not None:
        if not isinstance(env_doc, list):
            raise _config_error(source, f"{at}.env", "must be a list of {name, value}")
        for j, item in enumerate(env_doc):
            if not isinstance(item, Mapping):
                raise _config_error(source, f"{at}.env[{j}]", "must be a mapping {name, value}")
            env_name = _string(source, f"{at}.env[{j}].name", item.get("name"))
            env_value = _string(
                source, f"{at}.env[{j}].value", item.get("value", ""), empty_ok=True
            )
            env.append((env_name, env_value))
    return PluginSpec(name, match_images, duration, api_version, args, tuple(env))


def parse_provider_config(text: str, source: str = "<config>") -> ProviderConfig:
    """A `CredentialProviderConfig` from YAML or JSON text; `source` names it in errors.

    Raises CredentialsError, one line naming `source` and the field, on any problem.
    """
    try:
        doc: Any = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "document"
        raise _config_error(source, where, "not valid YAML or JSON") from e
    if not isinstance(doc, Mapping):
        raise _config_error(source, "document", "must be a mapping")
    api_version = doc.get("apiVersion")
    if api_version not in CONFIG_API_VERSIONS:
        raise _config_error(
            source, "apiVersion", f"must be one of {', '.join(sorted(CONFIG_API_VERSIONS))}"
        )
    if doc.get("kind") != "CredentialProviderConfig":
        raise _config_error(source, "kind", "must be CredentialProviderConfig")
    providers_doc = doc.get("providers")
    if not isinstance(providers_doc, list) or not providers_doc:
        raise _config_error(source, "providers", "must list at least one provider")
    providers = tuple(_parse_provider(source, i, p) for i, p in enumerate(providers_doc))
    seen: set[str] = set()
    for i, spec in enumerate(providers):
        if spec.name in seen:
            raise _config_error(source, f"providers[{i}].name", f"duplicate name {spec.name!r}")
        seen.add(spec.name)
    return ProviderConfig(source, providers)


def load_provider_config(path: str | os.PathLike[str]) -> ProviderConfig:
    """`parse_provider_config` of the file at `path`; an unreadable file is a CredentialsError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise CredentialsError(f"cannot read credential provider config {path}: {reason}") from e
    return parse_provider_config(text, str(path))


# ---------------------------------------------------------------------------------------------
# The keychain


@dataclass(frozen=True, slots=True)
class _Answer:
    """One plugin answer: auth entries most specific first, and when it runs out."""

    auth: tuple[tuple[str, Credentials], ...]
    expires_at: float
    refresh_at: float

    def pick(self, image: str) -> Credentials | None:
        for key, creds in self.auth:
            if match_image(key, image):
                return creds
        # as kubelet: Docker Hub's `https://index.docker.io/v1/` entry serves Docker Hub images
        if _is_docker_hub(image):
            return next((c for k, c in self.auth if k == _DOCKER_HUB_KEY), None)
        return None


class ProviderKeychain:
    """Credentials for images from kubelet credential-provider plugins.

    `credentials(image)` runs the first plugin whose `matchImages` match (at most one run per
    plugin and image at a time: concurrent callers share it) unless a cached answer covers the
    image; answers are cached by the plugin's `cacheKeyType` for its `cacheDuration`. Times are
    read from trio's clock (seconds).
    """

    def __init__(
        self,
        config: ProviderConfig,
        bin_dir: str | os.PathLike[str],
        *,
        timeout_sec: float = PLUGIN_TIMEOUT_SEC,
    ) -> None:
        self.config = config
        self.bin_dir = Path(bin_dir)
        self.timeout_sec = timeout_sec
        # (plugin name, cache key type, key) → answer
        self._cache: dict[tuple[str, str, str], _Answer] = {}
        self._flight: SingleFlight[tuple[str, str], _Answer] = SingleFlight()

    def __repr__(self) -> str:
        names = [p.name for p in self.config.providers]
        return (
            f"<ProviderKeychain providers={names!r} bin_dir={str(self.bin_dir)!r} "
            f"cached={len(self._cache)} running={len(self._flight)}>"
        )

    def plugin_for(self, image: str) -> PluginSpec | None:
        """The first configured plugin whose `matchImages` match `image`, or None."""
        repo = repository_of(image)
        return next((p for p in self.config.providers if p.matches(repo)), None)

    @staticmethod
    def _keys(plugin: PluginSpec, repo: str) -> tuple[tuple[str, str, str], ...]:
        # kubelet's lookup order: the image, its registry, then the plugin's global entry.
        return (
            (plugin.name, "Image", repo),
            (plugin.name, "Registry", repo.partition("/")[0]),
            (plugin.name, "Global", ""),
        )

    def _cached(self, plugin: PluginSpec, repo: str, now: float) -> _Answer | None:
        for key in self._keys(plugin, repo):
            answer = self._cache.get(key)
            if answer is None:
                continue
            if now < answer.expires_at:
                return answer
            del self._cache[key]
        return None

    async def credentials(self, image: str) -> Credentials | None:
        """Credentials for `image` (`host[:port]/repo[:tag|@digest]`, fully qualified).

        None when no plugin serves the image or the serving plugin's answer has no auth entry
        matching it. Raises CredentialsError (one line, no secrets) when the plugin cannot be
        run, fails, times out or answers malformed JSON — unless a cached answer that has not
        run out yet covers the image, which is then used (the failure is logged).
        """
        repo = repository_of(image)
        plugin = self.plugin_for(repo)
        if plugin is None:
            return None
        cached = self._cached(plugin, repo, trio.current_time())
        if cached is not None and trio.current_time() < cached.refresh_at:
            return cached.pick(repo)
        try:
            answer = await self._flight.do(
                (plugin.name, repo), lambda: self._run_and_store(plugin, repo)
            )
        except CredentialsError as e:
            if cached is not None and trio.current_time() < cached.expires_at:
                log.warning(
                    "credential provider refresh failed; keeping the cached answer",
                    extra={"provider": plugin.name, "image": repo, "error": str(e)},
                )
                return cached.pick(repo)
            raise
        return answer.pick(repo)

    def invalidate(self, image: str) -> None:
        """Forget every cached answer that could serve `image` (say, after a 401).

        The next `credentials` call for it runs the plugin again.
        """
        repo = repository_of(image)
        plugin = self.plugin_for(repo)
        if plugin is None:
            return
        for key in self._keys(plugin, repo):
            self._cache.pop(key, None)

    async def _run_and_store(self, plugin: PluginSpec, repo: str) -> _Answer:
        cache_key_type, duration, auth = await self._run(plugin, repo)
        now = trio.current_time()
        margin = min(duration * REFRESH_FRACTION, REFRESH_MAX_SEC)
        answer = _Answer(auth, now + duration, now + duration - margin)
        if duration > 0:
            key = {
                "Image": (plugin.name, "Image", repo),
                "Registry": (plugin.name, "Registry", repo.partition("/")[0]),
                "Global": (plugin.name, "Global", ""),
            }[cache_key_type]
            # answers nobody asked for again would stay forever: drop the ones run out
            for stale in [k for k, a in self._cache.items() if now >= a.expires_at]:
                del self._cache[stale]
            self._cache[key] = answer
        log.debug(
            "credential provider answered",
            extra={
                "provider": plugin.name,
                "image": repo,
                "cache_key_type": cache_key_type,
                "cache_duration_sec": duration,
                "auth_keys": len(auth),
            },
        )
        return answer

    def _fail(
        self, plugin: PluginSpec, repo: str, problem: str, stderr_bytes: int
    ) -> CredentialsError:
        message = f"credential provider {plugin.name} for {repo}: {problem}"
        # stderr may hold secrets: only its length is logged
        log.warning(
            "credential provider failed",
            extra={
                "provider": plugin.name,
                "image": repo,
                "error": problem,
                "stderr_bytes": stderr_bytes,
            },
        )
        return CredentialsError(message)

    async def _run(
        self, plugin: PluginSpec, repo: str
    ) -> tuple[str, float, tuple[tuple[str, Credentials], ...]]:
        request = json.dumps(
            {"apiVersion": plugin.api_version, "kind": "CredentialProviderRequest", "image": repo}
        ).encode()
        program = self.bin_dir / plugin.name
        env = {k: os.environ[k] for k in _INHERITED_ENV if k in os.environ}
        env.setdefault("PATH", _DEFAULT_PATH)
        env.update(plugin.env)
        proc = None
        with trio.move_on_after(self.timeout_sec):
            try:
                proc = await trio.run_process(
                    [os.fspath(program), *plugin.args],
                    stdin=request,
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                    env=env,
                    deliver_cancel=_kill,
                )
            except OSError as e:
                raise self._fail(plugin, repo, f"cannot run {program}: {e.strerror or e}", 0) from e
        if proc is None:
            raise self._fail(plugin, repo, f"timed out after {self.timeout_sec:g} s", 0)
        stderr_bytes = len(proc.stderr or b"")
        if proc.returncode != 0:
            raise self._fail(
                plugin,
                repo,
                f"exited with status {proc.returncode} (stderr: {stderr_bytes} bytes)",
                stderr_bytes,
            )
        try:
            return self._parse_response(plugin, proc.stdout or b"")
        except ValueError as e:
            # the messages of _parse_response never quote the plugin's output
            raise self._fail(plugin, repo, str(e), stderr_bytes) from None

    @staticmethod
    def _parse_response(
        plugin: PluginSpec, stdout: bytes
    ) -> tuple[str, float, tuple[tuple[str, Credentials], ...]]:
        try:
            doc = json.loads(stdout)
        except (ValueError, UnicodeDecodeError):
            raise ValueError(f"printed malformed JSON ({len(stdout)} bytes)") from None
        if not isinstance(doc, dict):
            raise ValueError("printed JSON that is not an object")
        if doc.get("kind") != "CredentialProviderResponse":
            raise ValueError("printed no CredentialProviderResponse")
        if doc.get("apiVersion") != plugin.api_version:
            raise ValueError(f"answered in another apiVersion than {plugin.api_version}")
        cache_key_type = doc.get("cacheKeyType")
        if cache_key_type not in CACHE_KEY_TYPES:
            raise ValueError("answered an invalid cacheKeyType (want Image, Registry or Global)")
        raw_duration = doc.get("cacheDuration")
        if raw_duration is None:
            duration = plugin.default_cache_duration_sec
        else:
            if not isinstance(raw_duration, str):
                raise ValueError("answered a cacheDuration that is not a duration string")
            try:
                duration = parse_go_duration(raw_duration)
            except ValueError:
                raise ValueError("answered a cacheDuration that is not a duration") from None
            if duration < 0:
                raise ValueError("answered a negative cacheDuration")
        auth_doc = doc.get("auth") or {}
        if not isinstance(auth_doc, dict):
            raise ValueError("answered an auth that is not an object")
        entries: list[tuple[str, Credentials]] = []
        for key, value in auth_doc.items():
            if not isinstance(value, dict):
                raise ValueError("answered an auth entry that is not an object")
            username = value.get("username", "")
            password = value.get("password", "")
            if not isinstance(username, str) or not isinstance(password, str):
                raise ValueError(
                    "answered an auth entry whose username or password is not a string"
                )
            entries.append((_auth_key(key), Credentials(username, password)))
        # kubelet tries keys in reverse order: longer paths and exact hosts before wildcards
        entries.sort(key=lambda e: e[0], reverse=True)
        return str(cache_key_type), duration, tuple(entries)


async def _kill(process: trio.Process) -> None:
    # as kubelet: a plugin past its timeout is killed, not asked to stop
    process.kill()


def load_keychain(config: CredentialProvidersConfig) -> ProviderKeychain | None:
    """The keychain the `[credential_providers]` table describes; None when `config` is empty.

    Raises CredentialsError (one line) for an unreadable or invalid provider config, or a
    missing `bin_dir`.
    """
    if not config.config:
        return None
    if not config.bin_dir:
        raise CredentialsError(
            f"[credential_providers] bin_dir must be set when config is ({config.config})"
        )
    return ProviderKeychain(load_provider_config(config.config), config.bin_dir)
