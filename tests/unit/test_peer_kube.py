"""The EndpointSlices member source against a small fake Kubernetes API server (TLS on
127.0.0.1, its own CA, client certificates checked), and kubeconfig / in-cluster loading."""

from __future__ import annotations

import base64
import datetime
import http.server
import ipaddress
import json
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

from snapshotter.peers.kube import (
    EndpointSliceMembers,
    KubeApiConfig,
    KubeConfigError,
    endpoint_slice_source,
)
from snapshotter.peers.members import Member, MembershipError
from tests.support.registry import free_port

NAMESPACE = "kube-system"
SERVICE = "sociable-peers"
SLICES_PATH = f"/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices"
SELECTOR = f"kubernetes.io/service-name={SERVICE}"
TOKEN = "s3cr3t-token-value"


# -- a CA, a server certificate and a client certificate ---------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_pki(directory: Path, name: str = "pki") -> Pki:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d = directory / name
    d.mkdir()
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(common_name: str, usage: x509.ObjectIdentifier, san: bool) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if san:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        return (
            cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )

    pki = Pki(d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt", d / "client.key")
    pki.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert, key = leaf("127.0.0.1", ExtendedKeyUsageOID.SERVER_AUTH, san=True)
    pki.server_cert.write_bytes(cert)
    pki.server_key.write_bytes(key)
    cert, key = leaf("system:node:node-a", ExtendedKeyUsageOID.CLIENT_AUTH, san=False)
    pki.client_cert.write_bytes(cert)
    pki.client_key.write_bytes(key)
    return pki


# -- the fake API server -----------------------------------------------------------------------


@dataclass
class Seen:
    path: str
    query: dict[str, list[str]]
    authorization: str | None
    client_cn: str | None


@dataclass
class FakeApi:
    """Answers GETs with `status` and `body` (after `delay_sec`), recording each request."""

    port: int
    status: int = 200
    body: bytes = b""
    delay_sec: float = 0.0
    seen: list[Seen] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def answer(self, doc: Any, status: int = 200) -> None:
        self.status = status
        self.body = json.dumps(doc).encode()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("kube"))


@pytest.fixture
def api(pki: Pki) -> Iterator[FakeApi]:
    fake = FakeApi(port=free_port())
    fake.answer(slice_list())

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            peer = self.connection.getpeercert()  # type: ignore[attr-defined]
            cn = None
            if peer:
                cn = dict(x[0] for x in peer["subject"]).get("commonName")
            fake.seen.append(
                Seen(url.path, urllib.parse.parse_qs(url.query), self.headers["Authorization"], cn)
            )
            if fake.delay_sec:
                time.sleep(fake.delay_sec)
            self.send_response(fake.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(fake.body)))
            self.end_headers()
            self.wfile.write(fake.body)

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        block_on_close = False

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # failed handshakes are what some tests are about

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    ctx.load_verify_locations(pki.ca)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    server = Server(("127.0.0.1", fake.port), Handler)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def endpoint(
    addresses: list[str], *, ready: bool | None = True, zone: str | None = None
) -> dict[str, Any]:
    ep: dict[str, Any] = {"addresses": addresses}
    if ready is not None:
        ep["conditions"] = {"ready": ready, "serving": True, "terminating": not ready}
    else:
        ep["conditions"] = {}
    if zone is not None:
        ep["zone"] = zone
    return ep


def slice_list(*slices: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": "EndpointSliceList",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {"resourceVersion": "1"},
        "items": list(slices),
    }


def a_slice(
    endpoints: list[dict[str, Any]],
    *,
    address_type: str = "IPv4",
    ports: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "metadata": {"name": f"{SERVICE}-x", "labels": {"kubernetes.io/service-name": SERVICE}},
        "addressType": address_type,
        "endpoints": endpoints,
        "ports": ports if ports is not None else [{"name": "peer", "port": 8472}],
    }


def service_account(tmp_path: Path, pki: Pki, token: str = TOKEN) -> Path:
    d = tmp_path / "serviceaccount"
    d.mkdir()
    (d / "token").write_text(token)
    (d / "ca.crt").write_bytes(pki.ca.read_bytes())
    (d / "namespace").write_text(NAMESPACE)
    return d


def in_cluster(api: FakeApi, directory: Path) -> KubeApiConfig:
    env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(api.port)}
    return KubeApiConfig.in_cluster(environ=env, directory=directory)


def kubeconfig(user: dict[str, Any], cluster: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "node",
        "contexts": [
            {"name": "other", "context": {"cluster": "nowhere", "user": "nobody"}},
            {"name": "node", "context": {"cluster": "local", "user": "kubelet"}},
        ],
        "clusters": [{"name": "local", "cluster": cluster}],
        "users": [{"name": "kubelet", "user": user}],
    }


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


# -- in-cluster --------------------------------------------------------------------------------


async def test_in_cluster_sends_the_token_and_rereads_it(
    api: FakeApi, pki: Pki, tmp_path: Path
) -> None:
    sa = service_account(tmp_path, pki)
    api.answer(slice_list(a_slice([endpoint(["10.0.0.1"]), endpoint(["10.0.0.2"])])))
    source = EndpointSliceMembers(in_cluster(api, sa), NAMESPACE, SERVICE, 8472)
    assert source.name == f"kubernetes:{NAMESPACE}/{SERVICE}"
    assert await source.resolve() == [Member("10.0.0.1", 8472), Member("10.0.0.2", 8472)]
    (seen,) = api.seen
    assert seen.path == SLICES_PATH
    assert seen.query == {"labelSelector": [SELECTOR]}
    assert seen.authorization == f"Bearer {TOKEN}"

    (sa / "token").write_text("rotated-token\n")
    await source.resolve()
    assert api.seen[-1].authorization == "Bearer rotated-token"


def test_in_cluster_without_the_environment_is_one_clear_error(pki: Pki, tmp_path: Path) -> None:
    sa = service_account(tmp_path, pki)
    with pytest.raises(KubeConfigError, match="KUBERNETES_SERVICE_HOST/PORT unset"):
        KubeApiConfig.in_cluster(environ={}, directory=sa)
    with pytest.raises(KubeConfigError, match=r"token .*/missing/token cannot be read"):
        KubeApiConfig.in_cluster(
            environ={"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"},
            directory=tmp_path / "missing",
        )
    assert isinstance(KubeConfigError("x"), ValueError)


def test_in_cluster_ipv6_server(pki: Pki, tmp_path: Path) -> None:
    sa = service_account(tmp_path, pki)
    env = {"KUBERNETES_SERVICE_HOST": "fd00:10:96::1", "KUBERNETES_SERVICE_PORT": "443"}
    cfg = KubeApiConfig.in_cluster(environ=env, directory=sa)
    assert cfg.server == "https://[fd00:10:96::1]:443"
    assert TOKEN not in repr(cfg)


# -- kubeconfig --------------------------------------------------------------------------------


async def test_kubeconfig_yaml_with_token_and_relative_ca_file(
    api: FakeApi, pki: Pki, tmp_path: Path
) -> None:
    (tmp_path / "ca.crt").write_bytes(pki.ca.read_bytes())
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            kubeconfig({"token": TOKEN}, {"server": api.url, "certificate-authority": "ca.crt"})
        )
    )
    cfg = KubeApiConfig.from_kubeconfig(path)
    assert cfg.ca_file == str(tmp_path / "ca.crt")
    assert TOKEN not in repr(cfg)
    source = EndpointSliceMembers(cfg, NAMESPACE, SERVICE, 8472)
    assert await source.resolve() == []
    assert api.seen[-1].authorization == f"Bearer {TOKEN}"
    assert api.seen[-1].client_cn is None


async def test_kubeconfig_json_with_inline_client_certificate(
    api: FakeApi, pki: Pki, tmp_path: Path
) -> None:
    path = tmp_path / "kubeconfig.json"
    user = {"client-certificate-data": b64(pki.client_cert), "client-key-data": b64(pki.client_key)}
    path.write_text(
        json.dumps(kubeconfig(user, {"server": api.url, "certificate-authority-data": b64(pki.ca)}))
    )
    api.answer(slice_list(a_slice([endpoint(["10.0.0.9"])])))
    source = endpoint_slice_source(str(path), NAMESPACE, SERVICE, 8472)
    assert await source.resolve() == [Member("10.0.0.9", 8472)]
    assert api.seen[-1].client_cn == "system:node:node-a"
    assert api.seen[-1].authorization is None


async def test_kubeconfig_client_certificate_files_as_kubelet_has_them(
    api: FakeApi, pki: Pki, tmp_path: Path
) -> None:
    # kubelet's kubeconfig names one file holding both certificate and key
    both = tmp_path / "kubelet-client-current.pem"
    both.write_bytes(pki.client_cert.read_bytes() + pki.client_key.read_bytes())
    user = {"client-certificate": str(both), "client-key": str(both)}
    path = tmp_path / "kubelet.conf"
    path.write_text(
        yaml.safe_dump(kubeconfig(user, {"server": api.url, "certificate-authority": str(pki.ca)}))
    )
    source = EndpointSliceMembers(KubeApiConfig.from_kubeconfig(path), NAMESPACE, SERVICE, 8472)
    await source.resolve()
    assert api.seen[-1].client_cn == "system:node:node-a"


async def test_kubeconfig_token_file_wins_and_is_reread(
    api: FakeApi, pki: Pki, tmp_path: Path
) -> None:
    (tmp_path / "token").write_text("from-file")
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            kubeconfig(
                {"token": "inline", "tokenFile": "token"},
                {"server": api.url, "certificate-authority": str(pki.ca)},
            )
        )
    )
    source = EndpointSliceMembers(KubeApiConfig.from_kubeconfig(path), NAMESPACE, SERVICE, 8472)
    await source.resolve()
    assert api.seen[-1].authorization == "Bearer from-file"
    (tmp_path / "token").write_text("next")
    await source.resolve()
    assert api.seen[-1].authorization == "Bearer next"

    (tmp_path / "token").unlink()
    with pytest.raises(MembershipError) as info:
        await source.resolve()
    assert str(info.value).startswith(f"kubernetes:{NAMESPACE}/{SERVICE}: token file ")
    assert "No such file or directory" in str(info.value)


async def test_kubeconfig_insecure_skip_tls_verify(api: FakeApi, tmp_path: Path) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            kubeconfig({"token": TOKEN}, {"server": api.url, "insecure-skip-tls-verify": True})
        )
    )
    source = EndpointSliceMembers(KubeApiConfig.from_kubeconfig(path), NAMESPACE, SERVICE, 8472)
    assert await source.resolve() == []
    assert api.seen[-1].authorization == f"Bearer {TOKEN}"


def test_kubeconfig_exec_user_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "kubeconfig"
    user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": "aws"}}
    path.write_text(yaml.safe_dump(kubeconfig(user, {"server": "https://10.0.0.1:6443"})))
    with pytest.raises(KubeConfigError) as info:
        KubeApiConfig.from_kubeconfig(path)
    message = str(info.value)
    assert message == (
        f"kubeconfig {path}: user 'kubelet': exec credential plugins are not supported; "
        "use a token or client certificate"
    )
    with pytest.raises(KubeConfigError, match="exec credential plugins are not supported"):
        endpoint_slice_source(str(path), NAMESPACE, SERVICE, 8472)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("current-context: nowhere\ncontexts: []\n", "no context named 'nowhere'"),
        ("apiVersion: v1\n", "has no current-context"),
        ("- a list\n", "not a kubeconfig"),
        ("{not: [yaml\n", "is not YAML or JSON"),
    ],
)
def test_kubeconfig_errors_are_one_line(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text(text)
    with pytest.raises(KubeConfigError) as info:
        KubeApiConfig.from_kubeconfig(path)
    assert reason in str(info.value)
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(f"kubeconfig {path}")


def test_kubeconfig_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KubeConfigError, match="cannot be read: No such file or directory"):
        KubeApiConfig.load(str(tmp_path / "absent"))


# -- the EndpointSlices ------------------------------------------------------------------------


async def test_ready_endpoints_zones_ports_and_address_types(
    api: FakeApi, pki: Pki, tmp_path: Path
) -> None:
    api.answer(
        slice_list(
            a_slice(
                [
                    endpoint(["10.0.0.1"], zone="zone-a"),
                    endpoint(["10.0.0.2"], ready=False, zone="zone-a"),  # not ready: out
                    endpoint(["10.0.0.3", "10.0.0.4"], ready=None),  # absent: ready
                ],
                ports=[{"name": "metrics", "port": 9100}, {"name": "peer", "port": 9472}],
            ),
            a_slice(
                [endpoint(["fd00:0:0::0007"], zone="zone-b")],
                address_type="IPv6",
                ports=[{"name": "other", "port": 1234}],  # no port named peer: the default
            ),
            a_slice([endpoint(["peer.example.com"])], address_type="FQDN"),
        )
    )
    source = EndpointSliceMembers(
        in_cluster(api, service_account(tmp_path, pki)),
        NAMESPACE,
        SERVICE,
        8472,
        port_name="peer",
    )
    members = await source.resolve()
    assert members == [
        Member("10.0.0.1", 9472),
        Member("10.0.0.3", 9472),
        Member("10.0.0.4", 9472),
        Member("fd00::7", 8472),
    ]
    assert [m.zone for m in members] == ["zone-a", "", "", "zone-b"]


async def test_without_port_name_the_given_port(api: FakeApi, pki: Pki, tmp_path: Path) -> None:
    api.answer(slice_list(a_slice([endpoint(["10.0.0.1"])], ports=[{"name": "peer", "port": 1}])))
    source = EndpointSliceMembers(
        in_cluster(api, service_account(tmp_path, pki)), NAMESPACE, SERVICE, 8472
    )
    assert await source.resolve() == [Member("10.0.0.1", 8472)]


async def test_names_are_url_encoded(api: FakeApi, pki: Pki, tmp_path: Path) -> None:
    source = EndpointSliceMembers(
        in_cluster(api, service_account(tmp_path, pki)), "odd/ns x", "a&b=c", 8472
    )
    await source.resolve()
    assert api.seen[-1].path == "/apis/discovery.k8s.io/v1/namespaces/odd%2Fns%20x/endpointslices"
    assert api.seen[-1].query == {"labelSelector": ["kubernetes.io/service-name=a&b=c"]}


async def test_http_error_status_is_one_line_without_the_token(
    api: FakeApi, pki: Pki, tmp_path: Path
) -> None:
    api.answer(
        {
            "kind": "Status",
            "status": "Failure",
            "message": 'endpointslices.discovery.k8s.io is forbidden: User "system:anonymous"\n'
            "cannot list resource",
            "reason": "Forbidden",
            "code": 403,
        },
        status=403,
    )
    source = EndpointSliceMembers(
        in_cluster(api, service_account(tmp_path, pki)), NAMESPACE, SERVICE, 8472
    )
    with pytest.raises(MembershipError) as info:
        await source.resolve()
    message = str(info.value)
    assert message.startswith(f"kubernetes:{NAMESPACE}/{SERVICE}: GET {api.url}{SLICES_PATH}")
    assert "HTTP 403: endpointslices.discovery.k8s.io is forbidden" in message
    assert "\n" not in message
    assert TOKEN not in message


@pytest.mark.parametrize("body", [b"<html>not json</html>", b'{"items": 5}', b"[1, 2]"])
async def test_bad_json_is_a_membership_error(
    api: FakeApi, pki: Pki, tmp_path: Path, body: bytes
) -> None:
    api.status, api.body = 200, body
    source = EndpointSliceMembers(
        in_cluster(api, service_account(tmp_path, pki)), NAMESPACE, SERVICE, 8472
    )
    with pytest.raises(MembershipError, match="the answer is not an EndpointSlice list"):
        await source.resolve()


async def test_untrusted_server_certificate(api: FakeApi, tmp_path: Path, pki: Pki) -> None:
    other = make_pki(tmp_path, "other")  # a CA that did not sign the server's certificate
    cfg = KubeApiConfig(server=api.url, ca_file=str(other.ca), token=TOKEN)
    source = EndpointSliceMembers(cfg, NAMESPACE, SERVICE, 8472)
    with pytest.raises(MembershipError) as info:
        await source.resolve()
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
    assert TOKEN not in str(info.value)
    assert api.seen == []


async def test_connection_refused(tmp_path: Path, pki: Pki) -> None:
    cfg = KubeApiConfig(server=f"https://127.0.0.1:{free_port()}", ca_file=str(pki.ca))
    source = EndpointSliceMembers(cfg, NAMESPACE, SERVICE, 8472)
    with pytest.raises(MembershipError, match="ConnectError"):
        await source.resolve()


async def test_slow_server_times_out(api: FakeApi, pki: Pki, tmp_path: Path) -> None:
    api.delay_sec = 3.0
    source = EndpointSliceMembers(
        in_cluster(api, service_account(tmp_path, pki)),
        NAMESPACE,
        SERVICE,
        8472,
        timeout_sec=0.5,
    )
    start = trio.current_time()
    with pytest.raises(MembershipError, match=r"GET .* (no answer within 0\.5s|ReadTimeout)"):
        await source.resolve()
    assert trio.current_time() - start < 2.0


async def test_bad_ca_file_is_a_membership_error(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_text("not a certificate")
    cfg = KubeApiConfig(server="https://127.0.0.1:1", ca_file=str(tmp_path / "ca.crt"))
    source = EndpointSliceMembers(cfg, NAMESPACE, SERVICE, 8472)
    with pytest.raises(MembershipError, match=f"CA {tmp_path}/ca.crt cannot be loaded"):
        await source.resolve()
