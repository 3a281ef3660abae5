"""`sociable`: build, inspect and push SOCI indexes (the AWS `soci` CLI's shape).

Every command reads images from a registry reference or an OCI image layout
(`oci-layout:PATH[:TAG]`) and needs neither containerd nor root. Errors end here, in `main`
(the one exit point): one line `sociable: error: ...` on stderr and the exit status that
`EXIT_CODES` assigns to the error's class (docs/cli.md, "Exit status").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Final, NoReturn

from tqdm import tqdm

from index import convert as conv
from index import pull as pull_cmd
from index.builder import BuildError, describe_compression, span_size_of
from index.digest import Digest, DigestError
from index.errors import InputFileError, SociableError, UsageError
from index.exitpoint import DEBUG_ENV, debug_requested, report, version
from index.extract import EntryNotFound, ExtractError, LinkError, NotARegularFile
from index.manifest import IndexManifestError, parse_index
from index.model import DEFAULT_MIN_LAYER_SIZE, DEFAULT_SPAN_SIZE, CompressionAlgorithm, Ztoc
from index.oci.descriptor import Descriptor
from index.oci.errors import (
    BlobNotInLayoutError,
    CredentialsError,
    DescriptorError,
    HostsConfigError,
    InvalidReferenceError,
    LayoutError,
    NotFoundError,
    PlatformError,
    RegistryError,
)
from index.oci.layout import LayoutFormat, OciLayout
from index.oci.platform import Platform
from index.sources import LayoutSource, write_to_layout
from index.store import (
    BlobCorrupt,
    BlobNotFound,
    IndexNotFound,
    LocalStore,
    StoreError,
    default_root,
)
from index.toc import TarError
from index.zinfo import SpanMap, ZinfoError
from index.ztoc_codec import ZtocError, ZtocFormatError, decode_ztoc

LAYOUT_PREFIX = "oci-layout:"
PROG = "sociable"

# --- exit status --------------------------------------------------------------------------------

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
"""Any other failure; also an unexpected exception (a bug)."""
EXIT_USAGE: Final = 2
EXIT_NOT_FOUND: Final = 3
EXIT_CORRUPT: Final = 4
EXIT_REGISTRY: Final = 5
EXIT_STORE: Final = 6
EXIT_INTERRUPTED: Final = 130

EXIT_CODES: Final[tuple[tuple[type[BaseException], int], ...]] = (
    # usage: the command line itself is wrong
    (UsageError, EXIT_USAGE),
    (InvalidReferenceError, EXIT_USAGE),
    (PlatformError, EXIT_USAGE),
    (DigestError, EXIT_USAGE),
    # not found: a file, blob, index, image or path the command line names does not exist
    (InputFileError, EXIT_NOT_FOUND),
    (BlobNotFound, EXIT_NOT_FOUND),
    (IndexNotFound, EXIT_NOT_FOUND),
    (BlobNotInLayoutError, EXIT_NOT_FOUND),
    (NotFoundError, EXIT_NOT_FOUND),
    (EntryNotFound, EXIT_NOT_FOUND),
    (NotARegularFile, EXIT_NOT_FOUND),
    (LinkError, EXIT_NOT_FOUND),
    # corrupt input: bytes that are not what they claim (zTOC, index, layer, layout, spans)
    (ExtractError, EXIT_CORRUPT),
    (ZtocError, EXIT_CORRUPT),
    (ZinfoError, EXIT_CORRUPT),
    (IndexManifestError, EXIT_CORRUPT),
    (TarError, EXIT_CORRUPT),
    (BuildError, EXIT_CORRUPT),
    (DescriptorError, EXIT_CORRUPT),
    (LayoutError, EXIT_CORRUPT),
    (BlobCorrupt, EXIT_CORRUPT),
    # registry or network
    (RegistryError, EXIT_REGISTRY),
    (CredentialsError, EXIT_REGISTRY),
    (HostsConfigError, EXIT_REGISTRY),
    # the local store
    (StoreError, EXIT_STORE),
    # everything else raised on purpose (ConvertError, ...)
    (SociableError, EXIT_ERROR),
    (KeyboardInterrupt, EXIT_INTERRUPTED),
)
"""Error class -> exit status; the first row the error is an instance of wins."""


# --- progress and messages ------------------------------------------------------------------------


class Console:
    """Messages and progress bars on stderr; bars only when stderr is a terminal."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self._lock = threading.Lock()

    def info(self, message: str) -> None:
        if not self.quiet:
            with self._lock:
                tqdm.write(message, file=sys.stderr)

    @contextlib.contextmanager
    def bar(self, total: int, desc: str, unit: str = "B") -> Iterator[tqdm[Any]]:
        with tqdm(
            total=total,
            desc=desc,
            unit=unit,
            unit_scale=unit == "B",
            file=sys.stderr,
            disable=self.quiet or not sys.stderr.isatty(),
            leave=False,
        ) as bar:
            yield bar


# --- sources ------------------------------------------------------------------------------------


def _split_layout(text: str) -> tuple[Path, str | None]:
    """`PATH[:TAG]` → (path, tag); a path that exists as given has no tag part."""
    if Path(text).exists() or ":" not in text:
        return Path(text), None
    path, _, tag = text.rpartition(":")
    return Path(path), tag or None


def _existing_layout(text: str) -> tuple[Path, str | None]:
    """`_split_layout`, and the layout must exist (InputFileError otherwise)."""
    path, tag = _split_layout(text)
    if not path.exists():
        raise InputFileError(f"OCI image layout {path} does not exist")
    return path, tag


@contextlib.contextmanager
def open_source(ref: str, args: argparse.Namespace) -> Iterator[conv.ImageSource]:
    if ref.startswith(LAYOUT_PREFIX):
        path, tag = _existing_layout(ref[len(LAYOUT_PREFIX) :])
        with OciLayout.open(path) as layout:
            yield LayoutSource(layout, tag, ref)
        return
    from index.registry_source import open_registry_source  # registry client is heavier

    with open_registry_source(ref, args) as source:
        yield source


def _options(args: argparse.Namespace) -> conv.BuildOptions:
    if args.span_size <= 0:
        raise UsageError(f"--span-size must be positive, not {args.span_size}")
    if args.min_layer_size < 0:
        raise UsageError(f"--min-layer-size must not be negative, not {args.min_layer_size}")
    return conv.BuildOptions(
        span_size=args.span_size,
        min_layer_size=args.min_layer_size,
        platforms=tuple(Platform.parse(p) for p in args.platform or ()),
        all_platforms=args.all_platforms,
        force=args.force,
        zstd=args.zstd,
    )


def _build(
    source: conv.ImageSource,
    args: argparse.Namespace,
    store: LocalStore,
    console: Console,
    v2: bool,
) -> tuple[conv.SelectedImage, list[conv.BuiltIndex]]:
    opts = _options(args)
    selected = conv.select_manifests(source, opts)
    layers = {layer.digest: layer for m in selected.manifests for layer in m.layers}
    total = sum(layer.size for layer in layers.values())
    with console.bar(total, f"indexing {len(layers)} layers") as bar:
        lock = threading.Lock()

        def advance(n: int) -> None:
            with lock:
                bar.update(n)

        ztocs = conv.build_layer_ztocs(
            source, selected.manifests, opts, store, console.info, advance=advance
        )
    built = conv.build_indexes(source, selected, ztocs, v2=v2, store=store, report=console.info)
    return selected, built


def _store(args: argparse.Namespace) -> LocalStore:
    try:
        return LocalStore(Path(args.root) if args.root else default_root())
    except StoreError as e:
        raise StoreError(f"{e} (use --root to choose another directory)") from e


# --- commands -----------------------------------------------------------------------------------


def cmd_create(args: argparse.Namespace, console: Console) -> None:
    store = _store(args)
    with open_source(args.image, args) as source:
        _, built = _build(source, args, store, console, v2=False)
    for b in built:
        store.add_index(
            b.digest,
            len(b.index_bytes),
            b.image.desc.digest,
            args.image,
            str(b.image.platform),
            b.index.artifact_type,
            [z.digest for z in b.index.ztocs],
        )
        print(
            f"{b.digest}  {b.image.platform}  {len(b.index.ztocs)} ztocs  (v1, subject {b.image.desc.digest})"
        )


def cmd_convert(args: argparse.Namespace, console: Console) -> None:
    store = _store(args)
    if args.standalone:
        _convert_standalone(args, store, console)
        return
    if args.format:
        raise UsageError("--format applies to --standalone output only")
    layout_dst: tuple[Path, str] | None = None
    if args.dst.startswith(LAYOUT_PREFIX):
        path, tag = _split_layout(args.dst[len(LAYOUT_PREFIX) :])
        if tag is None:
            raise UsageError(f"destination {args.dst} needs a tag: oci-layout:PATH:TAG")
        layout_dst = (path, tag)
    with open_source(args.src, args) as source:
        selected, built = _build(source, args, store, console, v2=True)
        converted = conv.bind_v2(selected, built, store)
        if layout_dst is not None:
            with OciLayout.open(layout_dst[0], create=True) as out:
                _copy_image(source, selected, out, console)
                write_to_layout(out, converted, layout_dst[1], None)
        else:
            from index.registry_source import push_converted

            push_converted(source, selected, converted, args, console)
    conv.record_converted(store, converted, args.dst)  # only now that DST holds the image
    _print_converted(converted, built)


def _copy_image(
    source: conv.ImageSource, selected: conv.SelectedImage, out: OciLayout, console: Console
) -> None:
    """Copy the original image's configs, layers and manifests into `out`."""
    for m in selected.manifests:
        out.write_blob(m.raw)
        out.write_blob(source.read_blob(Descriptor.from_json(m.doc["config"])))
        for layer in m.layers:
            if not out.has_blob(layer.digest):
                with source.blob_file(layer) as path:
                    out.write_blob_from_file(path)
    if selected.image_index is not None:
        out.write_blob(source.read_manifest(selected.root))


def _convert_standalone(args: argparse.Namespace, store: LocalStore, console: Console) -> None:
    fmt: LayoutFormat = "oci-dir" if args.format == "oci-dir" else "oci-archive"
    src_path, src_tag = _existing_layout(args.src)
    dst = Path(args.dst)
    if dst.exists():
        raise UsageError(f"destination {dst} already exists")
    with OciLayout.open(src_path) as layout:
        source = LayoutSource(layout, src_tag, f"{LAYOUT_PREFIX}{args.src}")
        selected, built = _build(source, args, store, console, v2=True)
        converted = conv.bind_v2(selected, built, store)
        layout.save_as(dst, fmt)
    with OciLayout.open(dst) as out:
        write_to_layout(out, converted, None, selected.root)
    conv.record_converted(store, converted, str(dst))  # only now that DST holds the image
    _print_converted(converted, built)


def _print_converted(converted: conv.ConvertedImage, built: Sequence[conv.BuiltIndex]) -> None:
    for b in built:
        print(f"{b.digest}  {b.image.platform}  {len(b.index.ztocs)} ztocs  (v2)")
    print(f"image index {converted.root.digest}")


def cmd_push(args: argparse.Namespace, console: Console) -> None:
    from index.registry_source import push_v1_indexes

    push_v1_indexes(_store(args), args, console)


def cmd_index_list(args: argparse.Namespace, console: Console) -> None:
    records = _store(args).list_indexes(ref=args.ref, platform=args.platform)
    if args.quiet:
        for r in records:
            print(r.digest)
        return
    rows = [
        ("DIGEST", "SIZE", "IMAGE REF", "PLATFORM", "MEDIA TYPE", "MANIFEST VERSION", "CREATED")
    ]
    rows += [
        (
            r.digest,
            str(r.size),
            r.image_ref,
            r.platform,
            "application/vnd.oci.image.manifest.v1+json",
            r.manifest_version,
            r.created_at,
        )
        for r in records
    ]
    _table(rows)


def cmd_index_info(args: argparse.Namespace, console: Console) -> None:
    store = _store(args)
    digest = _digest(args.digest)
    if store.get_index(digest) is None and store.list_ztocs(ztoc_digest=digest):
        raise UsageError(f"{digest} is a zTOC, not a SOCI index (see `sociable ztoc info`)")
    data = store.get_blob(digest)
    try:
        parse_index(data)
    except IndexManifestError as e:
        raise IndexManifestError(f"blob {digest} in the local store: {e}") from e
    print(json.dumps(json.loads(data), indent=2))


def cmd_index_rm(args: argparse.Namespace, console: Console) -> None:
    store = _store(args)
    digests = list(args.digests)
    if args.ref:
        digests += [r.digest for r in store.list_indexes(ref=args.ref)]
    if not digests:
        raise UsageError("nothing to remove: give index digests or --ref")
    for d in digests:
        store.remove_index(d)
        print(f"removed {d}")


def cmd_ztoc_list(args: argparse.Namespace, console: Console) -> None:
    store = _store(args)
    indexes = None
    if args.image_ref:
        indexes = [r.digest for r in store.list_indexes(ref=args.image_ref)]
    records = store.list_ztocs(ztoc_digest=args.ztoc_digest, index_digests=indexes)
    if args.quiet:
        for r in records:
            print(r.digest)
        return
    _table(
        [("DIGEST", "SIZE", "LAYER DIGEST")]
        + [(r.digest, str(r.size), r.layer_digest) for r in records]
    )


def ztoc_info(ztoc: Ztoc, size: int) -> dict[str, Any]:
    """The `soci ztoc info` JSON object."""
    info = ztoc.compression
    span_size = span_size_of(info)
    spans = SpanMap.from_ztoc(ztoc)
    files = []
    multi = 0
    for f in ztoc.files:
        if f.uncompressed_size > 0:
            r = spans.soci_spans_for_range(f.uncompressed_offset, f.uncompressed_size)
            start, end = r.start, r.stop - 1
        else:
            start = end = spans.span_for_offset(f.uncompressed_offset)
        multi += start != end
        files.append(
            {
                "filename": f.name,
                "offset": f.uncompressed_offset,
                "size": f.uncompressed_size,
                "type": str(f.type),
                "start_span": start,
                "end_span": end,
            }
        )
    out: dict[str, Any] = {
        "version": ztoc.version,
        "build_tool": ztoc.build_tool_identifier,
        "size": size,
        "span_size": span_size,
        "num_spans": info.max_span_id + 1,
        "num_multi_span_files": multi,
        "num_files": len(ztoc.files),
        "files": files,
    }
    if info.algorithm == CompressionAlgorithm.ZSTD:  # not in AWS's output: its zTOCs have none
        out["compression"] = describe_compression(info)
    return out


def _ztoc_bytes(store: LocalStore, text: str) -> tuple[Digest, bytes]:
    """The stored blob `text` names, checked to be a zTOC (not an index)."""
    digest = _digest(text)
    if not store.list_ztocs(ztoc_digest=digest) and store.get_index(digest) is not None:
        raise UsageError(f"{digest} is a SOCI index, not a zTOC (see `sociable index info`)")
    return digest, store.get_blob(digest)


def load_ztoc(store: LocalStore, text: str) -> Ztoc:
    """The stored zTOC `text` names. Raises UsageError, StoreError, ZtocError."""
    digest, data = _ztoc_bytes(store, text)
    return _decode_ztoc(digest, data)


def _decode_ztoc(digest: Digest, data: bytes) -> Ztoc:
    try:
        return decode_ztoc(data)
    except ZtocError as e:
        raise ZtocFormatError(f"blob {digest} in the local store is not a valid zTOC: {e}") from e


def cmd_ztoc_info(args: argparse.Namespace, console: Console) -> None:
    digest, data = _ztoc_bytes(_store(args), args.digest)
    print(json.dumps(ztoc_info(_decode_ztoc(digest, data), len(data)), indent=2))


@contextlib.contextmanager
def _open_input(path: str, flag: str) -> Iterator[BinaryIO]:
    """`path` opened for reading; an OSError opening it is an InputFileError naming `flag`."""
    try:
        f = Path(path).open("rb")  # noqa: SIM115 (closed below; only open() is translated)
    except OSError as e:
        raise InputFileError(f"{flag} {path}: {e.strerror}") from e
    with f:
        yield f


def cmd_ztoc_get_file(args: argparse.Namespace, console: Console) -> None:
    from index.extract import SpanReadError, extract_file

    store = _store(args)
    ztoc = load_ztoc(store, args.digest)
    if args.layer_file:
        where = f"layer file {args.layer_file}"
        with _open_input(args.layer_file, "--layer-file") as f:
            size = os.fstat(f.fileno()).st_size
            if size != ztoc.compressed_archive_size:
                raise ExtractError(
                    f"--layer-file {args.layer_file} is {size} bytes, but zTOC {args.digest} "
                    f"indexes a {ztoc.compressed_archive_size}-byte layer: not that layer's blob"
                )

            def read_local(start: int, end: int) -> bytes:
                f.seek(start)
                return f.read(end - start)

            try:
                data = extract_file(ztoc, args.path, read_local)
            except SpanReadError as e:
                raise SpanReadError(f"{where}: {e}") from e
    else:
        from index.registry_source import layer_range_reader

        records = store.list_ztocs(ztoc_digest=args.digest)
        if not records:
            raise BlobNotFound(f"zTOC {args.digest} is not in the local store {store.root}")
        if not args.image:
            raise UsageError(
                "give --image REF (spans are fetched with Range requests) or --layer-file"
            )
        with layer_range_reader(args.image, records[0].layer_digest, args) as read:
            data = extract_file(ztoc, args.path, read)
    if args.output:
        try:
            Path(args.output).write_bytes(data)
        except OSError as e:
            raise InputFileError(f"--output {args.output}: {e.strerror}") from e
    else:
        sys.stdout.buffer.write(data)


def _digest(text: str) -> Digest:
    return Digest(text)


def _table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


# --- argument parsing ---------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is raised (as UsageError) for `main` to report in one line."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _add_registry_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("registry")
    g.add_argument("-u", "--user", help="USER[:PASSWORD] for the registry")
    g.add_argument("--plain-http", action="store_true", help="talk HTTP, not HTTPS")
    g.add_argument(
        "-k", "--skip-verify", action="store_true", help="do not verify TLS certificates"
    )
    g.add_argument("--hosts-dir", action="append", help="containerd hosts.toml directory (certs.d)")


def _add_platform_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-p",
        "--platform",
        action="append",
        help="os/arch[/variant]; repeatable (default: this host's)",
    )
    p.add_argument("--all-platforms", action="store_true", help="every platform of the image")


def _add_build_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--span-size",
        type=int,
        default=DEFAULT_SPAN_SIZE,
        help="uncompressed bytes per span (default %(default)s)",
    )
    p.add_argument(
        "--min-layer-size",
        type=int,
        default=DEFAULT_MIN_LAYER_SIZE,
        help="skip smaller layers (bytes, default %(default)s)",
    )
    _add_platform_flags(p)
    p.add_argument(
        "-f", "--force", action="store_true", help="rebuild zTOCs even if stored ones match"
    )
    p.add_argument(
        "--zstd",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="index zstd:chunked, seekable and multi-frame zstd layers; AWS's SOCI "
        "snapshotter cannot read these zTOCs (default: off)",
    )
    _add_registry_flags(p)


def _add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="print digests only")


def parser() -> argparse.ArgumentParser:
    """The `sociable` argument parser; every option and operand has help text."""
    top = _Parser(prog=PROG, description=__doc__.splitlines()[0])
    top.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    top.add_argument("--root", help="local store directory (default /var/lib/sociable as root)")
    top.add_argument("-q", "--quiet", action="store_true", help="no progress or messages")
    top.add_argument(
        "--debug",
        action="store_true",
        help=f"print the traceback of an unexpected error (also {DEBUG_ENV}=1)",
    )
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("create", help="build a v1 SOCI index (one per platform) for an image")
    p.add_argument("image", help="REF or oci-layout:PATH[:TAG]")
    _add_build_flags(p)
    p.set_defaults(func=cmd_create)

    p = sub.add_parser("convert", help="build v2 SOCI indexes and bind them into a new image")
    p.add_argument("src", help="REF or oci-layout:PATH[:TAG] (with --standalone: PATH[:TAG])")
    p.add_argument("dst", help="REF or oci-layout:PATH:TAG (with --standalone: PATH)")
    p.add_argument(
        "--standalone", action="store_true", help="read and write OCI image layouts only"
    )
    p.add_argument(
        "--format",
        choices=("oci-dir", "oci-archive"),
        help="--standalone output format (default oci-archive)",
    )
    _add_build_flags(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("push", help="push the v1 indexes built for an image, with their zTOCs")
    p.add_argument("image", help="REF the indexes were built for")
    _add_platform_flags(p)
    p.add_argument(
        "--existing-index",
        choices=("warn", "skip", "allow"),
        default="warn",
        help="when the image already has a SOCI index in the registry: warn and push, "
        "skip the push, or push silently (default %(default)s)",
    )
    _add_registry_flags(p)
    p.set_defaults(func=cmd_push)

    idx = sub.add_parser("index", help="inspect locally stored indexes").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND"
    )
    p = idx.add_parser("list", aliases=["ls"], help="list stored indexes")
    p.add_argument("--ref", help="only indexes built for this image reference")
    p.add_argument("-p", "--platform", help="only indexes of this platform (os/arch[/variant])")
    _add_quiet(p)
    p.set_defaults(func=cmd_index_list)
    p = idx.add_parser("info", help="print a stored index manifest")
    p.add_argument("digest", help="the index digest (sha256:...)")
    p.set_defaults(func=cmd_index_info)
    p = idx.add_parser("rm", aliases=["remove"], help="remove stored indexes")
    p.add_argument("digests", nargs="*", help="index digests to remove")
    p.add_argument("--ref", help="also remove every index built for this image reference")
    p.set_defaults(func=cmd_index_rm)

    pull_cmd.add_parser(sub)

    zt = sub.add_parser("ztoc", help="inspect locally stored zTOCs").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND"
    )
    p = zt.add_parser("list", aliases=["ls"], help="list stored zTOCs")
    p.add_argument("--ztoc-digest", help="only the zTOC with this digest")
    p.add_argument("--image-ref", help="only zTOCs of indexes built for this image reference")
    _add_quiet(p)
    p.set_defaults(func=cmd_ztoc_list)
    p = zt.add_parser("info", help="print a stored zTOC as JSON")
    p.add_argument("digest", help="the zTOC digest (sha256:...)")
    p.set_defaults(func=cmd_ztoc_info)
    p = zt.add_parser("get-file", help="extract one file, reading only the spans it needs")
    p.add_argument("digest", help="the zTOC digest (sha256:...) of the layer holding the file")
    p.add_argument("path", help="the file's path in the layer (e.g. usr/bin/env)")
    p.add_argument("-o", "--output", help="write the file here (default: standard output)")
    p.add_argument("--layer-file", help="the layer blob on local disk")
    p.add_argument("--image", help="REF whose registry serves the layer (Range requests)")
    _add_registry_flags(p)
    p.set_defaults(func=cmd_ztoc_get_file)
    return top


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The one exit point of `sociable`: run the command, report an error, exit with its status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    code = EXIT_OK
    try:
        args = parser().parse_args(argv)
        args.func(args, Console(quiet=args.quiet))
    except (Exception, KeyboardInterrupt) as e:
        code = report(PROG, e, EXIT_CODES, debug=debug_requested(argv))
    raise SystemExit(code)


if __name__ == "__main__":
    main()
