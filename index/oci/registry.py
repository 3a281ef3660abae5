"""An OCI distribution client (httpx, synchronous) for the CLI and, through its seams, the daemon.

Policy lives here; bytes move through one `httpx.Client` per TLS configuration (or the
`transport` given, e.g. `httpx.MockTransport` in tests). Every endpoint list comes from
`hosts.toml` (mirrors first, upstream last, spec/containerd.md §6.4); auth from
`auth.Authenticator`; redirects are followed by hand so that the registry's `Authorization`
header never reaches blob storage, and the storage URL of each blob is cached for Range reads.

Errors are translated once, here: httpx exceptions become `TransportError`, HTTP statuses
become the `RegistryError` subclasses of `index.oci.errors`, always chained and naming the URL.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import ssl
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx

from index import gojson
from index.digest import Digest, DigestError
from index.oci import mediatypes
from index.oci.auth import Authenticator, TokenRequest, is_ecr_expired, repository_scope
from index.oci.descriptor import Descriptor
from index.oci.dockerconfig import CredentialProvider
from index.oci.errors import (
    DigestMismatchError,
    NotFoundError,
    RegistryError,
    TransportError,
    UnauthorizedError,
    UnexpectedResponseError,
)
from index.oci.hosts import (
    CAP_PULL,
    CAP_PUSH,
    CAP_REFERRERS,
    CAP_RESOLVE,
    HostsConfig,
    RegistryHost,
    hosts_from_dirs,
    needs_namespace_param,
)
from index.oci.reference import Reference
from index.oci.responses import (
    error_detail,
    index_entries,
    iter_raw,
    media_type_of,
    next_link,
    range_body,
    read_capped,
    referrer_descriptor,
    referrers_tag,
    status_error,
    subject_of,
)

__all__ = ["PushResult", "RegistryClient", "referrers_tag"]

log = logging.getLogger(__name__)

T = TypeVar("T")

USER_AGENT = "sociable/0.1"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
"""Manifests larger than this are refused (distribution's own limit)."""
DEFAULT_TIMEOUT_SEC = 60.0
DEFAULT_CHUNK_BYTES = 8 * 1024 * 1024
DEFAULT_MONOLITHIC_MAX_BYTES = 32 * 1024 * 1024
MAX_REDIRECTS = 5
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_IO_CHUNK = 1024 * 1024
PULL = ("pull",)
PUSH = ("pull", "push")


@dataclass(frozen=True, slots=True)
class PushResult:
    """What pushing a manifest did.

    `subject_indexed` is True when the registry answered `OCI-Subject` (it indexes referrers
    itself); `referrers_tag_updated` when this client updated the tag-schema index instead.
    """

    descriptor: Descriptor
    subject_indexed: bool = False
    referrers_tag_updated: bool = False


class RegistryClient:
    """A synchronous OCI distribution client. Close it (or use `with`) to release connections.

    `credentials` is asked per endpoint host (None = anonymous only). `hosts_dirs` are
    containerd `config_path` roots for `hosts.toml` (empty = no mirrors). `plain_http` forces
    http (True) or https (False) for registries without hosts.toml; None means http only for
    localhost/loopback. `skip_verify` disables TLS verification for those too. `transport`
    replaces the network (all requests go through it). Sizes are bytes, timeouts seconds.
    Safe to share between threads.
    """

    def __init__(
        self,
        *,
        credentials: CredentialProvider | None = None,
        hosts_dirs: Sequence[str | Path] = (),
        plain_http: bool | None = None,
        skip_verify: bool = False,
        transport: httpx.BaseTransport | None = None,
        timeout_sec: float = DEFAULT_TIMEOUT_SEC,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        monolithic_max_bytes: int = DEFAULT_MONOLITHIC_MAX_BYTES,
        user_agent: str = USER_AGENT,
    ) -> None:
        self.auth = Authenticator(credentials)
        self._hosts_dirs = list(hosts_dirs)
        self._plain_http = plain_http
        self._skip_verify = skip_verify
        self._transport = transport
        self._timeout = httpx.Timeout(timeout_sec)
        self.chunk_bytes = chunk_bytes
        self.monolithic_max_bytes = monolithic_max_bytes
        self._user_agent = user_agent
        self._lock = threading.Lock()
        self._clients: dict[tuple[Any, ...], httpx.Client] = {}
        self._hosts: dict[str, HostsConfig] = {}
        self._blob_urls: dict[tuple[str, str, str], httpx.URL] = {}

    def __repr__(self) -> str:
        return (
            f"<RegistryClient hosts_dirs={self._hosts_dirs} plain_http={self._plain_http} "
            f"clients={len(self._clients)} cached_blob_urls={len(self._blob_urls)}>"
        )

    def close(self) -> None:
        """Close every connection pool. Idempotent."""
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------------------------

    def hosts(self, registry: str) -> HostsConfig:
        """The endpoint configuration of `registry` (read once per client).

        Raises HostsConfigError for an invalid hosts.toml.
        """
        with self._lock:
            config = self._hosts.get(registry)
        if config is None:
            config = hosts_from_dirs(
                self._hosts_dirs,
                registry,
                plain_http=self._plain_http,
                skip_verify=self._skip_verify,
            )
            with self._lock:
                self._hosts[registry] = config
        return config

    def _client_for(self, ep: RegistryHost) -> httpx.Client:
        key: tuple[Any, ...] = (
            ("transport",) if self._transport else (ep.skip_verify, ep.ca, ep.client)
        )
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                if self._transport is not None:
                    client = httpx.Client(transport=self._transport, timeout=self._timeout)
                else:
                    client = httpx.Client(verify=self._ssl_context(ep), timeout=self._timeout)
                self._clients[key] = client
        return client

    @staticmethod
    def _ssl_context(ep: RegistryHost) -> ssl.SSLContext | bool:
        if ep.skip_verify:
            return False
        if not ep.ca and not ep.client:
            return True
        ctx = ssl.create_default_context()
        for ca in ep.ca:
            ctx.load_verify_locations(cafile=str(ca))
        for cert, key in ep.client:
            ctx.load_cert_chain(str(cert), str(key) if key else None)
        return ctx

    def _send(
        self,
        ep: RegistryHost,
        method: str,
        url: httpx.URL,
        headers: Mapping[str, str],
        content: bytes | None = None,
        *,
        stream: bool = False,
    ) -> httpx.Response:
        """One HTTP exchange. Raises TransportError when there is no answer."""
        client = self._client_for(ep)
        request = client.build_request(method, url, headers=dict(headers), content=content)
        try:
            return client.send(request, stream=stream)
        except httpx.HTTPError as e:
            raise TransportError(f"{method} {url}: {type(e).__name__}: {e}", url=str(url)) from e

    def _fetch_token(self, ep: RegistryHost) -> Callable[[TokenRequest], tuple[int, bytes]]:
        def fetch(request: TokenRequest) -> tuple[int, bytes]:
            headers = {"User-Agent": self._user_agent}
            url = httpx.URL(request.url)
            content = None
            if request.form is not None:
                content = httpx.QueryParams(list(request.form)).__str__().encode()
                headers["Content-Type"] = "application/x-www-form-urlencoded"
            else:
                url = url.copy_merge_params(httpx.QueryParams(list(request.params)))
            if request.basic is not None:
                user, secret = request.basic
                headers["Authorization"] = (
                    "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()
                )
            response = self._send(ep, request.method, url, headers, content)
            return response.status_code, response.content

        return fetch

    def _url(
        self, ep: RegistryHost, path: str, params: Mapping[str, str] | None = None
    ) -> httpx.URL:
        url = httpx.URL(ep.base_url + path)
        return url.copy_merge_params(params) if params else url

    def _request(
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

        Returns any final response (the caller checks the status). Raises UnauthorizedError
        when authentication fails, TransportError when there is no answer.
        """
        scopes = [repository_scope(repository, actions), *extra_scopes]
        base = {"User-Agent": self._user_agent}
        for name, values in ep.headers.items():
            base[name] = ", ".join(values)
        base.update(headers or {})
        response: httpx.Response | None = None
        for attempt in range(2):
            hdrs = dict(base)
            authorization = self.auth.authorization(ep.host, scopes, self._fetch_token(ep))
            if authorization:
                hdrs["Authorization"] = authorization
            response = self._send(ep, method, url, hdrs, content, stream=stream)
            status = response.status_code
            if status not in (401, 403):
                break
            body = response.read()
            response.close()
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
            response = self._follow(ep, method, response, base, stream=stream)
        return response

    def _follow(
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
            response.close()
            hdrs = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            response = self._send(
                ep, "HEAD" if method == "HEAD" else "GET", target, hdrs, stream=stream
            )
        raise UnexpectedResponseError(
            f"too many redirects from {response.url}", url=str(response.url)
        )

    def _each_endpoint(
        self, ref: Reference, capability: str, what: str, op: Callable[[RegistryHost], T]
    ) -> T:
        """Run `op` against each endpoint with `capability` until one succeeds.

        404 and other failures move on to the next endpoint; when all fail, the error of the
        last one (the upstream) is raised. Raises RegistryError when no endpoint qualifies.
        """
        endpoints = self.hosts(ref.registry).endpoints(capability)
        if not endpoints:
            raise RegistryError(
                f"{what}: no endpoint of {ref.registry} has capability {capability!r}"
            )
        last: RegistryError | None = None
        for ep in endpoints:
            try:
                return op(ep)
            except RegistryError as e:
                log.debug("%s via %s failed: %s", what, ep.base_url, e)
                last = e
        assert last is not None
        raise last

    def _pull_params(self, ep: RegistryHost, ref: Reference) -> dict[str, str]:
        return {"ns": ref.registry} if needs_namespace_param(ep.host, ref.registry) else {}

    # -- manifests ---------------------------------------------------------------------------

    def resolve(self, ref: Reference) -> Descriptor:
        """The descriptor a reference points at (tag defaults to `latest`).

        HEAD first; GET and hash when HEAD does not give digest, type and size. Raises
        NotFoundError, UnauthorizedError, DigestMismatchError, TransportError.
        """
        ref = ref.with_default_tag()
        capability = CAP_PULL if ref.digest else CAP_RESOLVE

        def op(ep: RegistryHost) -> Descriptor:
            url = self._url(
                ep, f"/{ref.repository}/manifests/{ref.object}", self._pull_params(ep, ref)
            )
            accept = {"Accept": ", ".join(mediatypes.MANIFEST_ACCEPT)}
            response = self._request(ep, ref.repository, "HEAD", url, headers=accept)
            response.close()
            if response.status_code == 404 and ref.digest:
                blob = self._url(
                    ep, f"/{ref.repository}/blobs/{ref.digest}", self._pull_params(ep, ref)
                )
                response = self._request(ep, ref.repository, "HEAD", blob, headers=accept)
                response.close()
            if response.is_success:
                raw = response.headers.get("docker-content-digest") or (
                    str(ref.digest) if ref.digest else ""
                )
                length = response.headers.get("content-length")
                media_type = media_type_of(response)
                if raw and length and media_type:
                    digest = self._check_digest(raw, ref, str(url))
                    return Descriptor(media_type, digest, int(length))
            elif response.status_code not in (405, 400):
                raise status_error(response, f"resolve {ref}")
            desc, _ = self._get_manifest_from(ep, ref, ref.digest)
            return desc

        return self._each_endpoint(ref, capability, f"resolve {ref}", op)

    @staticmethod
    def _check_digest(raw: str, ref: Reference, url: str) -> Digest:
        try:
            digest = Digest(raw)
        except DigestError as e:
            raise UnexpectedResponseError(
                f"{url}: bad Docker-Content-Digest {raw!r}", url=url
            ) from e
        if ref.digest and digest != ref.digest:
            raise DigestMismatchError(
                f"{url}: registry says {digest}, reference wants {ref.digest}", url=url
            )
        return digest

    def get_manifest(
        self,
        ref: Reference,
        digest: Digest | None = None,
        *,
        accept: Sequence[str] = mediatypes.MANIFEST_ACCEPT,
    ) -> tuple[Descriptor, bytes]:
        """Fetch a manifest or index by `digest`, else by the reference's digest or tag.

        Returns its descriptor (media type from Content-Type or the document) and exact bytes.
        Content fetched by digest is verified. Raises NotFoundError, DigestMismatchError,
        UnauthorizedError, TransportError, UnexpectedResponseError (too large, bad answer).
        """
        ref = ref.with_default_tag()
        capability = CAP_PULL if (digest or ref.digest) else CAP_RESOLVE
        return self._each_endpoint(
            ref,
            capability,
            f"get manifest {ref}",
            lambda ep: self._get_manifest_from(ep, ref, digest, accept),
        )

    def _get_manifest_from(
        self,
        ep: RegistryHost,
        ref: Reference,
        digest: Digest | None,
        accept: Sequence[str] = mediatypes.MANIFEST_ACCEPT,
        *,
        obj: str | None = None,
    ) -> tuple[Descriptor, bytes]:
        want = digest if obj else (digest or ref.digest)
        target = obj or (str(want) if want else ref.object)
        url = self._url(ep, f"/{ref.repository}/manifests/{target}", self._pull_params(ep, ref))
        response = self._request(
            ep, ref.repository, "GET", url, headers={"Accept": ", ".join(accept)}, stream=True
        )
        if not response.is_success:
            raise status_error(response, f"get manifest {ref.name}@{target}")
        data = read_capped(response, MAX_MANIFEST_BYTES, f"manifest {ref.name}@{target}")
        got = Digest.of(data)
        header = response.headers.get("docker-content-digest")
        expected = want or (Digest(header) if header and header.startswith("sha256:") else None)
        if expected and got != expected:
            raise DigestMismatchError(
                f"manifest {ref.name}@{target} from {url}: content hashes to {got}, expected {expected}",
                url=str(url),
            )
        media_type = media_type_of(response)
        if not media_type or media_type in (
            "application/json",
            "application/octet-stream",
            "text/plain",
        ):
            with contextlib.suppress(ValueError, AttributeError):
                media_type = str(json.loads(data).get("mediaType", "")) or media_type
        return Descriptor(media_type, got, len(data)), data

    def push_manifest(
        self,
        ref: Reference,
        data: bytes,
        media_type: str,
        *,
        tag: str | None = None,
        update_referrers_tag: bool = True,
    ) -> PushResult:
        """PUT a manifest (or index) by `tag` (default: the reference's tag) or by digest.

        If the manifest has a `subject` and the registry does not answer `OCI-Subject`, the
        tag-schema referrers index of the subject is updated (unless disabled). Raises
        UnauthorizedError, UnexpectedResponseError (rejected), TransportError.
        """
        desc = Descriptor.of(media_type, data)
        target = tag or ref.tag or str(desc.digest)

        def op(ep: RegistryHost) -> PushResult:
            url = self._url(ep, f"/{ref.repository}/manifests/{target}")
            response = self._request(
                ep,
                ref.repository,
                "PUT",
                url,
                actions=PUSH,
                headers={"Content-Type": media_type},
                content=data,
            )
            if not response.is_success:
                raise status_error(response, f"push manifest {ref.name}:{target}")
            returned = response.headers.get("docker-content-digest")
            if returned and returned != desc.digest:
                raise DigestMismatchError(
                    f"push manifest {ref.name}:{target}: registry stored {returned}, sent {desc.digest}",
                    url=str(url),
                )
            subject = subject_of(data)
            indexed = "oci-subject" in response.headers
            updated = False
            if subject is not None and not indexed and update_referrers_tag:
                updated = self._update_referrers_tag(
                    ep, ref, subject, referrer_descriptor(media_type, data)
                )
            return PushResult(desc, indexed, updated)

        return self._each_endpoint(ref, CAP_PUSH, f"push manifest {ref.name}:{target}", op)

    # -- referrers ---------------------------------------------------------------------------

    def referrers(
        self, ref: Reference, subject: Digest, artifact_type: str | None = None
    ) -> list[Descriptor]:
        """Descriptors of manifests whose `subject` is `subject`, optionally of one artifact type.

        Uses the referrers API; on 404 falls back to the `sha256-<hex>` tag schema (absent tag:
        no referrers). Filters on the client when the registry did not. Raises
        UnauthorizedError, TransportError, UnexpectedResponseError.
        """

        def op(ep: RegistryHost) -> list[Descriptor]:
            params = self._pull_params(ep, ref)
            if artifact_type:
                params["artifactType"] = artifact_type
            url: httpx.URL | None = self._url(ep, f"/{ref.repository}/referrers/{subject}", params)
            out: list[Descriptor] = []
            pages = 0
            while url is not None and pages < 100:
                pages += 1
                response = self._request(
                    ep,
                    ref.repository,
                    "GET",
                    url,
                    headers={"Accept": mediatypes.OCI_INDEX},
                    stream=True,
                )
                if response.status_code == 404 and pages == 1:
                    response.close()
                    return self._referrers_from_tag(ep, ref, subject, artifact_type)
                if not response.is_success:
                    raise status_error(response, f"referrers of {ref.name}@{subject}")
                data = read_capped(
                    response, MAX_MANIFEST_BYTES, f"referrers of {ref.name}@{subject}"
                )
                filtered = "artifacttype" in response.headers.get("oci-filters-applied", "").lower()
                out += index_entries(data, str(url), None if filtered else artifact_type)
                url = next_link(response)
            return out

        return self._each_endpoint(ref, CAP_REFERRERS, f"referrers of {ref.name}@{subject}", op)

    def _referrers_from_tag(
        self, ep: RegistryHost, ref: Reference, subject: Digest, artifact_type: str | None
    ) -> list[Descriptor]:
        tag = referrers_tag(subject)
        try:
            _, data = self._get_manifest_from(ep, ref, None, (mediatypes.OCI_INDEX,), obj=tag)
        except NotFoundError:
            return []
        return index_entries(data, f"{ep.base_url}/{ref.repository}/manifests/{tag}", artifact_type)

    def _update_referrers_tag(
        self, ep: RegistryHost, ref: Reference, subject: Digest, entry: Descriptor
    ) -> bool:
        """Add `entry` to the tag-schema index of `subject`; False if it was already there.

        Not atomic: two clients adding referrers to one subject at once can lose one.
        """
        tag = referrers_tag(subject)
        try:
            _, data = self._get_manifest_from(ep, ref, None, (mediatypes.OCI_INDEX,), obj=tag)
            entries = index_entries(data, tag, None)
        except NotFoundError:
            entries = []
        if any(d.digest == entry.digest for d in entries):
            return False
        index = {
            "schemaVersion": 2,
            "mediaType": mediatypes.OCI_INDEX,
            "manifests": [d.to_json() for d in [*entries, entry]],
        }
        body = gojson.marshal(index)
        url = self._url(ep, f"/{ref.repository}/manifests/{tag}")
        response = self._request(
            ep,
            ref.repository,
            "PUT",
            url,
            actions=PUSH,
            headers={"Content-Type": mediatypes.OCI_INDEX},
            content=body,
        )
        if not response.is_success:
            raise status_error(response, f"update referrers tag {ref.name}:{tag}")
        return True

    # -- blobs -------------------------------------------------------------------------------

    def head_blob(self, ref: Reference, digest: Digest) -> Descriptor:
        """Size of a blob (HEAD). Raises NotFoundError when absent, other RegistryErrors."""

        def op(ep: RegistryHost) -> Descriptor:
            url = self._url(ep, f"/{ref.repository}/blobs/{digest}", self._pull_params(ep, ref))
            response = self._request(ep, ref.repository, "HEAD", url)
            response.close()
            if not response.is_success:
                raise status_error(response, f"head blob {ref.name}@{digest}")
            length = response.headers.get("content-length")
            if length is None:
                raise UnexpectedResponseError(
                    f"head blob {ref.name}@{digest}: no Content-Length ({url})", url=str(url)
                )
            return Descriptor("application/octet-stream", digest, int(length))

        return self._each_endpoint(ref, CAP_PULL, f"head blob {ref.name}@{digest}", op)

    def blob_exists(self, ref: Reference, digest: Digest) -> bool:
        """True if the blob is in the repository (on any pull endpoint)."""
        try:
            self.head_blob(ref, digest)
        except NotFoundError:
            return False
        return True

    @contextlib.contextmanager
    def _open_blob(
        self, ep: RegistryHost, ref: Reference, digest: Digest, headers: Mapping[str, str]
    ) -> Iterator[httpx.Response]:
        url = self._url(ep, f"/{ref.repository}/blobs/{digest}", self._pull_params(ep, ref))
        response = self._request(ep, ref.repository, "GET", url, headers=headers, stream=True)
        try:
            yield response
        finally:
            response.close()

    def fetch_blob(
        self, ref: Reference, digest: Digest, dest: str | os.PathLike[str], size: int | None = None
    ) -> Descriptor:
        """Stream a blob into the file `dest` (replaced atomically), verified against `digest`.

        Nothing is left at `dest` on failure. Raises NotFoundError, DigestMismatchError,
        UnauthorizedError, TransportError.
        """
        dest_path = Path(dest)

        def op(ep: RegistryHost) -> Descriptor:
            fd, tmp = tempfile.mkstemp(prefix=f".{dest_path.name}.", dir=dest_path.parent)
            try:
                with os.fdopen(fd, "wb") as out:
                    got, count = self._copy_blob(ep, ref, digest, out.write)
                if got != digest or (size is not None and count != size):
                    raise DigestMismatchError(
                        f"blob {ref.name}@{digest} from {ep.base_url}: got {got} ({count} bytes)",
                        url=ep.base_url,
                    )
                os.replace(tmp, dest_path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            return Descriptor("application/octet-stream", digest, count)

        return self._each_endpoint(ref, CAP_PULL, f"fetch blob {ref.name}@{digest}", op)

    def read_blob(self, ref: Reference, digest: Digest, max_bytes: int = 64 * 1024 * 1024) -> bytes:
        """A whole blob in memory, verified. Raises as `fetch_blob`, and
        UnexpectedResponseError when it is larger than `max_bytes`."""

        def op(ep: RegistryHost) -> bytes:
            buf = bytearray()

            def sink(chunk: bytes) -> None:
                buf.extend(chunk)
                if len(buf) > max_bytes:
                    raise UnexpectedResponseError(
                        f"blob {ref.name}@{digest} is larger than {max_bytes} bytes"
                    )

            got, _ = self._copy_blob(ep, ref, digest, sink)
            if got != digest:
                raise DigestMismatchError(
                    f"blob {ref.name}@{digest} from {ep.base_url}: content hashes to {got}",
                    url=ep.base_url,
                )
            return bytes(buf)

        return self._each_endpoint(ref, CAP_PULL, f"read blob {ref.name}@{digest}", op)

    def _copy_blob(
        self, ep: RegistryHost, ref: Reference, digest: Digest, sink: Callable[[bytes], Any]
    ) -> tuple[Digest, int]:
        hasher = hashlib.sha256()
        count = 0
        with self._open_blob(ep, ref, digest, {"Accept-Encoding": "identity"}) as response:
            if not response.is_success:
                raise status_error(response, f"fetch blob {ref.name}@{digest}")
            try:
                for chunk in iter_raw(response):
                    hasher.update(chunk)
                    sink(chunk)
                    count += len(chunk)
            except httpx.HTTPError as e:
                raise TransportError(
                    f"fetch blob {ref.name}@{digest}: reading {response.url}: {e}",
                    url=str(response.url),
                ) from e
        return Digest.from_hasher(hasher), count

    def fetch_blob_range(
        self,
        ref: Reference,
        digest: Digest,
        offset: int,
        length: int,
        *,
        check: Callable[[bytes], None] | None = None,
    ) -> bytes:
        """`length` bytes of a blob from byte `offset` (fewer only at the end of the blob).

        Uses `Range: bytes=offset-(offset+length-1)`; a 200 answer (range ignored) is sliced.
        The storage URL a registry redirects to is cached per blob and re-resolved through the
        registry once when it answers 400/401/403. The bytes are NOT verified here; `check`
        (e.g. against zTOC span digests) runs on each endpoint's answer and raises
        DigestMismatchError to reject it, which moves on to the next endpoint (mirror). Raises
        RangeNotSatisfiableError (416, or a mismatching Content-Range), NotFoundError,
        UnauthorizedError, TransportError, DigestMismatchError.
        """
        if offset < 0 or length <= 0:
            raise ValueError(f"bad range offset={offset} length={length}")
        headers = {"Range": f"bytes={offset}-{offset + length - 1}", "Accept-Encoding": "identity"}
        key = (ref.registry, ref.repository, str(digest))

        def checked(data: bytes) -> bytes:
            if check is not None:
                check(data)
            return data

        def op(ep: RegistryHost) -> bytes:
            with self._lock:
                cached = self._blob_urls.get(key)
            if cached is not None:
                hdrs = {"User-Agent": self._user_agent, **headers}
                response = self._send(ep, "GET", cached, hdrs, stream=True)
                if response.status_code in (400, 401, 403):
                    response.close()
                    log.debug(
                        "cached storage URL of %s expired (HTTP %d)", digest, response.status_code
                    )
                    with self._lock:
                        self._blob_urls.pop(key, None)
                else:
                    return checked(range_body(response, ref, digest, offset, length))
            with self._open_blob(ep, ref, digest, headers) as response:
                redirected = (
                    response.url.path != self._url(ep, f"/{ref.repository}/blobs/{digest}").path
                )
                if response.is_success and redirected:
                    with self._lock:
                        self._blob_urls[key] = response.url
                return checked(range_body(response, ref, digest, offset, length))

        return self._each_endpoint(ref, CAP_PULL, f"read range of blob {ref.name}@{digest}", op)

    def push_blob(
        self,
        ref: Reference,
        source: bytes | str | os.PathLike[str],
        media_type: str = "application/octet-stream",
        *,
        mount_from: str | None = None,
    ) -> Descriptor:
        """Upload a blob (bytes or a file) unless the repository already has it.

        Small blobs go in one POST+PUT; larger than `monolithic_max_bytes` in PATCH chunks of
        `chunk_bytes`. `mount_from` names a repository on the same registry to mount from.
        Raises UnauthorizedError, UnexpectedResponseError, TransportError, DigestMismatchError.
        """
        path = None if isinstance(source, bytes) else Path(source)
        if path is None:
            assert isinstance(source, bytes)
            digest, size = Digest.of(source), len(source)
        else:
            digest, size = self._hash_file(path)
        desc = Descriptor(media_type, digest, size)

        def op(ep: RegistryHost) -> Descriptor:
            # Existence is checked on the push endpoint itself, never on a pull-only mirror.
            head = self._url(ep, f"/{ref.repository}/blobs/{digest}")
            response = self._request(ep, ref.repository, "HEAD", head, actions=PUSH)
            response.close()
            if response.is_success:
                return desc
            extra = [repository_scope(mount_from, PULL)] if mount_from else []
            params = {"mount": str(digest), "from": mount_from} if mount_from else None
            url = self._url(ep, f"/{ref.repository}/blobs/uploads/", params)
            response = self._request(
                ep,
                ref.repository,
                "POST",
                url,
                actions=PUSH,
                extra_scopes=extra,
                content=b"",
                follow=False,
            )
            if response.status_code == 201 and mount_from:
                return desc
            if response.status_code != 202 or "location" not in response.headers:
                raise status_error(response, f"start upload of {digest} to {ref.name}")
            location = response.url.join(response.headers["location"])
            if size <= self.monolithic_max_bytes:
                data = source if isinstance(source, bytes) else Path(source).read_bytes()
                self._finish_upload(ep, ref, location, digest, data)
                return desc
            assert path is not None
            with path.open("rb") as f:
                start = 0
                while chunk := f.read(self.chunk_bytes):
                    headers = {
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{start}-{start + len(chunk) - 1}",
                    }
                    response = self._request(
                        ep,
                        ref.repository,
                        "PATCH",
                        location,
                        actions=PUSH,
                        headers=headers,
                        content=chunk,
                        follow=False,
                    )
                    if response.status_code != 202 or "location" not in response.headers:
                        raise status_error(
                            response, f"upload chunk at {start} of {digest} to {ref.name}"
                        )
                    location = response.url.join(response.headers["location"])
                    start += len(chunk)
            self._finish_upload(ep, ref, location, digest, b"")
            return desc

        return self._each_endpoint(ref, CAP_PUSH, f"push blob {ref.name}@{digest}", op)

    def _finish_upload(
        self, ep: RegistryHost, ref: Reference, location: httpx.URL, digest: Digest, data: bytes
    ) -> None:
        url = location.copy_merge_params({"digest": str(digest)})
        response = self._request(
            ep,
            ref.repository,
            "PUT",
            url,
            actions=PUSH,
            headers={"Content-Type": "application/octet-stream"},
            content=data,
            follow=False,
        )
        if response.status_code not in (201, 204):
            raise status_error(response, f"finish upload of {digest} to {ref.name}")

    @staticmethod
    def _hash_file(path: Path) -> tuple[Digest, int]:
        hasher = hashlib.sha256()
        size = 0
        with path.open("rb") as f:
            while chunk := f.read(_IO_CHUNK):
                hasher.update(chunk)
                size += len(chunk)
        return Digest.from_hasher(hasher), size
