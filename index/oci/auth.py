"""Registry authentication: challenges, the Docker token flow, and a per-host token cache.

The pieces here do no I/O themselves: `Authenticator` is handed an async `fetch` callable that
sends one `TokenRequest` and returns `(status, body)` (the registry session owns the network),
so the policy stays pure and testable:

1. requests go out without auth until a host answers 401 with `WWW-Authenticate`;
2. for a `Bearer` challenge a token is requested for the host + scope set: with credentials,
   first an OAuth2 POST (`grant_type=password` or `refresh_token`), falling back on
   400/401/404/405 to a GET with HTTP Basic; anonymously, a plain GET;
3. tokens are cached per (host, scopes) until `expires_in` (default 60 s) runs out, and dropped
   on a 401; when the token server refuses credentials from a per-repository source (401),
   the source is told to renew them and the token is asked once more with the new ones;
   a `Basic` challenge sends the credentials on every request; credentials with a
   pre-issued `registry_token` answer a `Bearer` challenge with it directly (no token server)
   and cannot answer a `Basic` one;
4. ECR's 403 "Your authorization token has expired" counts as a 401 with a Basic challenge.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from index.oci.dockerconfig import CredentialProvider, Credentials, RepositoryCredentialProvider
from index.oci.errors import UnauthorizedError

DEFAULT_TOKEN_LIFETIME_SEC = 60
"""Token lifetime when the token server does not say (Docker token spec)."""
MIN_TOKEN_REUSE_SEC = 5
"""A token closer than this to expiry is not reused."""
CLIENT_ID = "sociable"
ECR_EXPIRED_MESSAGE = "Your authorization token has expired"

_TOKEN_RE = re.compile(r"\s*([!#$%&\'*+\-.^_`|~0-9A-Za-z]+)\s*")
_PARAM_RE = re.compile(
    r'\s*([!#$%&\'*+\-.^_`|~0-9A-Za-z]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*'
)


@dataclass(frozen=True, slots=True)
class Challenge:
    """One `WWW-Authenticate` challenge; `scheme` is lowercase (`bearer`, `basic`)."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict)


def parse_challenges(values: Iterable[str]) -> list[Challenge]:
    """Parse every challenge in the given `WWW-Authenticate` header values.

    Malformed trailing text is ignored (registries are not always strict).
    """
    parsed: list[tuple[str, dict[str, str]]] = []
    for value in values:
        pos = 0
        params: dict[str, str] | None = None
        while pos < len(value):
            if value[pos] in ", ":
                pos += 1
                continue
            param = _PARAM_RE.match(value, pos)
            if param and params is not None:
                raw = param.group(2)
                params[param.group(1).lower()] = (
                    re.sub(r"\\(.)", r"\1", raw) if raw is not None else param.group(3)
                )
                pos = param.end()
                continue
            tok = _TOKEN_RE.match(value, pos)
            if not tok:
                break
            params = {}
            parsed.append((tok.group(1).lower(), params))
            pos = tok.end()
    return [Challenge(scheme, params) for scheme, params in parsed]


def is_ecr_expired(status: int, body: bytes) -> bool:
    """True for ECR's 403 that means an expired token (treat as 401)."""
    return status == 403 and ECR_EXPIRED_MESSAGE.encode() in body


def ecr_challenge(host: str) -> Challenge:
    """The Basic challenge assumed for an ECR expired-token 403."""
    return Challenge("basic", {"realm": f"https://{host}/", "service": "ecr.amazonaws.com"})


def repository_scope(repository: str, actions: Sequence[str]) -> str:
    """`repository:<repo>:<a,b>`."""
    return f"repository:{repository}:{','.join(actions)}"


@dataclass(frozen=True, slots=True)
class TokenRequest:
    """One request to a token server. `form` set means POST form-encoded, else GET `params`."""

    url: str
    params: tuple[tuple[str, str], ...] = ()
    form: tuple[tuple[str, str], ...] | None = None
    basic: tuple[str, str] | None = None

    @property
    def method(self) -> str:
        return "POST" if self.form is not None else "GET"

    def __repr__(self) -> str:
        return f"TokenRequest({self.method} {self.url}, basic={'yes' if self.basic else 'no'})"


@dataclass(frozen=True, slots=True)
class Token:
    """A bearer token and when it stops being reused (monotonic seconds)."""

    value: str
    expires_at: float
    refresh_token: str = ""

    def __repr__(self) -> str:
        return f"Token(***, expires_at={self.expires_at:.0f})"


def token_requests(
    challenge: Challenge, scopes: Sequence[str], creds: Credentials | None
) -> list[TokenRequest]:
    """The token requests to try in order for a Bearer `challenge`.

    Raises UnauthorizedError when the challenge has no realm.
    """
    realm = challenge.params.get("realm", "")
    if not realm:
        raise UnauthorizedError(f"bearer challenge without realm: {dict(challenge.params)!r}")
    service = challenge.params.get("service", "")
    get_params: list[tuple[str, str]] = []
    if service:
        get_params.append(("service", service))
    get_params += [("scope", s) for s in scopes]
    if creds is None or creds.empty:
        return [TokenRequest(realm, tuple(get_params))]
    form: list[tuple[str, str]] = []
    if creds.identity_token:
        form += [("grant_type", "refresh_token"), ("refresh_token", creds.identity_token)]
    else:
        form += [
            ("grant_type", "password"),
            ("username", creds.username),
            ("password", creds.secret),
        ]
    if service:
        form.append(("service", service))
    form += [("scope", " ".join(scopes)), ("client_id", CLIENT_ID)]
    out = [TokenRequest(realm, form=tuple(form))]
    if creds.username:
        out.append(TokenRequest(realm, tuple(get_params), basic=(creds.username, creds.secret)))
    return out


def parse_token_response(body: bytes, now: float) -> Token:
    """Parse a token server answer (`token` or `access_token`, `expires_in`).

    Raises UnauthorizedError when the body has no token.
    """
    try:
        doc = json.loads(body)
    except ValueError as e:
        raise UnauthorizedError("token server answered with invalid JSON") from e
    if not isinstance(doc, dict):
        raise UnauthorizedError("token server answer is not a JSON object")
    value = doc.get("access_token") or doc.get("token")
    if not isinstance(value, str) or not value:
        raise UnauthorizedError("token server answer has no token")
    expires_in = doc.get("expires_in")
    if not isinstance(expires_in, int) or expires_in <= 0:
        expires_in = DEFAULT_TOKEN_LIFETIME_SEC
    return Token(
        value,
        now + expires_in - min(MIN_TOKEN_REUSE_SEC, expires_in / 2),
        str(doc.get("refresh_token", "")),
    )


FetchToken = Callable[[TokenRequest], Awaitable[tuple[int, bytes]]]
"""Sends a token request; returns (HTTP status, body). Raises RegistryError on no answer."""


def _basic(username: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{secret}".encode()).decode("ascii")


def _repository_of(scopes: Sequence[str]) -> str:
    """The repository of the first `repository:<name>:<actions>` scope, "" when none."""
    for scope in scopes:
        kind, _, rest = scope.partition(":")
        if kind == "repository" and ":" in rest:
            return rest.rpartition(":")[0]
    return ""


class Authenticator:
    """Per-client auth state: the last challenge of each host and cached bearer tokens.

    Safe to share between tasks and threads (its state is behind a lock never held across an
    await). `credentials` is asked per endpoint host; None means anonymous. Two tasks missing
    the same token at once may both fetch one; the last one stored wins.
    """

    def __init__(
        self,
        credentials: CredentialProvider | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._credentials = credentials
        self._clock = clock
        self._lock = threading.Lock()
        self._challenges: dict[str, Challenge] = {}
        self._tokens: dict[tuple[str, str], Token] = {}

    def __repr__(self) -> str:
        return f"<Authenticator hosts={sorted(self._challenges)} tokens={len(self._tokens)}>"

    def credentials_for(self, host: str) -> Credentials | None:
        if self._credentials is None:
            return None
        return self._credentials.credentials(host)

    async def _lookup(self, host: str, scopes: Sequence[str]) -> Credentials | None:
        """Credentials for `host`; per repository (the first `repository:` scope) when the
        source can answer per repository."""
        source = self._credentials
        if isinstance(source, RepositoryCredentialProvider):
            repository = _repository_of(scopes)
            if repository:
                return await source.for_repository(host, repository)
        return self.credentials_for(host)

    @staticmethod
    def _key(host: str, scopes: Sequence[str]) -> tuple[str, str]:
        return host, " ".join(sorted(set(scopes)))

    def _scopes(self, challenge: Challenge, scopes: Sequence[str]) -> list[str]:
        extra = challenge.params.get("scope", "")
        return sorted(set(scopes) | set(extra.split()))

    async def authorization(
        self, host: str, scopes: Sequence[str], fetch: FetchToken
    ) -> str | None:
        """The `Authorization` header value for a request to `host`, or None (anonymous).

        May request a token through `fetch`. Raises UnauthorizedError when a Basic challenge
        has no credentials or the token server refuses every attempt; CredentialsError from a
        failing credential source.
        """
        with self._lock:
            challenge = self._challenges.get(host)
        if challenge is None:
            return None
        creds = await self._lookup(host, scopes)
        if challenge.scheme == "basic":
            if creds is not None and creds.registry_token and not creds.username:
                raise UnauthorizedError(
                    f"{host} requires basic auth and only a registry token is configured"
                )
            if creds is None or not creds.username:
                raise UnauthorizedError(
                    f"{host} requires basic auth and no credentials are configured"
                )
            return _basic(creds.username, creds.secret)
        if creds is not None and creds.registry_token:
            return "Bearer " + creds.registry_token
        all_scopes = self._scopes(challenge, scopes)
        key = self._key(host, all_scopes)
        now = self._clock()
        with self._lock:
            token = self._tokens.get(key)
        if token is None or token.expires_at <= now:
            try:
                token = await self._fetch_token(host, challenge, all_scopes, creds, fetch)
            except UnauthorizedError as e:
                fresh = await self._renewed(host, scopes, creds, e)
                token = await self._fetch_token(host, challenge, all_scopes, fresh, fetch)
            with self._lock:
                self._tokens[key] = token
        return "Bearer " + token.value

    async def _renewed(
        self,
        host: str,
        scopes: Sequence[str],
        creds: Credentials | None,
        refusal: UnauthorizedError,
    ) -> Credentials:
        """After the token server refused `creds` with 401: fresh credentials from a
        per-repository source (a provider's password may have expired or been revoked before
        its answer's cache ran out), or re-raise `refusal` when there are none different."""
        source = self._credentials
        repository = _repository_of(scopes)
        if (
            creds is None
            or refusal.status != 401
            or not repository
            or not isinstance(source, RepositoryCredentialProvider)
        ):
            raise refusal
        source.invalidate(host, repository)
        fresh = await source.for_repository(host, repository)
        if fresh is None or fresh == creds:
            raise refusal
        return fresh

    async def _fetch_token(
        self,
        host: str,
        challenge: Challenge,
        scopes: Sequence[str],
        creds: Credentials | None,
        fetch: FetchToken,
    ) -> Token:
        requests = token_requests(challenge, scopes, creds)
        status, body = 0, b""
        for i, request in enumerate(requests):
            status, body = await fetch(request)
            if 200 <= status < 300:
                return parse_token_response(body, self._clock())
            last = i == len(requests) - 1
            if not last and request.form is not None and status in (400, 401, 404, 405):
                continue
            break
        detail = body[:200].decode(errors="replace")
        raise UnauthorizedError(
            f"token server {challenge.params.get('realm')} refused a token for {host} "
            f"scope {' '.join(scopes)!r}: HTTP {status} {detail}",
            status=status,
        )

    def on_unauthorized(
        self,
        host: str,
        www_authenticate: Sequence[str],
        scopes: Sequence[str],
        *,
        ecr_expired: bool = False,
    ) -> bool:
        """Learn from a 401 (or ECR expired 403) answer; True if a retry can succeed.

        Drops the cached token for (host, scopes) so the retry fetches a new one; when there
        was one (what we sent was refused, not a first challenge), tells a per-repository
        credential source to obtain fresh credentials (a provider's token may have expired).
        """
        challenges = parse_challenges(www_authenticate)
        if ecr_expired and not challenges:
            challenges = [ecr_challenge(host)]
        chosen = next((c for c in challenges if c.scheme == "bearer"), None) or next(
            (c for c in challenges if c.scheme == "basic"), None
        )
        if chosen is None:
            return False
        with self._lock:
            known = self._challenges.get(host)
            self._challenges[host] = chosen
            key = self._key(host, self._scopes(chosen, scopes))
            refused = self._tokens.pop(key, None) is not None or (
                known is not None and known.scheme == "basic"
            )
        repository = _repository_of(scopes)
        if refused and repository and isinstance(self._credentials, RepositoryCredentialProvider):
            self._credentials.invalidate(host, repository)
        return True
