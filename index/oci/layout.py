"""OCI image layouts (image-spec `image-layout.md`) as a directory or a tar archive.

A layout holds `oci-layout`, `index.json` and `blobs/sha256/<hex>`. A directory is read and
written in place; every write goes to a temporary file in the same directory and is renamed
into place, so a reader never sees a partial blob or index. An archive (`oci-archive`, a tar of
the same tree) is unpacked into a private temporary directory on open, and written back
(atomically, deterministic member order and metadata) by `close()` when anything changed.
Blobs are verified against their digest whenever they are read.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Literal

from index import gojson
from index.digest import Digest, DigestError
from index.oci import mediatypes
from index.oci.descriptor import Descriptor
from index.oci.errors import BlobNotInLayoutError, DescriptorError, LayoutError

LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
LAYOUT_VERSION = "1.0.0"
LAYOUT_SCHEME = "oci-layout:"
_CHUNK = 1024 * 1024

LayoutFormat = Literal["oci-dir", "oci-archive"]


def parse_layout_ref(text: str) -> tuple[Path, str | None]:
    """Split `oci-layout:PATH[:TAG]` into the path and the tag (None when absent).

    The tag is the part after the last `:` when that part contains no `/`.
    Raises LayoutError when `text` does not start with `oci-layout:` or has no path.
    """
    if not text.startswith(LAYOUT_SCHEME):
        raise LayoutError(f"not an OCI layout reference (want oci-layout:PATH[:TAG]): {text!r}")
    rest = text[len(LAYOUT_SCHEME) :]
    path, sep, tag = rest.rpartition(":")
    if not sep or "/" in tag or not path:
        path, tag = rest, ""
    if not path:
        raise LayoutError(f"OCI layout reference {text!r} has no path")
    return Path(path), tag or None


class _VerifyingReader(io.RawIOBase):
    """Reads a blob file and raises LayoutError at EOF if the content does not match."""

    def __init__(self, file: BinaryIO, digest: Digest, size: int | None, path: Path) -> None:
        self._file = file
        self._digest = digest
        self._size = size
        self._path = path
        self._hasher = hashlib.sha256()
        self._count = 0
        self._checked = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._file.readinto(buffer)  # type: ignore[attr-defined]
        if n:
            self._hasher.update(memoryview(buffer)[:n])
            self._count += n
        elif not self._checked:
            self._checked = True
            got = Digest.from_hasher(self._hasher)
            if got != self._digest or (self._size is not None and self._count != self._size):
                raise LayoutError(
                    f"blob {self._path} is corrupt: content hashes to {got} "
                    f"({self._count} bytes), expected {self._digest}"
                )
        return int(n or 0)

    def close(self) -> None:
        self._file.close()
        super().close()


class OciLayout:
    """An open OCI image layout. Use as a context manager, or call `close()`.

    For an archive, `close()` writes the archive back if it was modified, then deletes the
    unpacked copy; a failure while writing leaves the original archive untouched.
    """

    def __init__(
        self, root: Path, *, archive: Path | None, tmp: tempfile.TemporaryDirectory[str] | None
    ) -> None:
        self.root = root
        self.archive = archive
        self._tmp = tmp
        self._dirty = False

    def __repr__(self) -> str:
        where = f"archive={str(self.archive)!r}" if self.archive else f"dir={str(self.root)!r}"
        return f"<OciLayout {where} dirty={self._dirty}>"

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], *, create: bool = False, fmt: LayoutFormat | None = None
    ) -> OciLayout:
        """Open the layout at `path`: a directory, or a tar file (`oci-archive`).

        With `create=True` a missing layout is initialised; its format is `fmt`, or an archive
        when the name ends in `.tar`, else a directory. Raises LayoutError when `path` is not
        a layout (no `oci-layout` file, unreadable archive) or is missing without `create`.
        """
        p = Path(path)
        if p.is_dir():
            if not (p / LAYOUT_FILE).exists():
                if create and not any(p.iterdir()):
                    return cls._init_dir(p)
                raise LayoutError(f"{p} is not an OCI image layout: no {LAYOUT_FILE} file")
            return cls(p, archive=None, tmp=None)
        if p.is_file():
            return cls._open_archive(p)
        if not create:
            raise LayoutError(f"OCI image layout {p} does not exist")
        if fmt is None:
            fmt = "oci-archive" if p.name.endswith(".tar") else "oci-dir"
        if fmt == "oci-dir":
            p.mkdir(parents=True)
            return cls._init_dir(p)
        tmp = tempfile.TemporaryDirectory(prefix="oci-archive-")
        layout = cls._init_dir(Path(tmp.name))
        layout.archive, layout._tmp, layout._dirty = p, tmp, True
        return layout

    @classmethod
    def _init_dir(cls, root: Path) -> OciLayout:
        layout = cls(root, archive=None, tmp=None)
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        layout._write_file(
            root / LAYOUT_FILE, json.dumps({"imageLayoutVersion": LAYOUT_VERSION}).encode()
        )
        layout.set_index([])
        return layout

    @classmethod
    def _open_archive(cls, path: Path) -> OciLayout:
        tmp = tempfile.TemporaryDirectory(prefix="oci-archive-")
        try:
            with tarfile.open(path, "r:*") as tar:
                tar.extractall(tmp.name, filter="data")
        except (tarfile.TarError, OSError) as e:
            tmp.cleanup()
            raise LayoutError(f"cannot unpack OCI archive {path}: {e}") from e
        root = Path(tmp.name)
        if not (root / LAYOUT_FILE).exists():
            tmp.cleanup()
            raise LayoutError(f"{path} is not an OCI archive: no {LAYOUT_FILE} member")
        return cls(root, archive=path, tmp=tmp)

    def close(self) -> None:
        """Write an archive back if modified, and drop temporary files. Idempotent.

        Raises LayoutError if the archive cannot be written.
        """
        try:
            if self.archive is not None and self._dirty:
                self._write_archive(self.archive)
                self._dirty = False
        finally:
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None

    def __enter__(self) -> OciLayout:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if et is not None and self._tmp is not None:
            # Never replace an archive with the result of a failed operation.
            self._dirty = False
        self.close()

    def save_as(self, dest: str | os.PathLike[str], fmt: LayoutFormat) -> None:
        """Copy this layout to `dest` as a directory or an archive (dest must not exist)."""
        d = Path(dest)
        if d.exists():
            raise LayoutError(f"cannot save OCI layout to {d}: it already exists")
        if fmt == "oci-archive":
            self._write_archive(d)
        else:
            shutil.copytree(self.root, d)

    def _write_archive(self, dest: Path) -> None:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent or Path("."))
        try:
            with (
                os.fdopen(fd, "wb") as f,
                tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar,
            ):
                for path in sorted(self._tree()):
                    rel = path.relative_to(self.root).as_posix()
                    info = tar.gettarinfo(str(path), arcname=rel)
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    info.mtime = 0
                    info.mode = 0o755 if info.isdir() else 0o644
                    if info.isdir():
                        tar.addfile(info)
                    else:
                        with path.open("rb") as src:
                            tar.addfile(info, src)
            os.replace(tmp_name, dest)
        except (OSError, tarfile.TarError) as e:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise LayoutError(f"cannot write OCI archive {dest}: {e}") from e

    def _tree(self) -> Iterator[Path]:
        for dirpath, dirnames, filenames in os.walk(self.root):
            base = Path(dirpath)
            for name in dirnames:
                yield base / name
            for name in filenames:
                if not name.startswith(".tmp-"):
                    yield base / name

    # -- blobs -------------------------------------------------------------------------------

    def blob_path(self, digest: Digest) -> Path:
        """Where the blob with `digest` lives (it may not exist). Directory layouts only."""
        if self.archive is not None:
            raise LayoutError(f"blob paths of archive {self.archive} are not stable; use open_blob")
        return self._blob_path(digest)

    def _blob_path(self, digest: Digest) -> Path:
        return self.root / "blobs" / "sha256" / Digest(digest).hex

    def has_blob(self, digest: Digest) -> bool:
        return self._blob_path(digest).is_file()

    def open_blob(self, digest: Digest, size: int | None = None) -> BinaryIO:
        """A reader of the blob; the caller closes it.

        The content is hashed as it is read: reading to EOF raises LayoutError if it does not
        match `digest` (or `size` bytes). Raises BlobNotInLayoutError if the blob is absent.
        """
        path = self._blob_path(digest)
        try:
            f = path.open("rb")
        except FileNotFoundError as e:
            raise BlobNotInLayoutError(
                f"blob {digest} not found in OCI layout {self._name()}"
            ) from e
        return io.BufferedReader(_VerifyingReader(f, Digest(digest), size, path), _CHUNK)

    def read_blob(self, digest: Digest, size: int | None = None) -> bytes:
        """The verified content of a blob. Raises BlobNotInLayoutError or LayoutError."""
        with self.open_blob(digest, size) as f:
            return f.read()

    def write_blob(self, data: bytes, media_type: str = mediatypes.SOCI_ZTOC) -> Descriptor:
        """Store `data` (idempotent) and return its descriptor with `media_type`."""
        desc = Descriptor.of(media_type, data)
        path = self._blob_path(desc.digest)
        if not path.exists():
            self._write_file(path, data)
        return desc

    def write_blob_from_file(
        self, src: str | os.PathLike[str], media_type: str = mediatypes.SOCI_ZTOC
    ) -> Descriptor:
        """Copy the file at `src` into the blob store, hashing it on the way."""
        blobs = self.root / "blobs" / "sha256"
        blobs.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", dir=blobs)
        hasher = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
                while chunk := f.read(_CHUNK):
                    hasher.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
            digest = Digest.from_hasher(hasher)
            os.replace(tmp_name, self._blob_path(digest))
        except OSError as e:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise LayoutError(f"cannot copy {src} into OCI layout {self._name()}: {e}") from e
        self._dirty = True
        return Descriptor(media_type, digest, size)

    def _write_file(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp_name, path)
        except OSError as e:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise LayoutError(f"cannot write {path} in OCI layout {self._name()}: {e}") from e
        self._dirty = True

    def _name(self) -> str:
        return str(self.archive or self.root)

    # -- index.json --------------------------------------------------------------------------

    def index(self) -> dict[str, Any]:
        """The parsed `index.json`. Raises LayoutError if missing or not an image index."""
        path = self.root / INDEX_FILE
        try:
            obj = json.loads(path.read_bytes())
        except (OSError, ValueError) as e:
            raise LayoutError(f"cannot read {INDEX_FILE} of OCI layout {self._name()}: {e}") from e
        if not isinstance(obj, dict) or not isinstance(obj.get("manifests", []), list):
            raise LayoutError(f"{INDEX_FILE} of OCI layout {self._name()} is not an image index")
        return obj

    def manifests(self) -> list[Descriptor]:
        """The descriptors listed in `index.json`. Raises LayoutError on a malformed entry."""
        try:
            return [Descriptor.from_json(m) for m in self.index().get("manifests", [])]
        except DescriptorError as e:
            raise LayoutError(f"bad {INDEX_FILE} in OCI layout {self._name()}: {e}") from e

    def set_index(
        self, manifests: Sequence[Descriptor], annotations: Mapping[str, str] | None = None
    ) -> None:
        """Replace `index.json` with these descriptors (Go JSON, written atomically)."""
        obj: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": mediatypes.OCI_INDEX,
            "manifests": [m.to_json() for m in manifests],
        }
        if annotations:
            obj["annotations"] = gojson.sorted_map(annotations)
        self._write_file(self.root / INDEX_FILE, gojson.marshal(obj))

    def tag(self, descriptor: Descriptor, name: str) -> None:
        """Point tag `name` at `descriptor` in `index.json`, replacing an entry with that tag."""
        ann = dict(descriptor.annotations)
        ann[mediatypes.ANNOTATION_REF_NAME] = name
        tagged = Descriptor(
            descriptor.media_type,
            descriptor.digest,
            descriptor.size,
            descriptor.urls,
            ann,
            descriptor.data,
            descriptor.platform,
            descriptor.artifact_type,
        )
        kept = [
            m for m in self.manifests() if m.annotations.get(mediatypes.ANNOTATION_REF_NAME) != name
        ]
        self.set_index([*kept, tagged], self.index().get("annotations"))

    def resolve(self, tag: str | None = None) -> Descriptor:
        """The descriptor tagged `tag` (`org.opencontainers.image.ref.name`).

        `tag=None` means the only descriptor in the index. A ref name that is a full reference
        (`name:tag`) also matches its tag part. Raises LayoutError when nothing (or, for None,
        more than one thing) matches.
        """
        manifests = self.manifests()
        if tag is None:
            if len(manifests) == 1:
                return manifests[0]
            raise LayoutError(
                f"OCI layout {self._name()} has {len(manifests)} manifests; name a tag"
            )
        exact = [m for m in manifests if m.annotations.get(mediatypes.ANNOTATION_REF_NAME) == tag]
        if not exact:
            exact = [
                m
                for m in manifests
                if m.annotations.get(mediatypes.ANNOTATION_REF_NAME, "").rpartition(":")[2] == tag
            ]
        if not exact:
            raise LayoutError(f"tag {tag!r} not found in OCI layout {self._name()}")
        return exact[-1]

    def verify(self) -> None:
        """Check every blob against its name. Raises LayoutError on the first corrupt blob."""
        blobs = self.root / "blobs" / "sha256"
        for path in sorted(blobs.iterdir()) if blobs.is_dir() else []:
            if path.name.startswith(".tmp-"):
                continue
            try:
                digest = Digest("sha256:" + path.name)
            except DigestError as e:
                raise LayoutError(f"stray file {path} in OCI layout {self._name()}") from e
            self.read_blob(digest)
