"""Members from Kubernetes: the ready endpoints of a Service, read from its EndpointSlices.

One GET of the Service's EndpointSlices per resolve (no watch: `refresh_sec` polls), through
the API server with httpx on trio. Credentials come from the pod's service account
(`KubeApiConfig.in_cluster`) or a kubeconfig file such as kubelet's
(`KubeApiConfig.from_kubeconfig`). Token files are re-read on every request, and the TLS
context (CA, client certificate) is rebuilt on every request in a worker thread, because both
rotate (service-account tokens, kubelet's client certificate).

A token never appears in an error, a log line or a repr.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import os
import shutil
import ssl
import tempfile
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio
import yaml

from snapshotter.peers.members import Member, MembershipError

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
"""Where a pod's service-account token and the cluster CA are mounted."""
REQUEST_TIMEOUT_SEC = 10.0
"""Longest one EndpointSlices request may take, connection and answer included."""
ERROR_BODY_CHARS = 200
"""How much of an API error's message goes into a MembershipError."""


class KubeConfigError(MembershipError, ValueError):
    """Kubernetes API credentials that cannot be used: no in-cluster environment, an
    unreadable or malformed kubeconfig, an unsupported kind of user (exec, auth-provider,
    username/password). Raised when the configuration is loaded (at start-up); one line
    naming the file. A ValueError too, as a bad setting is."""


@dataclass(frozen=True)
class KubeApiConfig:
    """How to reach the Kubernetes API: the server URL, how to trust it, who we are.

    `server` is a base URL (`https://HOST:PORT`). Trust: `ca_file` or `ca_data` (PEM; only
    that CA is trusted), else the system's CAs; `insecure_skip_tls_verify` skips
    verification. Identity: `token_file` (re-read on every request) or `token`, and/or a
    client certificate (`client_cert_file`/`client_cert_data` with
    `client_key_file`/`client_key_data`, PEM). Build one with `in_cluster`,
    `from_kubeconfig` or `load`.
    """

    server: str
    ca_file: str = ""
    ca_data: bytes = field(default=b"", repr=False)
    insecure_skip_tls_verify: bool = False
    token: str = field(default="", repr=False)
    token_file: str = ""
    client_cert_file: str = ""
    client_cert_data: bytes = field(default=b"", repr=False)
    client_key_file: str = ""
    client_key_data: bytes = field(default=b"", repr=False)

    @classmethod
    def load(cls, kubeconfig: str = "") -> KubeApiConfig:
        """`from_kubeconfig(kubeconfig)`, or `in_cluster()` when it is empty (the `kubeconfig`
        setting). Blocking (reads files). Raises KubeConfigError."""
        return cls.from_kubeconfig(kubeconfig) if kubeconfig else cls.in_cluster()

    @classmethod
    def in_cluster(
        cls,
        *,
        environ: Mapping[str, str] = os.environ,
        directory: str | os.PathLike[str] = SERVICE_ACCOUNT_DIR,
    ) -> KubeApiConfig:
        """The pod's own credentials: the API at `KUBERNETES_SERVICE_HOST`:`_PORT`, the
        service-account token `<directory>/token` (re-read on every request) and the CA
        `<directory>/ca.crt`. Raises KubeConfigError (one line) when the variables are
        unset or the token cannot be read. Blocking."""
        host = environ.get("KUBERNETES_SERVICE_HOST", "")
        port = environ.get("KUBERNETES_SERVICE_PORT", "")
        if not host or not port:
            raise KubeConfigError(
                "not running in a Kubernetes pod (KUBERNETES_SERVICE_HOST/PORT unset); "
                "set [peers] kubeconfig"
            )
        if ":" in host:
            host = f"[{host}]"
        d = Path(directory)
        token_file = d / "token"
        try:
            token_file.read_bytes()
        except OSError as e:
            raise KubeConfigError(
                f"service-account token {token_file} cannot be read: {e.strerror or e}"
            ) from e
        ca = d / "ca.crt"
        return cls(
            server=f"https://{host}:{port}",
            ca_file=str(ca) if ca.exists() else "",
            token_file=str(token_file),
        )

    @classmethod
    def from_kubeconfig(cls, path: str | os.PathLike[str]) -> KubeApiConfig:
        """The current context of kubeconfig `path` (YAML or JSON): its cluster's `server`,
        `certificate-authority`(`-data`) and `insecure-skip-tls-verify`; its user's `token`,
        `tokenFile` (preferred when both are set, as client-go does), `client-certificate`
        (`-data`) and `client-key`(`-data`). Relative file names are relative to the
        kubeconfig's directory. Raises KubeConfigError (one line, naming the file) when the
        file cannot be read or parsed, lacks the current context, or its user needs an exec
        or auth-provider plugin or a username and password. Blocking."""
        where = f"kubeconfig {path}"
        try:
            doc = yaml.safe_load(Path(path).read_text())
        except OSError as e:
            raise KubeConfigError(f"{where} cannot be read: {e.strerror or e}") from e
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise KubeConfigError(f"{where} is not YAML or JSON: {_one_line(e)}") from e
        base = Path(path).parent
        if not isinstance(doc, dict):
            raise KubeConfigError(f"{where} is not a kubeconfig (not a mapping)")
        context_name = doc.get("current-context")
        if not context_name:
            raise KubeConfigError(f"{where} has no current-context")
        context = _named(doc, "contexts", "context", context_name, where)
        cluster = _named(doc, "clusters", "cluster", context.get("cluster"), where)
        user_name = context.get("user")
        user = _named(doc, "users", "user", user_name, where) if user_name else {}
        server = cluster.get("server")
        if not isinstance(server, str) or not server:
            raise KubeConfigError(f"{where}: cluster {context.get('cluster')!r} has no server")
        if "exec" in user:
            raise KubeConfigError(
                f"{where}: user {user_name!r}: exec credential plugins are not supported; "
                "use a token or client certificate"
            )
        if "auth-provider" in user:
            raise KubeConfigError(
                f"{where}: user {user_name!r}: auth-provider plugins are not supported; "
                "use a token or client certificate"
            )
        if "username" in user or "password" in user:
            raise KubeConfigError(
                f"{where}: user {user_name!r}: username and password are not supported; "
                "use a token or client certificate"
            )

        def file_of(section: dict[str, Any], key: str) -> str:
            value = section.get(key) or ""
            if not isinstance(value, str):
                raise KubeConfigError(f"{where}: {key} is not a file name")
            return str(base / value) if value else ""

        def data_of(section: dict[str, Any], key: str) -> bytes:
            value = section.get(key) or ""
            try:
                return base64.b64decode(value, validate=True) if value else b""
            except (binascii.Error, TypeError, ValueError) as e:
                raise KubeConfigError(f"{where}: {key} is not base64") from e

        token = user.get("token") or ""
        if not isinstance(token, str):
            raise KubeConfigError(f"{where}: user {user_name!r}: token is not a string")
        skip = cluster.get("insecure-skip-tls-verify") or False
        return cls(
            server=server.rstrip("/"),
            ca_file=file_of(cluster, "certificate-authority"),
            ca_data=data_of(cluster, "certificate-authority-data"),
            insecure_skip_tls_verify=skip is True or str(skip).lower() == "true",
            token=token,
            token_file=file_of(user, "tokenFile"),
            client_cert_file=file_of(user, "client-certificate"),
            client_cert_data=data_of(user, "client-certificate-data"),
            client_key_file=file_of(user, "client-key"),
            client_key_data=data_of(user, "client-key-data"),
        )

    def ssl_context(self) -> ssl.SSLContext:
        """A TLS context for the API: its CA (or the system's), the client certificate.
        Blocking (reads files); raises MembershipError naming the file that cannot be
        loaded."""
        if self.insecure_skip_tls_verify:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        elif self.ca_file or self.ca_data:
            try:
                ctx = ssl.create_default_context(
                    cafile=self.ca_file or None,
                    cadata=self.ca_data.decode("ascii", "replace") if self.ca_data else None,
                )
            except (OSError, ssl.SSLError) as e:
                what = self.ca_file or "certificate-authority-data"
                raise MembershipError(f"CA {what} cannot be loaded: {_one_line(e)}") from e
        else:
            ctx = ssl.create_default_context()
        if self.client_cert_file or self.client_cert_data:
            self._load_client_cert(ctx)
        return ctx

    def _load_client_cert(self, ctx: ssl.SSLContext) -> None:
        # `load_cert_chain` reads files only: inline data goes through a private directory
        tmp = tempfile.mkdtemp(prefix="sociable-kube-")
        try:
            cert = self.client_cert_file
            if self.client_cert_data:
                cert = os.path.join(tmp, "cert.pem")
                _write_private(cert, self.client_cert_data)
            key = self.client_key_file or None
            if self.client_key_data:
                key = os.path.join(tmp, "key.pem")
                _write_private(key, self.client_key_data)
            try:
                ctx.load_cert_chain(cert, key)
            except (OSError, ssl.SSLError) as e:
                what = self.client_cert_file or "client-certificate-data"
                raise MembershipError(
                    f"client certificate {what} cannot be loaded: {_one_line(e)}"
                ) from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    async def authorization(self) -> str | None:
        """The `Authorization` header value (`Bearer …`), None without a token. Re-reads
        `token_file` each time; raises MembershipError naming the file (never its
        content)."""
        token = self.token
        if self.token_file:
            try:
                token = (await trio.Path(self.token_file).read_text()).strip()
            except (OSError, UnicodeDecodeError) as e:
                reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
                raise MembershipError(
                    f"token file {self.token_file} cannot be read: {reason}"
                ) from e
        return f"Bearer {token}" if token else None


class EndpointSliceMembers:
    """The ready endpoints of Service `namespace`/`service`, from its EndpointSlices.

    Every address of every endpoint whose `conditions.ready` is not false (absent counts as
    ready, as the API documents) is a member, with the endpoint's `zone`. The port is the
    slice's port named `port_name` when given and the slice has it, else `port`. FQDN
    slices and addresses that are not IPs are skipped.

    `resolve` raises MembershipError (one line naming the source; never a token) on an HTTP
    error status, a transport or TLS failure, a timeout (`timeout_sec`, the whole request)
    or an answer that is not an EndpointSlice list.
    """

    def __init__(
        self,
        api: KubeApiConfig,
        namespace: str,
        service: str,
        port: int,
        *,
        port_name: str = "",
        timeout_sec: float = REQUEST_TIMEOUT_SEC,
    ) -> None:
        self.name = f"kubernetes:{namespace}/{service}"
        self._api = api
        self._port = port
        self._port_name = port_name
        self._timeout = timeout_sec
        ns = urllib.parse.quote(namespace, safe="")
        self._url = f"{api.server}/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices"
        self._params = {"labelSelector": f"kubernetes.io/service-name={service}"}

    def __repr__(self) -> str:
        return f"<EndpointSliceMembers {self.name} server={self._api.server} port={self._port}>"

    async def resolve(self) -> list[Member]:
        headers = {"Accept": "application/json"}
        try:
            auth = await self._api.authorization()
            ctx = await trio.to_thread.run_sync(self._api.ssl_context)
        except MembershipError as e:
            raise MembershipError(f"{self.name}: {e}") from e
        if auth:
            headers["Authorization"] = auth
        body: bytes = b""
        status = 0
        with trio.move_on_after(self._timeout) as scope:
            try:
                async with httpx.AsyncClient(
                    verify=ctx,
                    timeout=self._timeout,
                    trust_env=False,
                    follow_redirects=False,
                ) as client:
                    answer = await client.get(self._url, params=self._params, headers=headers)
                    status, body = answer.status_code, answer.content
            except httpx.HTTPError as e:
                raise MembershipError(f"{self.name}: GET {self._url}: {_describe(e)}") from e
            except (OSError, ssl.SSLError) as e:
                raise MembershipError(f"{self.name}: GET {self._url}: {_one_line(e)}") from e
        if scope.cancelled_caught:
            raise MembershipError(
                f"{self.name}: GET {self._url}: no answer within {self._timeout:g}s"
            )
        if status != 200:
            raise MembershipError(
                f"{self.name}: GET {self._url}: HTTP {status}{_api_message(body)}"
            )
        try:
            doc = json.loads(body)
            return self._members(doc)
        except (ValueError, TypeError, AttributeError, KeyError) as e:
            raise MembershipError(
                f"{self.name}: the answer is not an EndpointSlice list: {_one_line(e)[:ERROR_BODY_CHARS]}"
            ) from e

    def _members(self, doc: Any) -> list[Member]:
        """Members out of an EndpointSliceList; raises TypeError/ValueError/KeyError/
        AttributeError on a malformed document."""
        if not isinstance(doc, dict) or not isinstance(doc.get("items"), list):
            raise ValueError("no items")
        found: dict[Member, Member] = {}
        for item in doc["items"]:
            if item.get("addressType", "IPv4") not in ("IPv4", "IPv6"):
                continue
            port = self._port
            if self._port_name:
                for p in item.get("ports") or ():
                    if p.get("name") == self._port_name and isinstance(p.get("port"), int):
                        port = p["port"]
                        break
            for endpoint in item.get("endpoints") or ():
                if (endpoint.get("conditions") or {}).get("ready") is False:
                    continue
                zone = endpoint.get("zone") or ""
                for address in endpoint.get("addresses") or ():
                    try:
                        host = ipaddress.ip_address(address).compressed
                    except ValueError:
                        continue
                    m = Member(host, port, zone=str(zone))
                    found.setdefault(m, m)
        return sorted(found.values())


def endpoint_slice_source(
    kubeconfig: str, namespace: str, service: str, port: int, *, port_name: str = ""
) -> EndpointSliceMembers:
    """The EndpointSlices source of the `[peers]` settings: credentials from `kubeconfig`
    (empty = in-cluster), loaded now. Blocking (reads files); raises KubeConfigError."""
    return EndpointSliceMembers(
        KubeApiConfig.load(kubeconfig), namespace, service, port, port_name=port_name
    )


def _named(doc: dict[str, Any], section: str, key: str, name: object, where: str) -> dict[str, Any]:
    """The `key` mapping of the entry of list `section` named `name` (kubeconfig layout)."""
    for entry in doc.get(section) or ():
        if isinstance(entry, dict) and entry.get("name") == name:
            value = entry.get(key) or {}
            if not isinstance(value, dict):
                raise KubeConfigError(f"{where}: {section} entry {name!r} is not a mapping")
            return value
    raise KubeConfigError(f"{where}: no {key} named {name!r} in {section}")


def _write_private(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _api_message(body: bytes) -> str:
    """`: <message>` of a Kubernetes Status answer (truncated), or nothing."""
    try:
        message = json.loads(body).get("message")
    except (ValueError, AttributeError):
        return ""
    if not isinstance(message, str) or not message:
        return ""
    return f": {_one_line(message)[:ERROR_BODY_CHARS]}"


def _describe(e: BaseException) -> str:
    """`Type: message` of a transport error, the message taken from the first exception in
    its chain that has one (httpx's TLS errors often have none of their own)."""
    cause: BaseException | None = e
    seen = 0
    while cause is not None and seen < 8:
        if text := _one_line(cause):
            return f"{type(e).__name__}: {text}"
        cause = cause.__cause__ or cause.__context__
        seen += 1
    return type(e).__name__


def _one_line(e: BaseException | str) -> str:
    return " ".join(str(e).split())
