"""The registry session: where requests go, how they authenticate, and what they remember.

One `RegistrySession` per client. It owns:

- the endpoint lists (`hosts.toml` mirrors first, the upstream last), through `HostsCache`,
  re-read when the files change;
- one `httpx.AsyncClient` per TLS configuration (CA files, client certificates,
  skip_verify), at most `MAX_CLIENTS`; a CA or client certificate file that cannot be loaded
  is a `HostsConfigError` naming the file and the host, raised when that endpoint is used
  (so `each_endpoint` moves on to the next one);
- authentication (`auth.Authenticator`, tokens fetched through the same endpoint's client);
- redirects, followed by hand so that the registry's `Authorization` header never reaches
  blob storage;
- the blob-location cache: the storage URL a registry redirected a blob GET to, per
  (endpoint base URL, repository, digest), at most `LOCATION_CACHE_ENTRIES` entries, each
  kept `LOCATION_TTL_SEC` (presigned URLs expire). Readers drop an entry on any failure
  through it.

httpx exceptions (and `OSError`) become `TransportError` here, once, chained and naming the
URL. The session is used from one event loop (asyncio or trio: httpx picks the running one).
"""

from __future__ import annotations

import base64
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import httpx

from index.oci.auth import Authenticator, TokenRequest, is_ecr_expired, repository_scope
from index.oci.dockerconfig import CredentialProvider
from index.oci.errors import (
    HostsConfigError,
    RegistryError,
    TransportError,
    UnauthorizedError,
    UnexpectedResponseError,
)
from index.oci.hosts import HostsConfig, RegistryHost, needs_namespace_param
from index.oci.hostscache import DEFAULT_RECHECK_SEC, HostsCache
from index.oci.lru import TtlLru
from index.oci.reference import Reference
from index.oci.responses import error_detail, read_and_close

log = logging.getLogger(__name__)

T = TypeVar("T")

USER_AGENT = "sociable/0.1"
DEFAULT_TIMEOUT_SEC = 60.0
MAX_REDIRECTS = 5
MAX_CLIENTS = 16
"""Connection pools (one per TLS configuration) kept open at once."""
LOCATION_CACHE_ENTRIES = 1024
LOCATION_TTL_SEC = 600.0
PULL = ("pull",)
PUSH = ("pull", "push")
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

LocationKey = tuple[str, str, str]
"""(endpoint base URL, repository, digest) of a cached blob location."""


def ssl_context(ep: RegistryHost) -> ssl.SSLContext | bool:
    """The `verify` argument for `ep`: False (skip_verify), True (system CAs) or a context.

    Raises HostsConfigError naming the file and the host when a CA or client certificate
    file cannot be loaded.
    """
    if ep.skip_verify:
        return False
    if not ep.ca and not ep.client:
        return True
    where = str(ep.source) if ep.source else "registry certificate directory"
    ctx = ssl.create_default_context()
    for ca in ep.ca:
        try:
            ctx.load_verify_locations(cafile=str(ca))
        except (OSError, ssl.SSLError) as e:
            reason = e.strerror or str(e) if isinstance(e, OSError) else str(e)
            raise HostsConfigError(
                f"{where}: ca file {ca} of host {ep.host} cannot be loaded: {reason}"
            ) from e
    for cert, key in ep.client:
        try:
            ctx.load_cert_chain(str(cert), str(key) if key else None)
        except (OSError, ssl.SSLError) as e:
            reason = e.strerror or str(e) if isinstance(e, OSError) else str(e)
            raise HostsConfigError(
                f"{where}: client certificate {cert} of host {ep.host} cannot be loaded: {reason}"
            ) from e
    return ctx


class RegistrySession:
    """Endpoints, connection pools, auth, redirects and blob locations (see the module doc).

    Close with `await aclose()`. `transport` replaces the network for every endpoint (tests);
    it is closed with the session.
    `clock` is monotonic seconds (location TTLs, hosts re-check interval).
    """

    def __init__(
        self,
        *,
        credentials: CredentialProvider | None = None,
        hosts_dirs: Sequence[str | Path] = (),
        plain_http: bool | None = None,
        skip_verify: bool = False,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout_sec: float = DEFAULT_TIMEOUT_SEC,
        user_agent: str = USER_AGENT,
        hosts_recheck_sec: float = DEFAULT_RECHECK_SEC,
        location_ttl_sec: float = LOCATION_TTL_SEC,
        clock: Callable[[], float] = time.monotonic,
        skip_mirrors: Collection[str] = (),
    ) -> None:
        self.auth = Authenticator(credentials)
        self.hosts_cache = HostsCache(
            hosts_dirs,
            plain_http=plain_http,
            skip_verify=skip_verify,
            recheck_sec=hosts_recheck_sec,
            clock=clock,
            skip_mirrors=skip_mirrors,
        )
        self.user_agent = user_agent
        self._transport = transport
        self._timeout = httpx.Timeout(timeout_sec)
        self._clients: TtlLru[tuple[object, ...], httpx.AsyncClient] = TtlLru(MAX_CLIENTS)
        self._retired: list[httpx.AsyncClient] = []
        self.locations: TtlLru[LocationKey, httpx.URL] = TtlLru(
            LOCATION_CACHE_ENTRIES, location_ttl_sec, clock=clock
        )
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"<RegistrySession {self.hosts_cache!r} clients={len(self._clients)} "
            f"locations={len(self.locations)}>"
        )

    async def aclose(self) -> None:
        """Close every connection pool. Idempotent."""
        self._closed = True
        clients = self._clients.clear() + self._retired
        self._retired = []
        for client in clients:
            await client.aclose()

    def hosts(self, registry: str) -> HostsConfig:
        """The current endpoint configuration of `registry`. Raises HostsConfigError."""
        return self.hosts_cache.get(registry)

    async def _client_for(self, ep: RegistryHost) -> httpx.AsyncClient:
        """The pool for `ep`'s TLS configuration. Raises HostsConfigError (bad cert files)."""
        if self._closed:
            raise TransportError("the registry client is closed")
        tls = ep.scheme == "https"
        key: tuple[object, ...] = (ep.skip_verify, ep.ca, ep.client) if tls else ("http",)
        client = self._clients.get(key)
        if client is None:
            # The certificate files are loaded even when a test transport replaces the
            # network, so a bad hosts.toml fails the same way with and without one.
            verify = ssl_context(ep) if tls else True
            if self._transport is not None:
                client = httpx.AsyncClient(
                    transport=self._transport, verify=verify, timeout=self._timeout
                )
            else:
                client = httpx.AsyncClient(verify=verify, timeout=self._timeout)
            # An evicted pool may still serve a streaming response: close it one eviction later.
            for old in self._retired:
                await old.aclose()
            self._retired = self._clients.put(key, client)
        return client

    async def send(
        self,
        ep: RegistryHost,
        method: str,
        url: httpx.URL,
        headers: Mapping[str, str],
        content: bytes | None = None,
        *,
        stream: bool = False,
    ) -> httpx.Response:
        """One HTTP exchange. Raises TransportError when there is no answer, HostsConfigError
        when the endpoint's certificate files cannot be loaded."""
        client = await self._client_for(ep)
        request = client.build_request(method, url, headers=dict(headers), content=content)
        try:
            return await client.send(request, stream=stream)
        except (httpx.HTTPError, OSError) as e:
            raise TransportError(f"{method} {url}: {type(e).__name__}: {e}", url=str(url)) from e

    def _fetch_token(
        self, ep: RegistryHost
    ) -> Callable[[TokenRequest], Awaitable[tuple[int, bytes]]]:
        async def fetch(request: TokenRequest) -> tuple[int, bytes]:
            headers = {"User-Agent": self.user_agent}
            url = httpx.URL(request.url)
            content = None
            if request.form is not None:
                content = str(httpx.QueryParams(list(request.form))).encode()
                headers["Content-Type"] = "application/x-www-form-urlencoded"
            else:
                url = url.copy_merge_params(httpx.QueryParams(list(request.params)))
            if request.basic is not None:
                user, secret = request.basic
                headers["Authorization"] = (
                    "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()
                )
            response = await self.send(ep, request.method, url, headers, content)
            return response.status_code, response.content

        return fetch

    @staticmethod
    def url(ep: RegistryHost, path: str, params: Mapping[str, str] | None = None) -> httpx.URL:
        url = httpx.URL(ep.base_url + path)
        return url.copy_merge_params(params) if params else url

    @staticmethod
    def pull_params(ep: RegistryHost, ref: Reference) -> dict[str, str]:
        """`?ns=<registry>` for a mirror serving another registry's namespace."""
        return {"ns": ref.registry} if needs_namespace_param(ep.host, ref.registry) else {}

    def base_headers(self, ep: RegistryHost) -> dict[str, str]:
        out = {"User-Agent": self.user_agent}
        for name, values in ep.headers.items():
            out[name] = ", ".join(values)
        return out

    async def request(
        self,
        ep: RegistryHost,
        repository: str,
        method: str,
        url: httpx.URL,
        *,
        actions: Sequence[str] = PULL,
        extra_scopes: Sequence[str] = (),
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
        stream: bool = False,
        follow: bool = True,
    ) -> httpx.Response:
        """Send with auth (retrying once after a challenge) and follow redirects by hand.

        Returns any final response (the caller checks the status and closes it). Raises
        UnauthorizedError when authentication fails, TransportError when there is no answer.
        """
        scopes = [repository_scope(repository, actions), *extra_scopes]
        base = self.base_headers(ep)
        base.update(headers or {})
        response: httpx.Response | None = None
        for attempt in range(2):
            hdrs = dict(base)
            authorization = await self.auth.authorization(ep.host, scopes, self._fetch_token(ep))
            if authorization:
                hdrs["Authorization"] = authorization
            response = await self.send(ep, method, url, hdrs, content, stream=stream)
            status = response.status_code
            if status not in (401, 403):
                break
            body = await read_and_close(response)
            ecr = is_ecr_expired(status, body)
            if status == 403 and not ecr:
                break
            challenges = response.headers.get_list("www-authenticate")
            if attempt == 0 and self.auth.on_unauthorized(
                ep.host, challenges, scopes, ecr_expired=ecr
            ):
                continue
            raise UnauthorizedError(
                f"{method} {url}: HTTP {status} {error_detail(body)} "
                f"({'credentials rejected' if authorization else 'no usable challenge or credentials'})",
                url=str(url),
                status=status,
            )
        assert response is not None
        if follow:
            response = await self._follow(ep, method, response, base, stream=stream)
        return response

    async def _follow(
        self,
        ep: RegistryHost,
        method: str,
        response: httpx.Response,
        headers: Mapping[str, str],
        *,
        stream: bool,
    ) -> httpx.Response:
        """Follow 3xx answers by hand, never sending the registry's Authorization onwards.

        Redirect targets (blob storage, CDNs, presigned URLs) carry their own auth; S3 rejects
        a request with a second auth mechanism, so the header is dropped even on the same host.
        """
        for _ in range(MAX_REDIRECTS):
            if response.status_code not in _REDIRECT_STATUSES or "location" not in response.headers:
                return response
            target = response.url.join(response.headers["location"])
            await response.aclose()
            hdrs = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            response = await self.send(
                ep, "HEAD" if method == "HEAD" else "GET", target, hdrs, stream=stream
            )
        await response.aclose()
        raise UnexpectedResponseError(
            f"too many redirects from {response.url}", url=str(response.url)
        )

    async def each_endpoint(
        self,
        ref: Reference,
        capability: str,
        what: str,
        op: Callable[[RegistryHost], Awaitable[T]],
    ) -> T:
        """Run `op` against each endpoint with `capability` until one succeeds.

        A RegistryError (404 included) or HostsConfigError (the endpoint's certificate files)
        moves on to the next endpoint; when all fail, the error of the last one (the upstream)
        is raised. Raises RegistryError when no endpoint qualifies, HostsConfigError for an
        invalid hosts.toml.
        """
        endpoints = self.hosts(ref.registry).endpoints(capability)
        if not endpoints:
            raise RegistryError(
                f"{what}: no endpoint of {ref.registry} has capability {capability!r}"
            )
        last: RegistryError | HostsConfigError | None = None
        for ep in endpoints:
            try:
                return await op(ep)
            except (RegistryError, HostsConfigError) as e:
                log.debug("%s via %s failed: %s", what, ep.base_url, e)
                last = e
        assert last is not None
        raise last
