"""The daemon's keychain and the authenticator asking it per repository.

Order (captured for the repository → credential-provider plugins → docker config →
anonymous), Docker Hub's API host mapped to `docker.io`, a mirror's host never getting the
registry's credentials, a failing provider falling back, and the authenticator: it asks per
repository when the request names one, and a 401 makes the providers obtain fresh ones.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from index.oci.auth import Authenticator, TokenRequest
from index.oci.dockerconfig import Credentials, StaticCredentials
from index.oci.errors import CredentialsError
from snapshotter.credentials.captured import CapturedCredentials
from snapshotter.credentials.keychain import Keychain


class FakeProviders:
    """A `ProviderKeychain` stand-in: answers per image, records asks and invalidations."""

    def __init__(self, answers: dict[str, Credentials], *, fail: bool = False) -> None:
        self.answers = answers
        self.fail = fail
        self.asked: list[str] = []
        self.invalidated: list[str] = []

    async def credentials(self, image: str) -> Credentials | None:
        self.asked.append(image)
        if self.fail:
            raise CredentialsError("provider ecr failed: exit status 1")
        return self.answers.get(image)

    def invalidate(self, image: str) -> None:
        self.invalidated.append(image)


def captured_store(tmp_path: Path) -> CapturedCredentials:
    store = CapturedCredentials(tmp_path / "credentials" / "cri.json")
    store.capture("docker.io/team/private:v1", username="kube", password="from-kubelet")
    store.capture("reg.test:5000/app/api:v2", username="kube", password="api-pass")
    return store


async def test_order_captured_then_providers_then_docker(tmp_path: Path) -> None:
    providers = FakeProviders({"reg.test:5000/app/web": Credentials("aws", "ecr-token")})
    docker = StaticCredentials("docker", "from-config", hosts=["reg.test:5000"])
    chain = Keychain(captured=captured_store(tmp_path), providers=providers, docker=docker)
    got = await chain.for_repository("reg.test:5000", "app/api")
    assert got == Credentials("kube", "api-pass")
    assert providers.asked == []  # captured answered first
    assert await chain.for_repository("reg.test:5000", "app/web") == Credentials("aws", "ecr-token")
    assert await chain.for_repository("reg.test:5000", "app/other") == Credentials(
        "docker", "from-config"
    )
    assert await chain.for_repository("elsewhere.test", "app/other") is None
    assert "from-kubelet" not in repr(chain) and "api-pass" not in repr(chain)


async def test_docker_hub_api_host_is_docker_io_and_mirrors_get_nothing(tmp_path: Path) -> None:
    chain = Keychain(captured=captured_store(tmp_path))
    got = await chain.for_repository("registry-1.docker.io", "team/private")
    assert got == Credentials("kube", "from-kubelet")
    # a hosts.toml mirror of docker.io is another host: the captured secret is not for it
    assert await chain.for_repository("mirror.test:5000", "team/private") is None
    assert await chain.for_repository("10.0.0.5:8472", "team/private") is None


async def test_a_failing_provider_falls_back_to_the_docker_config(tmp_path: Path) -> None:
    providers = FakeProviders({}, fail=True)
    docker = StaticCredentials("docker", "from-config", hosts=["reg.test:5000"])
    chain = Keychain(providers=providers, docker=docker)
    assert await chain.for_repository("reg.test:5000", "app/web") == Credentials(
        "docker", "from-config"
    )
    with pytest.raises(CredentialsError, match="provider ecr failed"):
        await Keychain(providers=providers).for_repository("reg.test:5000", "app/web")


async def test_a_capture_written_by_another_instance_is_seen(tmp_path: Path) -> None:
    reader = CapturedCredentials(tmp_path / "credentials" / "cri.json")
    chain = Keychain(captured=reader)
    assert await chain.for_repository("reg.test:5000", "app/api") is None
    captured_store(tmp_path)  # the CRI proxy's instance writes the file
    assert await chain.for_repository("reg.test:5000", "app/api") == Credentials("kube", "api-pass")


async def test_the_authenticator_asks_per_repository_and_refreshes_after_a_401() -> None:
    providers = FakeProviders(
        {
            "reg.test/app/a": Credentials("aws", "token-a"),
            "reg.test/app/b": Credentials("aws", "token-b"),
        }
    )
    auth = Authenticator(Keychain(providers=providers))
    sent: list[tuple[str, str] | None] = []

    async def fetch(request: TokenRequest) -> tuple[int, bytes]:
        sent.append(request.basic)
        return 200, json.dumps({"token": f"t{len(sent)}", "expires_in": 300}).encode()

    challenge = ['Bearer realm="https://auth.test/token",service="reg.test"']
    assert auth.on_unauthorized("reg.test", challenge, ["repository:app/a:pull"])
    scopes_a: Sequence[str] = ["repository:app/a:pull"]
    assert await auth.authorization("reg.test", scopes_a, fetch) == "Bearer t1"
    assert await auth.authorization("reg.test", ["repository:app/b:pull"], fetch) == "Bearer t2"
    assert providers.asked == ["reg.test/app/a", "reg.test/app/b"]
    assert all(b is None or b[0] == "aws" for b in sent)
    # the registry refuses the token: the provider is told to run its plugin again
    auth.on_unauthorized("reg.test", challenge, scopes_a)
    assert providers.invalidated == ["reg.test/app/a"]


async def test_a_captured_registry_token_is_returned_alone(tmp_path: Path) -> None:
    store = CapturedCredentials(tmp_path / "credentials" / "cri.json")
    store.capture("reg.test/app/tok:v1", registry_token="bearer-from-kubelet")
    store.capture("reg.test/app/both:v1", username="u", password="p", registry_token="unused")
    chain = Keychain(captured=store)
    got = await chain.for_repository("reg.test", "app/tok")
    assert got == Credentials(registry_token="bearer-from-kubelet")
    assert got is not None and "bearer-from-kubelet" not in repr(got)
    # user and password win over a registry token sent with them
    assert await chain.for_repository("reg.test", "app/both") == Credentials("u", "p")

    auth = Authenticator(chain)

    async def fetch(request: TokenRequest) -> tuple[int, bytes]:
        raise AssertionError("a registry token needs no token server")

    challenge = ['Bearer realm="https://auth.test/token",service="reg.test"']
    assert auth.on_unauthorized("reg.test", challenge, ["repository:app/tok:pull"])
    got_header = await auth.authorization("reg.test", ["repository:app/tok:pull"], fetch)
    assert got_header == "Bearer bearer-from-kubelet"
