"""`Keychain`: the one source of registry credentials for every request of the daemon.

Asked per registry host and repository (`for_repository`, by the registry client's
authenticator when a request names a repository), in this order:

1. the credentials kubelet sent with `PullImage` for that repository (the CRI proxy's
   `CapturedCredentials`, shared through its root-only file): user and password, else the
   identity token, else the registry token;
2. kubelet's credential-provider plugins whose `matchImages` match `host/repository`
   (`ProviderKeychain`: cached by their own rules, refreshed before they expire);
3. the docker config (`~/.docker/config.json` and its credential helpers), per host;
4. none: anonymous.

Credentials go only to the host they were given for: the authenticator asks with the
endpoint's host, so a `hosts.toml` mirror gets only what is configured for the mirror's own
host (as containerd does), and peers never get any (their client has no keychain). Docker
Hub's API host `registry-1.docker.io` is the registry `docker.io` for 1 and 2.
"""

from __future__ import annotations

import logging

from index.oci.dockerconfig import CredentialProvider, Credentials
from index.oci.errors import CredentialsError
from index.oci.reference import DOCKER_HUB, DOCKER_HUB_API_HOST, DOCKER_HUB_LEGACY

from .captured import CapturedCredentials
from .providers import ProviderKeychain

log = logging.getLogger(__name__)

_REGISTRY_OF_HOST = {DOCKER_HUB_API_HOST: DOCKER_HUB, DOCKER_HUB_LEGACY: DOCKER_HUB}


class Keychain:
    """See the module doc. Use from the trio thread (the providers run plugins there)."""

    def __init__(
        self,
        *,
        captured: CapturedCredentials | None = None,
        providers: ProviderKeychain | None = None,
        docker: CredentialProvider | None = None,
    ) -> None:
        self._captured = captured
        self._providers = providers
        self._docker = docker

    def __repr__(self) -> str:
        parts = [
            name
            for name, part in (
                ("captured", self._captured),
                ("providers", self._providers),
                ("docker", self._docker),
            )
            if part is not None
        ]
        return f"<Keychain {'+'.join(parts) or 'anonymous'}>"

    def credentials(self, host: str) -> Credentials | None:
        """Per host only (no repository known): the docker config."""
        return self._docker.credentials(host) if self._docker is not None else None

    async def for_repository(self, host: str, repository: str) -> Credentials | None:
        """Credentials for `repository` at endpoint `host`, or None (anonymous). Raises
        CredentialsError when a provider plugin fails and nothing later answers."""
        registry = _REGISTRY_OF_HOST.get(host, host)
        if self._captured is not None:
            captured = self._captured.get(registry, repository)
            if captured is not None:
                basic = captured.basic()
                if basic is not None:
                    return Credentials(username=basic[0], secret=basic[1])
                if captured.identity_token:
                    return Credentials(identity_token=captured.identity_token)
                if captured.registry_token:
                    return Credentials(registry_token=captured.registry_token)
        failure: CredentialsError | None = None
        if self._providers is not None:
            try:
                found = await self._providers.credentials(f"{registry}/{repository}")
            except CredentialsError as e:
                failure = e
            else:
                if found is not None:
                    return found
        docker = self.credentials(host)
        if docker is None and failure is not None:
            raise failure
        return docker

    def invalidate(self, host: str, repository: str) -> None:
        """After the registry refused what we sent: the providers run their plugin again
        on the next ask (a captured credential is kept: kubelet's next pull replaces it)."""
        if self._providers is not None:
            self._providers.invalidate(f"{_REGISTRY_OF_HOST.get(host, host)}/{repository}")
