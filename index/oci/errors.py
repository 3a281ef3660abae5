"""The exception tree of the OCI plumbing.

```
OciError
├── InvalidReferenceError      a string is not an image reference (also a ValueError)
├── PlatformError              a platform string cannot be parsed (also a ValueError)
├── DescriptorError            a descriptor/manifest JSON object is malformed (also a ValueError)
├── LayoutError                an OCI image layout is missing, malformed or inconsistent
│   └── BlobNotInLayoutError   a digest is not in the layout's blob store
├── HostsConfigError           a hosts.toml file cannot be read or is invalid
├── CredentialsError           a credential source (docker config, helper) failed
└── RegistryError              a registry request failed
    ├── TransportError         the connection failed or timed out (no HTTP answer)
    ├── NotFoundError          404: repository, manifest, blob or tag absent
    ├── UnauthorizedError      401/403 after authenticating (or no usable credentials)
    ├── RangeNotSatisfiableError  416, or a 206 whose Content-Range does not match
    ├── DigestMismatchError    content does not hash to the digest it was fetched by
    └── UnexpectedResponseError  any other status or malformed answer
```

Every message names the object (URL, repository, digest, path) and the cause; lower-level
exceptions are chained with `raise ... from`.
"""

from __future__ import annotations

from index.errors import SociableError


class OciError(SociableError):
    """Base class of every error raised by `index.oci`."""


class InvalidReferenceError(OciError, ValueError):
    """An image reference string is malformed (bad name, tag or digest)."""


class PlatformError(OciError, ValueError):
    """A platform specifier such as `linux/arm64/v8` cannot be parsed."""


class DescriptorError(OciError, ValueError):
    """A descriptor, manifest or index JSON document is malformed."""


class LayoutError(OciError):
    """An OCI image layout is missing, malformed, or a blob in it is corrupt."""


class BlobNotInLayoutError(LayoutError):
    """The requested digest has no blob in the layout."""


class HostsConfigError(OciError):
    """A containerd `hosts.toml` file cannot be parsed or has invalid values."""


class CredentialsError(OciError):
    """A credential source failed (unreadable docker config, failing credential helper)."""


class RegistryError(OciError):
    """A request to a registry (or mirror) failed.

    `url` is the last URL tried, `status` the HTTP status when there was one,
    `retry_after_sec` how long the answer's `Retry-After` asked to wait (None: no such
    header, or one that cannot be read).
    """

    def __init__(
        self,
        message: str,
        *,
        url: str = "",
        status: int | None = None,
        retry_after_sec: float | None = None,
    ) -> None:
        super().__init__(message)
        self.url = url
        self.status = status
        self.retry_after_sec = retry_after_sec


class TransportError(RegistryError):
    """No HTTP answer: connection refused, TLS failure, timeout, broken stream."""


class NotFoundError(RegistryError):
    """The registry answered 404 (or every endpoint did) for a manifest, blob or tag."""


class UnauthorizedError(RegistryError):
    """Authentication failed: 401/403 after presenting credentials, or none were usable."""


class RangeNotSatisfiableError(RegistryError):
    """The registry answered 416, or a 206 whose `Content-Range` is not the range asked for."""


class DigestMismatchError(RegistryError):
    """Fetched content does not hash to the digest (or size) it was requested by."""


class UnexpectedResponseError(RegistryError):
    """Any other non-success status, or a malformed answer (bad JSON, missing header)."""
