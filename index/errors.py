"""The root of the `index` package's exceptions.

Every exception the package raises on purpose derives from `SociableError`, so a caller
(the `sociable` command line, the snapshotter) can tell "this input or environment is
wrong" (a `SociableError`, whose message is one line naming the object and the cause)
from a bug (anything else). The subtrees live next to the code that raises them:

    SociableError
    ├── UsageError                 a command line asks for something impossible
    ├── OciError                   index.oci: references, layouts, registries, credentials
    ├── DigestError                a string is not a digest
    ├── TarError                   a layer's tar stream cannot be described
    ├── ZinfoError                 gzip/tar checkpoints, spans and their digests
    ├── ZtocError                  a zTOC cannot be decoded or encoded
    ├── IndexManifestError         a SOCI index manifest is malformed
    ├── BuildError                 a layer cannot be indexed
    ├── ZlibError                  the system zlib is unusable
    ├── StoreError                 the local store is unusable or lacks a blob or index
    ├── ConvertError               an image cannot be indexed or written
    └── ExtractError               a file cannot be read through a zTOC

Which exit status each of them means to `sociable` is one table in `index.cli`
(`EXIT_CODES`), documented in docs/cli.md.
"""

from __future__ import annotations


class SociableError(Exception):
    """Base of every error the `index` package raises on purpose; the message is one line."""


class UsageError(SociableError):
    """The command line asks for something impossible (a missing operand, conflicting flags)."""


class InputFileError(SociableError):
    """A file named on the command line cannot be read or written (the OSError is chained)."""
