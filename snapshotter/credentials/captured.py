"""Registry credentials captured from kubelet's CRI `PullImage` calls, kept per repository.

kubelet sends the credentials of a pod's imagePullSecrets (or of a credential provider) with
every `PullImage`; the CRI image-service proxy (`snapshotter.cri.proxy`) hands them to
`CapturedCredentials.capture` before forwarding the call to containerd, so that lazy reads of
the same image later can authenticate like the pull did.

Entries are keyed by (registry host, repository) of the normalised image reference
(`docker.io`, `library/busybox`). Each has a capture time and an expiry:

- a registry or identity token that is a JWT with an `exp` claim expires then (capped at
  `DEFAULT_TTL_SEC` after capture);
- anything else (user and password, `auth`, opaque tokens) has no expiry kubelet tells us, so
  it is kept `DEFAULT_TTL_SEC` (12 h, the lifetime of the shortest-lived common registry
  passwords, such as ECR's) after its capture. kubelet sends fresh credentials with each pull,
  and each capture restarts the clock.

Expired entries are never returned and are dropped at the next write. The daemon also
`forget`s a repository's entry when the last lazy layer of that repository is unmounted
(the image's last snapshot removed). The store is persisted
to one root-only JSON file (`<root>/credentials/cri.json`: directory 0700, file 0600, replaced
atomically) and loaded when opened, so a restarted daemon keeps what kubelet sent before.

Secrets never appear in a `repr`, an exception or a log line: `Credential.__repr__` shows the
kinds present, not their values.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from index.fsutil import atomic_write
from index.oci.errors import InvalidReferenceError
from index.oci.reference import parse_reference

log = logging.getLogger(__name__)

DEFAULT_TTL_SEC = 12 * 60 * 60
"""How long a credential without a known expiry is kept after its capture (12 h)."""

FILE_VERSION = 1
"""The `version` of the JSON file; a file with another version is ignored (logged)."""

SECRET_FIELDS = ("username", "password", "auth", "identity_token", "registry_token")


_PATH_LOCKS: dict[Path, threading.Lock] = {}
_PATH_LOCKS_LOCK = threading.Lock()


def _path_lock(path: Path) -> threading.Lock:
    """One lock per file for every instance of this process (the CRI proxy's and the
    keychain's), so that one's write cannot undo another's."""
    key = path.absolute()
    with _PATH_LOCKS_LOCK:
        return _PATH_LOCKS.setdefault(key, threading.Lock())


def credentials_path(root: Path) -> Path:
    """Where the daemon rooted at `root` keeps captured CRI credentials."""
    return root / "credentials" / "cri.json"


@dataclass(frozen=True)
class Credential:
    """Credentials for one repository, as kubelet sent them (`runtime.v1.AuthConfig`).

    `auth` is base64("user:password") as in a docker config; `basic()` decodes it when
    username and password are not given separately. Times are seconds since the epoch.
    """

    host: str
    repository: str
    captured_at: float
    expires_at: float
    username: str = ""
    password: str = ""
    auth: str = ""
    identity_token: str = ""
    registry_token: str = ""
    server_address: str = ""

    def __repr__(self) -> str:
        present = [f for f in SECRET_FIELDS if getattr(self, f)]
        return (
            f"<Credential {self.host}/{self.repository} [{', '.join(present) or 'empty'}] "
            f"captured_at={self.captured_at:.0f} expires_at={self.expires_at:.0f}>"
        )

    __str__ = __repr__

    @property
    def empty(self) -> bool:
        """Whether no secret at all is set."""
        return not any(getattr(self, f) for f in SECRET_FIELDS)

    def expired(self, now: float) -> bool:
        return now >= self.expires_at

    def basic(self) -> tuple[str, str] | None:
        """(username, password) from the separate fields or from `auth`; None if neither."""
        if self.username or self.password:
            return self.username, self.password
        if self.auth:
            try:
                user, sep, password = (
                    base64.b64decode(self.auth, validate=True).decode().partition(":")
                )
            except (binascii.Error, UnicodeDecodeError):
                return None
            if sep:
                return user, password
        return None

    def to_json(self) -> dict[str, object]:
        return {
            "host": self.host,
            "repository": self.repository,
            "captured_at": self.captured_at,
            "expires_at": self.expires_at,
            **{f: getattr(self, f) for f in (*SECRET_FIELDS, "server_address") if getattr(self, f)},
        }

    @classmethod
    def from_json(cls, doc: object) -> Credential:
        """Raises ValueError (without secrets in the message) on a malformed entry."""
        if not isinstance(doc, dict):
            raise ValueError("entry is not an object")
        strings = {}
        for key in ("host", "repository", *SECRET_FIELDS, "server_address"):
            value = doc.get(key, "")
            if not isinstance(value, str):
                raise ValueError(f"entry field {key!r} is not a string")
            strings[key] = value
        times = {}
        for key in ("captured_at", "expires_at"):
            value = doc.get(key)
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ValueError(f"entry field {key!r} is not a number")
            times[key] = float(value)
        if not strings["host"] or not strings["repository"]:
            raise ValueError("entry has no host or repository")
        return cls(**strings, **times)  # type: ignore[arg-type]


def jwt_expiry(token: str) -> float | None:
    """The `exp` claim (seconds since the epoch) of a JWT `token`, or None when it is not a
    JWT or has no numeric `exp`. The signature is not checked: only the expiry is read."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, int | float) and not isinstance(exp, bool):
        return float(exp)
    return None


def repository_key(image: str) -> tuple[str, str]:
    """(registry host, repository) of the image reference `image` (normalised like docker:
    `busybox` → (`docker.io`, `library/busybox`)). Raises InvalidReferenceError."""
    ref = parse_reference(image)
    return ref.registry, ref.repository


class CapturedCredentials:
    """Captured credentials in memory by (host, repository), persisted to `path`.

    Thread-safe: the proxy's gRPC worker threads call `capture` concurrently. `path`'s
    directory is created 0700 when missing; the file is written 0600. Opening loads the file
    if present; an unreadable or malformed file is logged and ignored (the next capture
    replaces it).
    """

    def __init__(
        self,
        path: Path,
        *,
        ttl_sec: float = DEFAULT_TTL_SEC,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._path = path
        self._ttl_sec = ttl_sec
        self._clock = clock
        self._lock = _path_lock(path)
        self._entries: dict[tuple[str, str], Credential] = {}
        self._stamp: tuple[int, int] | None = None
        self._load()

    def __repr__(self) -> str:
        with self._lock:
            count = len(self._entries)
        return f"<CapturedCredentials {str(self._path)!r} entries={count}>"

    @property
    def path(self) -> Path:
        return self._path

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = self._path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def _reload_if_changed(self) -> None:
        """Another process (or another instance: the CRI proxy writes, the registry client's
        keychain reads) replaced the file: read it again. One `stat` when nothing changed."""
        stamp = self._file_stamp()
        if stamp is not None and stamp != self._stamp:
            with self._lock:
                self._load()

    def _refresh_locked(self) -> None:
        """Before a write: take in what another instance wrote since (a write from a stale
        view would bring back a forgotten entry or drop a new one)."""
        stamp = self._file_stamp()
        if stamp is not None and stamp != self._stamp:
            self._load()

    def _load(self) -> None:
        self._stamp = self._file_stamp()
        try:
            raw = self._path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as e:
            log.warning(
                "captured credentials unreadable",
                extra={"path": str(self._path), "error": e.strerror or type(e).__name__},
            )
            return
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("version") != FILE_VERSION:
                raise ValueError(f"not a version {FILE_VERSION} credentials file")
            entries = doc.get("entries")
            if not isinstance(entries, list):
                raise ValueError("no entries list")
            loaded = [Credential.from_json(e) for e in entries]
        except ValueError as e:
            # json.JSONDecodeError's message quotes no document text, only positions.
            log.warning(
                "captured credentials file ignored",
                extra={"path": str(self._path), "error": str(e)},
            )
            return
        now = self._clock()
        self._entries = {(c.host, c.repository): c for c in loaded if not c.expired(now)}

    def _expiry(self, now: float, tokens: tuple[str, ...]) -> float:
        limit = now + self._ttl_sec
        for token in tokens:
            exp = jwt_expiry(token) if token else None
            if exp is not None:
                limit = min(limit, exp)
        return limit

    def capture(
        self,
        image: str,
        *,
        username: str = "",
        password: str = "",
        auth: str = "",
        identity_token: str = "",
        registry_token: str = "",
        server_address: str = "",
    ) -> Credential | None:
        """Keep the credentials sent with a pull of `image` and persist them.

        Returns the stored Credential, or None when every secret is empty (nothing kept; an
        earlier entry for the repository stays). Raises InvalidReferenceError for a bad
        `image` and OSError when the file cannot be written (the entry is kept in memory).
        """
        host, repository = repository_key(image)
        now = self._clock()
        cred = Credential(
            host=host,
            repository=repository,
            captured_at=now,
            expires_at=self._expiry(now, (registry_token, identity_token)),
            username=username,
            password=password,
            auth=auth,
            identity_token=identity_token,
            registry_token=registry_token,
            server_address=server_address,
        )
        if cred.empty:
            return None
        with self._lock:
            self._refresh_locked()
            self._entries[(host, repository)] = cred
            self._save_locked(now)
        log.info(
            "credentials captured",
            extra={"registry": host, "repository": repository, "expires_at": cred.expires_at},
        )
        return cred

    def get(self, host: str, repository: str) -> Credential | None:
        """The unexpired credentials captured for `host`/`repository`, or None."""
        self._reload_if_changed()
        with self._lock:
            cred = self._entries.get((host, repository))
        if cred is None or cred.expired(self._clock()):
            return None
        return cred

    def forget(self, host: str, repository: str) -> bool:
        """Drop the entry for `host`/`repository` (e.g. when the last lazy layer of that
        repository is unmounted) and persist. Returns whether there was one. Raises OSError
        when the file cannot be written."""
        with self._lock:
            self._refresh_locked()
            if self._entries.pop((host, repository), None) is None:
                return False
            self._save_locked(self._clock())
        return True

    def entries(self) -> list[Credential]:
        """Every unexpired entry, sorted by host and repository."""
        now = self._clock()
        with self._lock:
            live = [c for c in self._entries.values() if not c.expired(now)]
        return sorted(live, key=lambda c: (c.host, c.repository))

    def _save_locked(self, now: float) -> None:
        self._entries = {k: c for k, c in self._entries.items() if not c.expired(now)}
        doc = {
            "version": FILE_VERSION,
            "entries": [
                c.to_json()
                for c in sorted(self._entries.values(), key=lambda c: (c.host, c.repository))
            ],
        }
        directory = self._path.parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        # mkstemp creates the temporary file 0600, so the secrets are never world-readable.
        atomic_write(self._path, json.dumps(doc, indent=1).encode() + b"\n", durable=True)
        self._stamp = self._file_stamp()


__all__ = [
    "DEFAULT_TTL_SEC",
    "CapturedCredentials",
    "Credential",
    "InvalidReferenceError",
    "credentials_path",
    "jwt_expiry",
    "repository_key",
]
