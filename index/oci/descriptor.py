"""OCI content descriptors and the JSON form Go writes for them."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from index import gojson
from index.digest import Digest, DigestError
from index.oci.errors import DescriptorError, PlatformError
from index.oci.platform import Platform


@dataclass(frozen=True, slots=True)
class Descriptor:
    """An OCI descriptor: what a blob or manifest is (`media_type`), its identity and size.

    `size` is in bytes. `annotations` is kept as given; `to_json` sorts it as Go does.
    """

    media_type: str
    digest: Digest
    size: int
    urls: tuple[str, ...] = ()
    annotations: Mapping[str, str] = field(default_factory=dict)
    data: bytes | None = None
    platform: Platform | None = None
    artifact_type: str = ""

    @classmethod
    def of(cls, media_type: str, content: bytes, **kwargs: Any) -> Descriptor:
        """The descriptor of `content` (digest and size computed here)."""
        return cls(media_type, Digest.of(content), len(content), **kwargs)

    @classmethod
    def from_json(cls, obj: Any) -> Descriptor:
        """Parse a descriptor object. Raises DescriptorError naming the missing/bad field."""
        if not isinstance(obj, Mapping):
            raise DescriptorError(f"descriptor is not a JSON object: {obj!r}")
        try:
            media_type = obj.get("mediaType", "")
            digest = Digest(obj["digest"])
            size = obj["size"]
        except KeyError as e:
            raise DescriptorError(f"descriptor {dict(obj)!r} lacks field {e}") from e
        except (DigestError, TypeError) as e:
            raise DescriptorError(f"descriptor {dict(obj)!r} has a bad digest: {e}") from e
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise DescriptorError(f"descriptor {digest} has a bad size {size!r}")
        if not isinstance(media_type, str):
            raise DescriptorError(f"descriptor {digest} has a bad mediaType {media_type!r}")
        annotations = obj.get("annotations") or {}
        if not isinstance(annotations, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
        ):
            raise DescriptorError(f"descriptor {digest} has bad annotations {annotations!r}")
        platform = None
        if obj.get("platform") is not None:
            try:
                platform = Platform.from_json(obj["platform"])
            except PlatformError as e:
                raise DescriptorError(f"descriptor {digest}: {e}") from e
        data = None
        if obj.get("data") is not None:
            try:
                data = base64.b64decode(obj["data"], validate=True)
            except (binascii.Error, TypeError) as e:
                raise DescriptorError(f"descriptor {digest} has bad base64 data") from e
        return cls(
            media_type=media_type,
            digest=digest,
            size=size,
            urls=tuple(str(u) for u in obj.get("urls") or ()),
            annotations=dict(annotations),
            data=data,
            platform=platform,
            artifact_type=str(obj.get("artifactType", "")),
        )

    def to_json(self) -> dict[str, Any]:
        """The descriptor as a dict in Go field order, empty optional fields left out."""
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": str(self.digest)}
        out["size"] = self.size
        if self.urls:
            out["urls"] = list(self.urls)
        if self.annotations:
            out["annotations"] = gojson.sorted_map(self.annotations)
        if self.data is not None:
            out["data"] = base64.b64encode(self.data).decode("ascii")
        if self.platform is not None:
            out["platform"] = self.platform.to_json()
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        return out

    def marshal(self) -> bytes:
        """Go-canonical JSON bytes of `to_json()`."""
        return gojson.marshal(self.to_json())
