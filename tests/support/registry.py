"""Real registries for tests: Debian's `docker-registry` (distribution 2.8) on loopback.

Three flavours, each on a free port with its own storage directory, always torn down:

- anonymous (`registry` fixture);
- HTTP Basic with an htpasswd file (`basic_registry`); the bcrypt hash comes from the system
  libcrypt through ctypes, so no extra package is needed;
- Docker token auth (`auth_registry`): a small token server (`TokenServer`, a thread on
  loopback) issues ES256 JWTs whose `x5c` certificate is the registry's `rootcertbundle`. It
  accepts the credentials it was given through GET + Basic and through the OAuth2 POST form,
  and counts the requests it serves.

`CountingProxy` sits in front of a registry, counts requests and bytes per path, and can act
like blob storage behind a redirect (blob GETs answered `307` to a "presigned" URL on the proxy
that refuses an `Authorization` header, as S3 does), or fail requests on demand.

Use the fixtures through `tests/conftest.py` (`pytest_plugins`), or `start_registry()` directly.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import ctypes.util
import datetime
import http.server
import io
import json
import os
import secrets
import shutil
import socket
import struct
import subprocess
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest

REGISTRY_BINARY = "docker-registry"
STARTUP_TIMEOUT_SEC = 20.0
TOKEN_SERVICE = "sociable-test-registry"
TOKEN_ISSUER = "sociable-test-issuer"
DEFAULT_USER = "tester"
DEFAULT_PASSWORD = "s3cret-pass"
REGISTRY_EXP_LEEWAY_SEC = 60
"""How long past a token's `exp` docker-registry still accepts it (clock-skew leeway)."""

AuthKind = Literal["none", "basic", "token"]


class RegistryStartError(RuntimeError):
    """The registry (or a helper server) did not come up; the message has its log tail."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bcrypt_hash(password: str, cost: int = 5) -> str:
    """A `$2b$` bcrypt hash of `password`, made by the system libcrypt.

    Raises RegistryStartError when libcrypt has no bcrypt support.
    """
    name = ctypes.util.find_library("crypt")
    if name is None:
        raise RegistryStartError("libcrypt not found: cannot make an htpasswd file")
    lib = ctypes.CDLL(name)
    lib.crypt.restype = ctypes.c_char_p
    lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    alphabet = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    salt = f"$2b${cost:02d}$" + "".join(secrets.choice(alphabet) for _ in range(22))
    out = lib.crypt(password.encode(), salt.encode())
    if not out or not out.startswith(b"$2b$"):
        raise RegistryStartError("libcrypt does not support bcrypt ($2b$)")
    return str(out.decode())


# -- token server ------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class _TokenKey:
    """An EC P-256 key and its self-signed certificate (the registry's root cert bundle)."""

    def __init__(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sociable test token signer")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_pem = self.cert.public_bytes(serialization.Encoding.PEM)
        self.cert_der_b64 = base64.b64encode(
            self.cert.public_bytes(serialization.Encoding.DER)
        ).decode()

    def sign_jwt(self, claims: dict[str, Any]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        header = {"typ": "JWT", "alg": "ES256", "x5c": [self.cert_der_b64]}
        signing_input = (
            _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        )
        der = self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return signing_input + "." + _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


@dataclass
class TokenServer:
    """A Docker token server on loopback. Counters are per form: `requests["GET"|"POST"]`.

    Grants everything asked to the configured user; anonymous callers get `pull` only when
    `anonymous_pull` is set, otherwise an empty access list. `reject_post` makes the OAuth2
    form answer 404 (as some token servers do) so the GET fallback is exercised.

    Short-lived credentials: `password_check(password)`, when set, decides instead of the
    equality with `password` (the user must still be `username`); `refused` counts the
    requests refused for bad credentials. The registry accepts a token up to 60 s past its
    `exp` (clock-skew leeway); `strict_expiry` writes `exp` that much earlier, so the registry
    refuses a token as soon as its `expires_in_sec` have passed.
    """

    username: str = DEFAULT_USER
    password: str = DEFAULT_PASSWORD
    expires_in_sec: int = 300
    anonymous_pull: bool = False
    reject_post: bool = False
    password_check: Callable[[str], bool] | None = None
    strict_expiry: bool = False
    refused: int = 0
    requests: Counter[str] = field(default_factory=Counter)
    port: int = 0
    _key: _TokenKey = field(default_factory=_TokenKey)
    _httpd: http.server.ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    @property
    def cert_pem(self) -> bytes:
        return self._key.cert_pem

    def _grant(self, user: str | None, scopes: list[str]) -> list[dict[str, Any]]:
        access = []
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) < 3 or parts[0] != "repository":
                continue
            name, actions = ":".join(parts[1:-1]), parts[-1].split(",")
            if user is None:
                actions = [a for a in actions if a == "pull"] if self.anonymous_pull else []
            access.append({"type": "repository", "name": name, "actions": actions})
        return access

    def accepts(self, username: str, password: str) -> bool:
        """True when `username`/`password` are the configured user's credentials."""
        if username != self.username:
            return False
        if self.password_check is not None:
            return self.password_check(password)
        return password == self.password

    def issue(self, user: str | None, service: str, scopes: list[str]) -> dict[str, Any]:
        now = int(time.time())
        leeway = REGISTRY_EXP_LEEWAY_SEC if self.strict_expiry else 0
        claims = {
            "iss": TOKEN_ISSUER,
            "sub": user or "",
            "aud": service,
            "exp": now + self.expires_in_sec - leeway,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": self._grant(user, scopes),
        }
        token = self._key.sign_jwt(claims)
        return {"token": token, "access_token": token, "expires_in": self.expires_in_sec}

    def start(self) -> None:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def _answer(self, status: int, doc: dict[str, Any]) -> None:
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                server.requests["GET"] += 1
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                user: str | None = None
                header = self.headers.get("Authorization", "")
                if header.startswith("Basic "):
                    name, _, pw = base64.b64decode(header[6:]).decode().partition(":")
                    if not server.accepts(name, pw):
                        server.refused += 1
                        self._answer(401, {"details": "bad credentials"})
                        return
                    user = name
                self._answer(
                    200, server.issue(user, query.get("service", [""])[0], query.get("scope", []))
                )

            def do_POST(self) -> None:
                server.requests["POST"] += 1
                if server.reject_post:
                    self._answer(404, {"details": "no oauth here"})
                    return
                length = int(self.headers.get("Content-Length", "0"))
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                if form.get("grant_type") != ["password"] or not server.accepts(
                    form.get("username", [""])[0], form.get("password", [""])[0]
                ):
                    server.refused += 1
                    self._answer(401, {"details": "bad credentials"})
                    return
                scopes = " ".join(form.get("scope", [])).split()
                self._answer(
                    200, server.issue(server.username, form.get("service", [""])[0], scopes)
                )

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="token-server", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


def write_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server cert/key for 127.0.0.1 and localhost: (ca.pem, cert.pem, key.pem)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sociable test CA")])
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
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = (directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return paths


# -- registry --------------------------------------------------------------------------------


@dataclass
class RegistryServer:
    """A running docker-registry. `host` is `127.0.0.1:PORT`; `url` is `http://host`."""

    host: str
    storage: Path
    auth: AuthKind
    process: subprocess.Popen[bytes]
    log_path: Path
    username: str | None = None
    password: str | None = None
    token_server: TokenServer | None = None
    ca_cert: Path | None = None

    @property
    def url(self) -> str:
        """`http://host`, or `https://host` when serving TLS (then `ca_cert` signs its cert)."""
        return f"{'https' if self.ca_cert else 'http'}://{self.host}"

    @property
    def user(self) -> str:
        """`USER:PASS` as a CLI `--user` flag takes it (empty for anonymous)."""
        return f"{self.username}:{self.password}" if self.username else ""

    def ref(self, repository: str, tag: str = "latest") -> str:
        """`host/repository:tag`."""
        return f"{self.host}/{repository}:{tag}"

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        """Terminate the registry (and its token server). Idempotent."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.token_server is not None:
            self.token_server.stop()


def registry_available() -> bool:
    return shutil.which(REGISTRY_BINARY) is not None


@contextlib.contextmanager
def start_registry(
    workdir: Path,
    auth: AuthKind = "none",
    *,
    token_server: TokenServer | None = None,
    port: int | None = None,
    tls: bool = False,
) -> Iterator[RegistryServer]:
    """Run a docker-registry under `workdir` until the context exits.

    `port` fixes the port (to restart a registry at the same address). `tls` serves HTTPS
    with a certificate for 127.0.0.1 signed by a fresh CA (`RegistryServer.ca_cert`). Raises
    RegistryStartError (with the log tail) when it does not answer on `/v2/` in time.
    """
    binary = shutil.which(REGISTRY_BINARY)
    if binary is None:
        raise RegistryStartError(
            f"{REGISTRY_BINARY} is not installed (apt-get install docker-registry)"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    storage = workdir / "storage"
    storage.mkdir(exist_ok=True)
    port = port or free_port()
    host = f"127.0.0.1:{port}"
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "info", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True}},
        "http": {
            "addr": host,
            "secret": "sociable-test-secret",
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        },
        "health": {"storagedriver": {"enabled": False}},
    }
    username = password = None
    if auth == "basic":
        username, password = DEFAULT_USER, DEFAULT_PASSWORD
        htpasswd = workdir / "htpasswd"
        htpasswd.write_text(f"{username}:{bcrypt_hash(password)}\n")
        config["auth"] = {"htpasswd": {"realm": "basic-realm", "path": str(htpasswd)}}
    elif auth == "token":
        if token_server is None:
            token_server = TokenServer()
        if token_server._httpd is None:
            token_server.start()
        username, password = token_server.username, token_server.password
        bundle = workdir / "token-root.pem"
        bundle.write_bytes(token_server.cert_pem)
        config["auth"] = {
            "token": {
                "realm": token_server.realm,
                "service": TOKEN_SERVICE,
                "issuer": TOKEN_ISSUER,
                "rootcertbundle": str(bundle),
            }
        }
    ca_cert = None
    if tls:
        ca_cert, cert, key = write_tls_files(workdir)
        config["http"]["tls"] = {"certificate": str(cert), "key": str(key)}
    config_path = workdir / "config.yml"
    config_path.write_text(json.dumps(config))  # JSON is YAML
    log_path = workdir / "registry.log"
    log_file = log_path.open("ab")
    process = subprocess.Popen(
        [binary, "serve", str(config_path)],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "OTEL_TRACES_EXPORTER": "none"},
    )
    log_file.close()
    server = RegistryServer(
        host, storage, auth, process, log_path, username, password, token_server, ca_cert
    )
    try:
        _wait_ready(server)
        yield server
    finally:
        server.stop()


def _wait_ready(server: RegistryServer) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SEC
    last = ""
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RegistryStartError(
                f"docker-registry exited with {server.process.returncode}:\n{server.log_tail()}"
            )
        try:
            status = httpx.get(f"{server.url}/v2/", timeout=1.0, verify=False).status_code
            if status in (200, 401):
                return
            last = f"HTTP {status}"
        except httpx.HTTPError as e:
            last = str(e)
        time.sleep(0.05)
    raise RegistryStartError(
        f"docker-registry on {server.host} not ready ({last}):\n{server.log_tail()}"
    )


# -- counting / redirecting proxy --------------------------------------------------------------


@dataclass
class CountingProxy:
    """A reverse proxy in front of `upstream` that counts requests and bytes per path.

    `redirect_blobs`: blob GETs are answered `307` to `/_storage/<path>?sig=<n>` on this
    proxy; that URL serves the blob anonymously and answers 400 when the request carries an
    `Authorization` header (S3 rejects a second auth mechanism). `expire_storage_urls` makes
    every `/_storage` request with an old `sig` answer 403 (a presigned URL that expired).
    `fail_status`: the next `fail_count` requests get this status.

    A slow backend: `hold(path, range_header)` (the Range header or "") gives the seconds to
    hold a request after counting it, before answering (0: at once); a held request is then
    forwarded, or answered `hold_status` when that is set (a slow failing backend). `held`
    counts held requests, `holding` those being held now.

    Body faults (`fault`, applied to the next `fault_count` successful answers with a body whose
    path contains `fault_match`, blob reads by default; `faults_injected` counts them):
    `"reset"` drops the connection with a TCP RST instead of answering, `"truncate"` sends the
    headers with the full Content-Length but only half the body and closes, `"corrupt"` flips
    one byte in the middle of the body. `fault_count = -1` means every matching answer.
    """

    upstream: str
    redirect_blobs: bool = False
    expire_storage_urls: bool = False
    fail_status: int = 503
    fail_count: int = 0
    fault: Literal["", "reset", "truncate", "corrupt"] = ""
    fault_count: int = 0
    fault_match: str = "/blobs/sha256:"
    faults_injected: int = 0
    hold: Callable[[str, str], float] | None = None
    hold_status: int = 0
    held: int = 0
    holding: int = 0
    requests: Counter[str] = field(default_factory=Counter)
    bytes_sent: Counter[str] = field(default_factory=Counter)
    port: int = 0
    _sig: int = 0
    _storage_auth: str = ""
    _client: httpx.Client | None = None
    _httpd: http.server.ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def requests_to(self, fragment: str) -> int:
        """Number of requests whose `METHOD path` contains `fragment`."""
        return sum(n for key, n in self.requests.items() if fragment in key)

    def start(self) -> None:
        proxy = self
        client = httpx.Client(base_url=self.upstream, timeout=30.0)

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                length = str(len(body))
                for k, v in headers.items():
                    if k.lower() == "content-length" and self.command == "HEAD":
                        length = v  # a HEAD answer reports the size of what a GET would send
                    elif k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                with proxy._lock:
                    proxy.bytes_sent[urllib.parse.urlsplit(self.path).path] += len(body)

            def _handle(self) -> None:
                parts = urllib.parse.urlsplit(self.path)
                with proxy._lock:
                    proxy.requests[f"{self.command} {parts.path}"] += 1
                    failing = proxy.fail_count > 0
                    if failing:
                        proxy.fail_count -= 1
                if failing:
                    self._send(proxy.fail_status, {}, b"injected failure")
                    return
                if self._held(parts.path):
                    return
                length = int(self.headers.get("Content-Length", "0") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("host", "content-length", "connection")
                }
                path = self.path
                if parts.path.startswith("/_storage/"):
                    if "authorization" in (k.lower() for k in headers):
                        self._send(400, {}, b"<Error>Only one auth mechanism allowed</Error>")
                        return
                    sig = int(urllib.parse.parse_qs(parts.query).get("sig", ["0"])[0])
                    if proxy.expire_storage_urls and sig < proxy._sig:
                        self._send(403, {}, b"<Error>Request has expired</Error>")
                        return
                    path = parts.path[len("/_storage") :]
                    headers["Authorization"] = proxy._storage_auth
                elif (
                    proxy.redirect_blobs
                    and self.command == "GET"
                    and "/blobs/sha256:" in parts.path
                ):
                    # Let the registry check auth first, as a real one does before redirecting.
                    probe = client.request("HEAD", path, headers=headers)
                    if probe.status_code not in (200, 206):
                        self._send(probe.status_code, dict(probe.headers.items()), b"")
                        return
                    with proxy._lock:
                        proxy._sig += 1
                        sig = proxy._sig
                    proxy._storage_auth = headers.get("Authorization", "")
                    self._send(307, {"Location": f"/_storage{parts.path}?sig={sig}"}, b"")
                    return
                resp = client.request(self.command, path, headers=headers, content=body)
                out = {
                    k: v
                    for k, v in resp.headers.items()
                    if k.lower()
                    not in ("content-length", "transfer-encoding", "connection", "content-encoding")
                }
                if self.command == "HEAD" and "content-length" in resp.headers:
                    out["Content-Length"] = resp.headers["content-length"]
                if "location" in resp.headers:
                    loc = urllib.parse.urlsplit(resp.headers["location"])
                    if loc.netloc == urllib.parse.urlsplit(proxy.upstream).netloc:
                        out["Location"] = urllib.parse.urlunsplit(
                            ("http", proxy.host, loc.path, loc.query, "")
                        )
                if self._inject_fault(parts.path, resp.status_code, out, resp.content):
                    return
                self._send(resp.status_code, out, resp.content)

            def _held(self, path: str) -> bool:
                """Hold the request as `proxy.hold` says; True when it was answered here."""
                delay = proxy.hold(path, self.headers.get("Range", "")) if proxy.hold else 0.0
                if delay <= 0:
                    return False
                with proxy._lock:
                    proxy.held += 1
                    proxy.holding += 1
                try:
                    time.sleep(delay)
                finally:
                    with proxy._lock:
                        proxy.holding -= 1
                if not proxy.hold_status:
                    return False
                self.close_connection = True
                with contextlib.suppress(OSError):  # the client may have given up meanwhile
                    self._send(proxy.hold_status, {}, b"held, then failed")
                return True

            def _inject_fault(
                self, path: str, status: int, headers: dict[str, str], body: bytes
            ) -> bool:
                """Apply the configured body fault; True when the answer was handled."""
                if status not in (200, 206) or not body or proxy.fault_match not in path:
                    return False
                with proxy._lock:
                    if not proxy.fault or proxy.fault_count == 0:
                        return False
                    if proxy.fault_count > 0:
                        proxy.fault_count -= 1
                    proxy.faults_injected += 1
                    fault = proxy.fault
                if fault == "corrupt":
                    middle = len(body) // 2
                    body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]
                    self._send(status, headers, body)
                    return True
                self.close_connection = True
                if fault == "truncate":
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                else:  # reset: abort the connection (RST) without an answer
                    with contextlib.suppress(OSError):
                        self.connection.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                        self.connection.close()
                self.wfile = io.BytesIO()  # finish() must not write to the dead socket
                return True

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _handle

        self._storage_auth = ""
        self._client = client
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        threading.Thread(
            target=self._httpd.serve_forever, name="counting-proxy", daemon=True
        ).start()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._client is not None:
            self._client.close()
            self._client = None


@contextlib.contextmanager
def start_proxy(upstream: RegistryServer, **options: Any) -> Iterator[CountingProxy]:
    """A started CountingProxy in front of `upstream`, stopped on exit."""
    proxy = CountingProxy(upstream.url, **options)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


# -- fixtures ------------------------------------------------------------------------------------


def _require_registry() -> None:
    if not registry_available():
        pytest.skip(
            f"PREREQUISITE MISSING: {REGISTRY_BINARY} not on PATH (apt-get install docker-registry); "
            "registry tests cannot run"
        )


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """An anonymous docker-registry on loopback, shared by the session (use unique repos)."""
    _require_registry()
    with start_registry(tmp_path_factory.mktemp("registry-anon")) as server:
        yield server


@pytest.fixture(scope="session")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """A docker-registry with htpasswd Basic auth (`.username`, `.password`)."""
    _require_registry()
    with start_registry(tmp_path_factory.mktemp("registry-basic"), "basic") as server:
        yield server


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """A docker-registry with Docker token auth; `.token_server` counts token requests."""
    _require_registry()
    with start_registry(tmp_path_factory.mktemp("registry-token"), "token") as server:
        yield server


@pytest.fixture
def registry_factory(tmp_path: Path) -> Iterator[Any]:
    """Start extra registries in a test: `registry_factory(auth="none", **kw) -> RegistryServer`.

    All are stopped when the test ends.
    """
    _require_registry()
    stack = contextlib.ExitStack()
    count = 0

    def make(auth: AuthKind = "none", **kwargs: Any) -> RegistryServer:
        nonlocal count
        count += 1
        return stack.enter_context(start_registry(tmp_path / f"registry-{count}", auth, **kwargs))

    with stack:
        yield make
