"""Registry client edge cases against a fake network (httpx.MockTransport).

Auth challenges and the token flow, redirects to blob storage, Range answers, the ECR quirk,
docker config credentials (with a real credential-helper script on PATH), referrers paging.
The happy paths against a real registry are in tests/integration/test_registry_client.py.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from index import gojson
from index.digest import Digest
from index.oci import mediatypes
from index.oci.auth import Authenticator, Challenge, parse_challenges, token_requests
from index.oci.dockerconfig import (
    ChainedCredentials,
    Credentials,
    DockerConfig,
    StaticCredentials,
    run_credential_helper,
)
from index.oci.errors import (
    CredentialsError,
    DigestMismatchError,
    NotFoundError,
    RangeNotSatisfiableError,
    TransportError,
    UnauthorizedError,
    UnexpectedResponseError,
)
from index.oci.reference import Reference
from index.oci.registry import RegistryClient, referrers_tag

REGISTRY = "reg.example"
REF = Reference.parse(f"{REGISTRY}/team/app:v1")
BLOB = bytes(range(256)) * 40
BLOB_DIGEST = Digest.of(BLOB)
TOKEN_REALM = "https://auth.example/token"

Handler = Callable[[httpx.Request], httpx.Response]


class FakeNetwork:
    """Routes requests by host to handlers, records every request."""

    def __init__(self) -> None:
        self.hosts: dict[str, Handler] = {}
        self.log: list[httpx.Request] = []
        self.counts: Counter[str] = Counter()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.log.append(request)
        self.counts[request.url.host] += 1
        return self.hosts[request.url.host](request)

    def client(self, **kwargs: object) -> RegistryClient:
        return RegistryClient(transport=httpx.MockTransport(self), **kwargs)  # type: ignore[arg-type]


def bearer_registry(valid_tokens: set[str]) -> Handler:
    def handle(request: httpx.Request) -> httpx.Response:
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in valid_tokens:
            challenge = (
                f'Bearer realm="{TOKEN_REALM}",service="svc",scope="repository:team/app:pull"'
            )
            return httpx.Response(
                401,
                headers={"WWW-Authenticate": challenge},
                json={"errors": [{"code": "UNAUTHORIZED", "message": "auth"}]},
            )
        if request.url.path.endswith(f"/blobs/{BLOB_DIGEST}"):
            return httpx.Response(200, content=BLOB)
        return httpx.Response(404, json={"errors": [{"code": "BLOB_UNKNOWN", "message": "x"}]})

    return handle


def trusting_registry(issued: list[str], valid: set[str]) -> Handler:
    """A bearer registry that accepts every token issued so far (until `valid` is cleared)."""
    inner = bearer_registry(valid)

    def handle(request: httpx.Request) -> httpx.Response:
        valid.update(issued)
        return inner(request)

    return handle


def token_server(
    tokens: list[str], log: list[httpx.Request], post_status: int = 200, expires_in: int = 300
) -> Handler:
    def handle(request: httpx.Request) -> httpx.Response:
        log.append(request)
        if request.method == "POST" and post_status != 200:
            return httpx.Response(post_status)
        token = f"tok{len(log)}"
        tokens.append(token)
        return httpx.Response(200, json={"token": token, "expires_in": expires_in})

    return handle


def test_parse_challenges() -> None:
    got = parse_challenges(
        ['Bearer realm="https://a/t",service="s",scope="repository:x:pull,push"', "Basic realm=r"]
    )
    assert got == [
        Challenge(
            "bearer", {"realm": "https://a/t", "service": "s", "scope": "repository:x:pull,push"}
        ),
        Challenge("basic", {"realm": "r"}),
    ]
    assert (
        parse_challenges(['Basic realm="a\\"b", Bearer realm="x",error="invalid_token"'])[1].params[
            "error"
        ]
        == "invalid_token"
    )
    assert parse_challenges([""]) == []


def test_token_requests_forms() -> None:
    ch = Challenge("bearer", {"realm": TOKEN_REALM, "service": "svc"})
    (anon,) = token_requests(ch, ["repository:a:pull", "repository:b:pull"], None)
    assert anon.method == "GET" and anon.params == (
        ("service", "svc"),
        ("scope", "repository:a:pull"),
        ("scope", "repository:b:pull"),
    )
    post, get = token_requests(ch, ["repository:a:pull"], Credentials("u", "p"))
    assert post.method == "POST" and ("grant_type", "password") in (post.form or ())
    assert get.basic == ("u", "p")
    (refresh,) = token_requests(ch, ["s"], Credentials(identity_token="idt"))
    assert ("refresh_token", "idt") in (refresh.form or ()) and ("grant_type", "refresh_token") in (
        refresh.form or ()
    )
    with pytest.raises(UnauthorizedError, match="without realm"):
        token_requests(Challenge("bearer", {}), [], None)


def test_anonymous_bearer_flow_caches_the_token() -> None:
    net, tokens, token_log = FakeNetwork(), [], []  # type: ignore[var-annotated]
    valid: set[str] = set()
    net.hosts["auth.example"] = token_server(tokens, token_log)
    net.hosts[REGISTRY] = trusting_registry(tokens, valid)
    with net.client() as client:
        assert client.read_blob(REF, BLOB_DIGEST) == BLOB
        assert client.read_blob(REF, BLOB_DIGEST) == BLOB
    assert len(token_log) == 1
    assert token_log[0].method == "GET"
    assert token_log[0].url.params.get_list("scope") == ["repository:team/app:pull"]
    assert token_log[0].url.params["service"] == "svc"
    assert "authorization" not in token_log[0].headers


def test_credentialed_token_flow_falls_back_from_oauth_post_to_basic_get() -> None:
    net, tokens, token_log = FakeNetwork(), [], []  # type: ignore[var-annotated]
    valid: set[str] = set()
    net.hosts["auth.example"] = token_server(tokens, token_log, post_status=404)
    net.hosts[REGISTRY] = trusting_registry(tokens, valid)
    with net.client(credentials=StaticCredentials("alice", "pw")) as client:
        assert client.read_blob(REF, BLOB_DIGEST) == BLOB
    assert [r.method for r in token_log] == ["POST", "GET"]
    form = dict(x.split("=", 1) for x in token_log[0].content.decode().split("&"))
    assert form["grant_type"] == "password" and form["username"] == "alice"
    assert (
        token_log[1].headers["authorization"] == "Basic " + base64.b64encode(b"alice:pw").decode()
    )


def test_expired_token_is_refreshed_and_revoked_token_retried() -> None:
    net, tokens, token_log = FakeNetwork(), [], []  # type: ignore[var-annotated]
    valid: set[str] = set()
    net.hosts["auth.example"] = token_server(tokens, token_log, expires_in=60)
    net.hosts[REGISTRY] = trusting_registry(tokens, valid)
    now = [1000.0]
    with net.client() as client:
        client.auth = Authenticator(None, clock=lambda: now[0])
        client.read_blob(REF, BLOB_DIGEST)
        now[0] += 30
        client.read_blob(REF, BLOB_DIGEST)
        assert len(token_log) == 1
        now[0] += 40  # past expires_in
        client.read_blob(REF, BLOB_DIGEST)
        assert len(token_log) == 2
        valid.clear()
        tokens.clear()  # the registry revokes every token: next request gets 401, then a new one
        client.read_blob(REF, BLOB_DIGEST)
        assert len(token_log) == 3


def test_rejected_credentials_raise_unauthorized() -> None:
    net = FakeNetwork()
    net.hosts["auth.example"] = lambda r: httpx.Response(200, json={"token": "never-valid"})
    net.hosts[REGISTRY] = bearer_registry(set())
    with (
        net.client(credentials=StaticCredentials("u", "p")) as client,
        pytest.raises(UnauthorizedError) as info,
    ):
        client.read_blob(REF, BLOB_DIGEST)
    assert "credentials rejected" in str(info.value) and info.value.status == 401


def test_basic_challenge_and_missing_credentials() -> None:
    seen: list[str | None] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        if request.headers.get("authorization") != "Basic " + base64.b64encode(b"u:p").decode():
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})
        return httpx.Response(200, content=BLOB)

    net = FakeNetwork()
    net.hosts[REGISTRY] = handle
    with net.client(credentials=StaticCredentials("u", "p")) as client:
        assert client.read_blob(REF, BLOB_DIGEST) == BLOB
        assert client.read_blob(REF, BLOB_DIGEST) == BLOB
    assert (
        seen[0] is None and seen[1] is not None and seen[2] is not None
    )  # basic sent up front afterwards
    with net.client() as client, pytest.raises(UnauthorizedError, match="no credentials"):
        client.read_blob(REF, BLOB_DIGEST)


def test_ecr_expired_403_is_treated_as_401() -> None:
    calls: list[str | None] = []

    def handle(request: httpx.Request) -> httpx.Response:
        calls.append(request.headers.get("authorization"))
        if request.headers.get("authorization") is None:
            return httpx.Response(
                403,
                json={
                    "errors": [
                        {
                            "code": "DENIED",
                            "message": "Your authorization token has expired. Reauthenticate and try again.",
                        }
                    ]
                },
            )
        return httpx.Response(200, content=BLOB)

    net = FakeNetwork()
    net.hosts[REGISTRY] = handle
    with net.client(credentials=StaticCredentials("AWS", "pw")) as client:
        assert client.read_blob(REF, BLOB_DIGEST) == BLOB
    assert calls == [None, "Basic " + base64.b64encode(b"AWS:pw").decode()]


def test_plain_403_is_not_retried() -> None:
    net = FakeNetwork()
    net.hosts[REGISTRY] = lambda r: httpx.Response(
        403, json={"errors": [{"code": "DENIED", "message": "no"}]}
    )
    with net.client() as client, pytest.raises(UnauthorizedError, match="DENIED"):
        client.read_blob(REF, BLOB_DIGEST)
    assert net.counts[REGISTRY] == 1


def storage_network(storage_status: Callable[[], int | None] = lambda: None) -> FakeNetwork:
    """Registry (requires Basic auth) redirects blob GETs to a storage host that rejects auth."""
    net = FakeNetwork()

    def registry(request: httpx.Request) -> httpx.Response:
        if request.headers.get("authorization") is None:
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})
        n = net.counts[REGISTRY]
        return httpx.Response(307, headers={"Location": f"https://storage.example/b?sig={n}"})

    def storage(request: httpx.Request) -> httpx.Response:
        if "authorization" in request.headers:
            return httpx.Response(400, text="only one auth mechanism allowed")
        forced = storage_status()
        if forced is not None:
            return httpx.Response(forced, text="expired")
        rng = request.headers.get("range")
        if rng is None:
            return httpx.Response(200, content=BLOB)
        start, end = (int(x) for x in rng.removeprefix("bytes=").split("-"))
        end = min(end, len(BLOB) - 1)
        return httpx.Response(
            206,
            headers={"Content-Range": f"bytes {start}-{end}/{len(BLOB)}"},
            content=BLOB[start : end + 1],
        )

    net.hosts[REGISTRY] = registry
    net.hosts["storage.example"] = storage
    return net


def test_redirect_drops_authorization_and_is_cached() -> None:
    net = storage_network()
    with net.client(credentials=StaticCredentials("u", "p")) as client:
        assert client.read_blob(REF, BLOB_DIGEST) == BLOB
        assert client.fetch_blob_range(REF, BLOB_DIGEST, 100, 50) == BLOB[100:150]
        before = net.counts[REGISTRY]
        assert client.fetch_blob_range(REF, BLOB_DIGEST, 1000, 10) == BLOB[1000:1010]
        assert net.counts[REGISTRY] == before  # went straight to the cached storage URL
        assert (
            client.fetch_blob_range(REF, BLOB_DIGEST, len(BLOB) - 5, 100) == BLOB[-5:]
        )  # clipped at the end
    storage_requests = [r for r in net.log if r.url.host == "storage.example"]
    assert storage_requests and all("authorization" not in r.headers for r in storage_requests)
    assert all(
        r.headers["accept-encoding"] == "identity" for r in storage_requests if "range" in r.headers
    )


def test_expired_storage_url_is_re_resolved_once() -> None:
    expired = [False]
    net = storage_network(lambda: 403 if expired[0] else None)
    with net.client(credentials=StaticCredentials("u", "p")) as client:
        assert client.fetch_blob_range(REF, BLOB_DIGEST, 0, 10) == BLOB[:10]
        registry_before = net.counts[REGISTRY]
        expired[0] = True
        # Every storage URL now answers 403: one re-resolution through the registry, then failure.
        with pytest.raises(UnauthorizedError):
            client.fetch_blob_range(REF, BLOB_DIGEST, 0, 10)
        assert net.counts[REGISTRY] == registry_before + 1
        expired[0] = False
        assert client.fetch_blob_range(REF, BLOB_DIGEST, 20, 10) == BLOB[20:30]


def simple_registry(answer: Callable[[httpx.Request], httpx.Response]) -> FakeNetwork:
    net = FakeNetwork()
    net.hosts[REGISTRY] = answer
    return net


def test_200_instead_of_206_is_sliced() -> None:
    net = simple_registry(lambda r: httpx.Response(200, content=BLOB))
    with net.client() as client:
        assert client.fetch_blob_range(REF, BLOB_DIGEST, 300, 700) == BLOB[300:1000]
        assert client.fetch_blob_range(REF, BLOB_DIGEST, len(BLOB) - 3, 10) == BLOB[-3:]
    assert net.log[0].headers["range"] == "bytes=300-999"


def test_416_and_wrong_content_range() -> None:
    net = simple_registry(
        lambda r: httpx.Response(416, headers={"Content-Range": f"bytes */{len(BLOB)}"})
    )
    with net.client() as client, pytest.raises(RangeNotSatisfiableError, match="416"):
        client.fetch_blob_range(REF, BLOB_DIGEST, 10**9, 10)
    net = simple_registry(
        lambda r: httpx.Response(
            206, headers={"Content-Range": "bytes 0-9/100"}, content=b"0123456789"
        )
    )
    with net.client() as client, pytest.raises(RangeNotSatisfiableError, match="asked 5-14"):
        client.fetch_blob_range(REF, BLOB_DIGEST, 5, 10)
    with pytest.raises(ValueError):
        net.client().fetch_blob_range(REF, BLOB_DIGEST, 0, 0)


def test_digest_mismatch_and_not_found() -> None:
    net = simple_registry(lambda r: httpx.Response(200, content=b"tampered"))
    with net.client() as client:
        with pytest.raises(DigestMismatchError, match=BLOB_DIGEST):
            client.read_blob(REF, BLOB_DIGEST)
        with pytest.raises(DigestMismatchError):
            client.get_manifest(REF, BLOB_DIGEST)
    net = simple_registry(
        lambda r: httpx.Response(
            404, json={"errors": [{"code": "MANIFEST_UNKNOWN", "message": "gone"}]}
        )
    )
    with net.client() as client, pytest.raises(NotFoundError, match="MANIFEST_UNKNOWN") as info:
        client.get_manifest(REF)
    assert info.value.status == 404 and "team/app" in info.value.url


def test_transport_errors_are_translated_and_chained() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with (
        simple_registry(refuse).client() as client,
        pytest.raises(TransportError, match="connection refused") as info,
    ):
        client.resolve(REF)
    assert isinstance(info.value.__cause__, httpx.ConnectError)


def test_resolve_head_then_get_fallback() -> None:
    manifest = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}'

    def handle(request: httpx.Request) -> httpx.Response:
        assert "application/vnd.oci.image.index.v1+json" in request.headers["accept"]
        if request.method == "HEAD":
            return httpx.Response(
                200, headers={"Content-Type": mediatypes.OCI_MANIFEST}
            )  # no digest
        return httpx.Response(
            200, headers={"Content-Type": mediatypes.OCI_MANIFEST}, content=manifest
        )

    with simple_registry(handle).client() as client:
        desc = client.resolve(REF)
    assert desc.digest == Digest.of(manifest) and desc.size == len(manifest)
    assert desc.media_type == mediatypes.OCI_MANIFEST


def test_manifest_size_limit() -> None:
    with (
        simple_registry(
            lambda r: httpx.Response(200, content=b"x" * (5 * 1024 * 1024))
        ).client() as client,
        pytest.raises(UnexpectedResponseError, match="larger"),
    ):
        client.get_manifest(REF)


def test_referrers_paging_client_filter_and_tag_fallback() -> None:
    subject = Digest.of(b"subject")
    d1 = Descriptor_json(b"a", mediatypes.SOCI_INDEX_V1)
    d2 = Descriptor_json(b"b", "other/type")
    d3 = Descriptor_json(b"c", mediatypes.SOCI_INDEX_V1)

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.params.get("page") == "2":
            return httpx.Response(200, json={"schemaVersion": 2, "manifests": [d3]})
        assert request.url.params["artifactType"] == mediatypes.SOCI_INDEX_V1
        return httpx.Response(
            200,
            headers={"Link": f'</v2/team/app/referrers/{subject}?page=2>; rel="next"'},
            json={"schemaVersion": 2, "manifests": [d1, d2]},
        )

    with simple_registry(handle).client() as client:
        got = client.referrers(REF, subject, mediatypes.SOCI_INDEX_V1)
    assert [d.digest for d in got] == [d1["digest"], d3["digest"]]

    tag_index = gojson.marshal(
        {"schemaVersion": 2, "mediaType": mediatypes.OCI_INDEX, "manifests": [d1, d2]}
    )

    def fallback(request: httpx.Request) -> httpx.Response:
        if "/referrers/" in request.url.path:
            return httpx.Response(404)
        assert request.url.path.endswith(f"/manifests/{referrers_tag(subject)}")
        return httpx.Response(
            200, headers={"Content-Type": mediatypes.OCI_INDEX}, content=tag_index
        )

    with simple_registry(fallback).client() as client:
        assert [d.digest for d in client.referrers(REF, subject, "other/type")] == [d2["digest"]]
        assert len(client.referrers(REF, subject)) == 2
        pinned = REF.with_digest(
            Digest.of(b"the image")
        )  # a pinned ref must not confuse the tag read
        assert len(client.referrers(pinned, subject)) == 2
    with simple_registry(lambda r: httpx.Response(404)).client() as client:
        assert client.referrers(REF, subject) == []


def Descriptor_json(content: bytes, artifact_type: str) -> dict[str, object]:
    return {
        "mediaType": mediatypes.OCI_MANIFEST,
        "digest": Digest.of(content),
        "size": len(content),
        "artifactType": artifact_type,
    }


def test_mirror_gets_ns_param_and_upstream_is_the_fallback(tmp_path: Path) -> None:
    d = tmp_path / REGISTRY
    d.mkdir()
    (d / "hosts.toml").write_text(
        '[host."https://mirror.example"]\ncapabilities = ["pull", "resolve"]\n'
    )
    net = FakeNetwork()
    net.hosts["mirror.example"] = lambda r: httpx.Response(503)
    net.hosts[REGISTRY] = lambda r: httpx.Response(200, content=BLOB)
    with net.client(hosts_dirs=[tmp_path]) as client:
        assert client.read_blob(REF, BLOB_DIGEST) == BLOB
    assert [r.url.host for r in net.log] == ["mirror.example", REGISTRY]
    assert net.log[0].url.params["ns"] == REGISTRY
    assert "ns" not in net.log[1].url.params


# -- credentials -----------------------------------------------------------------------------


def write_helper(bin_dir: Path, name: str, script: str) -> None:
    path = bin_dir / f"docker-credential-{name}"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def docker_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "dockercfg"))
    (tmp_path / "dockercfg").mkdir()
    write_helper(
        bin_dir,
        "fake",
        'read server\ncase "$server" in\n'
        '  helped.example) echo \'{"ServerURL":"helped.example","Username":"hu","Secret":"hs"}\' ;;\n'
        '  token.example) echo \'{"ServerURL":"token.example","Username":"<token>","Secret":"idt"}\' ;;\n'
        '  broken.example) echo "boom" >&2; exit 3 ;;\n'
        '  *) echo "credentials not found in native keychain"; exit 1 ;;\nesac\n',
    )
    return tmp_path / "dockercfg" / "config.json"


def test_docker_config_sources(docker_env: Path) -> None:
    docker_env.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {
                        "auth": base64.b64encode(b"hubuser:hubpw").decode()
                    },
                    "plain.example": {"username": "pu", "password": "pp"},
                    "https://schemed.example:5000/v1/": {
                        "auth": base64.b64encode(b"su:sp").decode()
                    },
                    "idt.example": {
                        "auth": base64.b64encode(b":").decode(),
                        "identitytoken": "refresh-me",
                    },
                },
                "credHelpers": {
                    "helped.example": "fake",
                    "token.example": "fake",
                    "broken.example": "fake",
                },
            }
        )
    )
    config = DockerConfig()
    assert config.path == docker_env
    for host in ("docker.io", "registry-1.docker.io", "index.docker.io"):
        assert config.credentials(host) == Credentials("hubuser", "hubpw")
    assert config.credentials("plain.example") == Credentials("pu", "pp")
    assert config.credentials("schemed.example:5000") == Credentials("su", "sp")
    assert config.credentials("idt.example") == Credentials(identity_token="refresh-me")
    assert config.credentials("helped.example") == Credentials("hu", "hs")
    assert config.credentials("token.example") == Credentials(identity_token="idt")
    assert config.credentials("unknown.example") is None
    with pytest.raises(CredentialsError, match="exited 3: boom"):
        config.credentials("broken.example")
    assert "hubpw" not in repr(config.credentials("docker.io"))


def test_creds_store_and_chain(docker_env: Path) -> None:
    docker_env.write_text(json.dumps({"credsStore": "fake"}))
    assert DockerConfig().credentials("helped.example") == Credentials("hu", "hs")
    assert DockerConfig().credentials("nothing.example") is None
    chain = ChainedCredentials(
        StaticCredentials("cli", "pw", hosts=["only.example"]), DockerConfig()
    )
    assert chain.credentials("only.example") == Credentials("cli", "pw")
    assert chain.credentials("helped.example") == Credentials("hu", "hs")
    assert chain.credentials("nothing.example") is None
    docker_env.write_text("{not json")
    with pytest.raises(CredentialsError, match="cannot read docker config"):
        DockerConfig().credentials("x")
    with pytest.raises(CredentialsError, match="docker-credential-absent"):
        run_credential_helper("absent", "x")


def test_missing_docker_config_means_no_credentials(tmp_path: Path) -> None:
    assert DockerConfig(tmp_path / "none.json").credentials("docker.io") is None
    assert StaticCredentials.parse("user:pa:ss").credentials("any") == Credentials("user", "pa:ss")


@pytest.mark.parametrize("token_answer", ["reset", "refused"])
def test_credentials_never_appear_in_errors_or_logs(
    token_answer: str, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "s3cr3t-Pa55"
    encoded = base64.b64encode(f"alice:{secret}".encode()).decode()

    def tokens(request: httpx.Request) -> httpx.Response:
        if token_answer == "reset":
            raise httpx.ReadError("connection reset", request=request)
        return httpx.Response(401, json={"details": "bad credentials"})

    net = FakeNetwork()
    net.hosts["auth.example"] = tokens
    net.hosts[REGISTRY] = bearer_registry(set())
    caplog.set_level("DEBUG")
    with (
        net.client(credentials=StaticCredentials("alice", secret)) as client,
        pytest.raises((TransportError, UnauthorizedError)) as info,
    ):
        client.read_blob(REF, BLOB_DIGEST)
    texts = [str(info.value), repr(info.value), caplog.text]
    cause: BaseException | None = info.value
    while cause is not None:
        texts.append(str(cause))
        cause = cause.__cause__
    for text in texts:
        assert secret not in text and encoded not in text


class RegistryTokenSource:
    """Credentials holding only a pre-issued bearer token (CRI's `registry_token`)."""

    def credentials(self, host: str) -> Credentials | None:
        return Credentials(registry_token="pre-issued-token") if host == REGISTRY else None


def test_registry_token_is_sent_as_bearer_without_a_token_server() -> None:
    net, token_log = FakeNetwork(), []  # type: ignore[var-annotated]
    net.hosts["auth.example"] = token_server([], token_log)
    net.hosts[REGISTRY] = bearer_registry({"pre-issued-token"})
    with net.client(credentials=RegistryTokenSource()) as client:
        assert client.read_blob(REF, BLOB_DIGEST) == BLOB
        assert client.read_blob(REF, BLOB_DIGEST) == BLOB
    assert token_log == []  # never asked the token server
    sent = [r.headers.get("authorization") for r in net.log]
    assert sent[0] is None and sent[1:] == ["Bearer pre-issued-token"] * 2
    creds = Credentials(registry_token="pre-issued-token")
    assert not creds.empty and "pre-issued-token" not in repr(creds)


async def test_registry_token_cannot_answer_a_basic_challenge() -> None:
    auth = Authenticator(RegistryTokenSource())

    async def fetch(request: object) -> tuple[int, bytes]:
        raise AssertionError("no token request for a registry token")

    assert auth.on_unauthorized(REGISTRY, ['Basic realm="r"'], ["repository:team/app:pull"])
    with pytest.raises(UnauthorizedError, match="only a registry token") as info:
        await auth.authorization(REGISTRY, ["repository:team/app:pull"], fetch)
    assert "pre-issued-token" not in str(info.value)
    # The same source answers a Bearer challenge directly.
    auth.on_unauthorized(
        REGISTRY, [f'Bearer realm="{TOKEN_REALM}",service="svc"'], ["repository:team/app:pull"]
    )
    got = await auth.authorization(REGISTRY, ["repository:team/app:pull"], fetch)
    assert got == "Bearer pre-issued-token"
