"""Registry credentials: the provider protocol, explicit credentials and docker `config.json`.

Lookup is per endpoint host (a mirror gets the mirror's credentials). Docker Hub's hosts
(`docker.io`, `index.docker.io`, `registry-1.docker.io`) are looked up under
`https://index.docker.io/v1/`, as the docker CLI stores them.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from index.oci.errors import CredentialsError

DOCKER_HUB_CONFIG_KEY = "https://index.docker.io/v1/"
_DOCKER_HUB_HOSTS = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
HELPER_TIMEOUT_SEC = 30.0
_TOKEN_USERNAME = "<token>"


@dataclass(frozen=True, slots=True)
class Credentials:
    """A username and secret, or an identity (refresh) token with an empty username, or a
    pre-issued bearer `registry_token` (CRI's `AuthConfig.registry_token`) sent as is."""

    username: str = ""
    secret: str = ""
    identity_token: str = ""
    registry_token: str = ""

    def __repr__(self) -> str:
        # Never show secrets in logs or test output.
        return (
            f"Credentials(username={self.username!r}, secret=***, "
            f"identity_token={'***' if self.identity_token else ''!r}, "
            f"registry_token={'***' if self.registry_token else ''!r})"
        )

    @property
    def empty(self) -> bool:
        return not (self.username or self.secret or self.identity_token or self.registry_token)


class CredentialProvider(Protocol):
    """A source of credentials for a registry endpoint host (`host[:port]`).

    Returns None when it has none for that host. Raises CredentialsError when the source
    itself fails (unreadable file, failing helper).
    """

    def credentials(self, host: str) -> Credentials | None: ...


@runtime_checkable
class RepositoryCredentialProvider(CredentialProvider, Protocol):
    """A `CredentialProvider` that can also answer per repository, asynchronously (the
    daemon's keychain: credentials captured for one image, credential-provider plugins).
    The registry client asks `for_repository` when it knows the repository of a request."""

    async def for_repository(self, host: str, repository: str) -> Credentials | None: ...

    def invalidate(self, host: str, repository: str) -> None:
        """The registry refused what `for_repository` gave: obtain fresh ones next time."""
        ...


class StaticCredentials:
    """Fixed credentials (`--user USER:PASS`), for the listed hosts or, with None, for any."""

    def __init__(self, username: str, secret: str, hosts: Sequence[str] | None = None) -> None:
        self._creds = Credentials(username, secret)
        self._hosts = None if hosts is None else frozenset(hosts)

    @classmethod
    def parse(cls, user: str, hosts: Sequence[str] | None = None) -> StaticCredentials:
        """From `USER[:PASS]` (an empty password when there is no `:`)."""
        name, _, secret = user.partition(":")
        return cls(name, secret, hosts)

    def credentials(self, host: str) -> Credentials | None:
        if self._hosts is None or host in self._hosts:
            return self._creds
        return None

    def __repr__(self) -> str:
        return f"StaticCredentials(username={self._creds.username!r}, hosts={self._hosts})"


class ChainedCredentials:
    """Tries providers in order; the first non-empty answer wins."""

    def __init__(self, *providers: CredentialProvider) -> None:
        self.providers = providers

    def credentials(self, host: str) -> Credentials | None:
        for provider in self.providers:
            creds = provider.credentials(host)
            if creds is not None and not creds.empty:
                return creds
        return None


def docker_config_dir() -> Path:
    """`$DOCKER_CONFIG`, else `~/.docker`."""
    env = os.environ.get("DOCKER_CONFIG")
    return Path(env) if env else Path.home() / ".docker"


def config_key(host: str) -> str:
    """The key docker uses for `host` in `auths`/`credHelpers`."""
    return DOCKER_HUB_CONFIG_KEY if host in _DOCKER_HUB_HOSTS else host


def _hostname_of_key(key: str) -> str:
    """`https://host:5000/v1/` → `host:5000` (docker's ConvertToHostname)."""
    for prefix in ("http://", "https://"):
        if key.startswith(prefix):
            key = key[len(prefix) :]
            break
    return key.split("/", 1)[0]


class DockerConfig:
    """Credentials from a docker `config.json`, re-read on every lookup.

    `path` defaults to `docker_config_dir()/config.json`; a missing file means no credentials.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else docker_config_dir() / "config.json"

    def __repr__(self) -> str:
        return f"DockerConfig(path={str(self.path)!r})"

    def _load(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise CredentialsError(f"cannot read docker config {self.path}: {e}") from e
        if not isinstance(doc, dict):
            raise CredentialsError(f"docker config {self.path} is not a JSON object")
        return doc

    def credentials(self, host: str) -> Credentials | None:
        """Credentials for `host`: `credHelpers[host]`, then `auths`, then `credsStore`.

        Raises CredentialsError on a malformed file or a failing helper.
        """
        doc = self._load()
        key = config_key(host)
        helpers = doc.get("credHelpers") or {}
        if isinstance(helpers, Mapping):
            helper = helpers.get(key) or helpers.get(host)
            if isinstance(helper, str) and helper:
                return run_credential_helper(helper, key)
        auths = doc.get("auths") or {}
        if isinstance(auths, Mapping):
            entry = auths.get(key)
            if entry is None:
                wanted = _hostname_of_key(key)
                entry = next((v for k, v in auths.items() if _hostname_of_key(k) == wanted), None)
            if isinstance(entry, Mapping):
                creds = self._decode_entry(entry, key)
                if not creds.empty:
                    return creds
        store = doc.get("credsStore")
        if isinstance(store, str) and store:
            return run_credential_helper(store, key)
        return None

    def _decode_entry(self, entry: Mapping[str, Any], key: str) -> Credentials:
        username = str(entry.get("username", "") or "")
        password = str(entry.get("password", "") or "")
        raw = entry.get("auth")
        if raw:
            try:
                decoded = base64.b64decode(str(raw), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError) as e:
                raise CredentialsError(
                    f"docker config {self.path}: bad base64 auth for {key}"
                ) from e
            username, sep, password = decoded.partition(":")
            if not sep:
                raise CredentialsError(
                    f"docker config {self.path}: auth for {key} is not user:password"
                )
        token = str(entry.get("identitytoken", "") or "")
        if token:
            return Credentials(username="", secret="", identity_token=token)
        return Credentials(username, password)


def run_credential_helper(name: str, server: str) -> Credentials | None:
    """Run `docker-credential-<name> get` with `server` on stdin.

    Returns None when the helper has no credentials for `server`. Raises CredentialsError when
    the helper is missing, times out, fails otherwise, or prints malformed JSON.
    """
    program = f"docker-credential-{name}"
    try:
        proc = subprocess.run(
            [program, "get"],
            input=server.encode(),
            capture_output=True,
            timeout=HELPER_TIMEOUT_SEC,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CredentialsError(f"credential helper {program} for {server} failed: {e}") from e
    if proc.returncode != 0:
        message = (proc.stdout + proc.stderr).decode(errors="replace").strip()
        if "credentials not found" in message.lower():
            return None
        raise CredentialsError(
            f"credential helper {program} for {server} exited {proc.returncode}: {message}"
        )
    try:
        doc = json.loads(proc.stdout)
        username = str(doc.get("Username", ""))
        secret = str(doc.get("Secret", ""))
    except (ValueError, AttributeError) as e:
        raise CredentialsError(f"credential helper {program} for {server} printed bad JSON") from e
    if username == _TOKEN_USERNAME:
        return Credentials(identity_token=secret)
    return Credentials(username, secret)
