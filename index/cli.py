"""`sociable`: build, inspect and push SOCI indexes (the AWS `soci` CLI's shape, spec/soci.md §4).

Every command reads images from a registry reference or an OCI image layout
(`oci-layout:PATH[:TAG]`) and needs neither containerd nor root. Errors end here, in `main`,
as one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from tqdm import tqdm

from index import convert as conv
from index import pull as pull_cmd
from index.digest import Digest, DigestError
from index.manifest import parse_index
from index.model import DEFAULT_MIN_LAYER_SIZE, DEFAULT_SPAN_SIZE, CompressionAlgorithm, Ztoc
from index.oci.descriptor import Descriptor
from index.oci.errors import OciError
from index.oci.layout import LayoutFormat, OciLayout
from index.oci.platform import Platform
from index.sources import LayoutSource, write_to_layout
from index.store import LocalStore, StoreError, default_root
from index.zinfo import SpanMap, ZinfoError, decode_gzip_zinfo, decode_tar_zinfo
from index.ztoc_codec import decode_ztoc

LAYOUT_PREFIX = "oci-layout:"


class CliError(Exception):
    """A user-facing failure: the message is printed as is."""


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


@contextlib.contextmanager
def open_source(ref: str, args: argparse.Namespace) -> Iterator[conv.ImageSource]:
    if ref.startswith(LAYOUT_PREFIX):
        path, tag = _split_layout(ref[len(LAYOUT_PREFIX) :])
        with OciLayout.open(path) as layout:
            yield LayoutSource(layout, tag, ref)
        return
    from index.registry_source import open_registry_source  # registry client is heavier

    with open_registry_source(ref, args) as source:
        yield source


def _options(args: argparse.Namespace) -> conv.BuildOptions:
    if args.span_size <= 0:
        raise CliError(f"--span-size must be positive, not {args.span_size}")
    if args.min_layer_size < 0:
        raise CliError(f"--min-layer-size must not be negative, not {args.min_layer_size}")
    return conv.BuildOptions(
        span_size=args.span_size,
        min_layer_size=args.min_layer_size,
        platforms=tuple(Platform.parse(p) for p in args.platform or ()),
        all_platforms=args.all_platforms,
        force=args.force,
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
        raise CliError(f"{e} (use --root to choose another directory)") from e


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
        raise CliError("--format applies to --standalone output only")
    with open_source(args.src, args) as source:
        selected, built = _build(source, args, store, console, v2=True)
        converted = conv.bind_v2(selected, built, store, args.dst)
        if args.dst.startswith(LAYOUT_PREFIX):
            path, tag = _split_layout(args.dst[len(LAYOUT_PREFIX) :])
            if tag is None:
                raise CliError(f"destination {args.dst} needs a tag: oci-layout:PATH:TAG")
            with OciLayout.open(path, create=True) as out:
                _copy_image(source, selected, out, console)
                write_to_layout(out, converted, tag, None)
        else:
            from index.registry_source import push_converted

            push_converted(source, selected, converted, args, console)
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
    src_path, src_tag = _split_layout(args.src)
    dst = Path(args.dst)
    if dst.exists():
        raise CliError(f"destination {dst} already exists")
    with OciLayout.open(src_path) as layout:
        source = LayoutSource(layout, src_tag, f"{LAYOUT_PREFIX}{args.src}")
        selected, built = _build(source, args, store, console, v2=True)
        converted = conv.bind_v2(selected, built, store, str(dst))
        layout.save_as(dst, fmt)
    with OciLayout.open(dst) as out:
        write_to_layout(out, converted, None, selected.root)
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
    data = store.get_blob(_digest(args.digest))
    parse_index(data)
    print(json.dumps(json.loads(data), indent=2))


def cmd_index_rm(args: argparse.Namespace, console: Console) -> None:
    store = _store(args)
    digests = list(args.digests)
    if args.ref:
        digests += [r.digest for r in store.list_indexes(ref=args.ref)]
    if not digests:
        raise CliError("nothing to remove: give index digests or --ref")
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


def load_ztoc(store: LocalStore, digest: str) -> Ztoc:
    return decode_ztoc(store.get_blob(_digest(digest)))


def ztoc_info(ztoc: Ztoc, size: int) -> dict[str, Any]:
    """The `soci ztoc info` JSON object."""
    info = ztoc.compression
    if info.algorithm == CompressionAlgorithm.GZIP:
        span_size = decode_gzip_zinfo(info.checkpoints).span_size
    else:
        span_size = decode_tar_zinfo(info.checkpoints).span_size
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
    return {
        "version": ztoc.version,
        "build_tool": ztoc.build_tool_identifier,
        "size": size,
        "span_size": span_size,
        "num_spans": info.max_span_id + 1,
        "num_multi_span_files": multi,
        "num_files": len(ztoc.files),
        "files": files,
    }


def cmd_ztoc_info(args: argparse.Namespace, console: Console) -> None:
    store = _store(args)
    data = store.get_blob(_digest(args.digest))
    print(json.dumps(ztoc_info(decode_ztoc(data), len(data)), indent=2))


def cmd_ztoc_get_file(args: argparse.Namespace, console: Console) -> None:
    from index.extract import extract_file

    store = _store(args)
    ztoc = load_ztoc(store, args.digest)
    if args.layer_file:
        with Path(args.layer_file).open("rb") as f:

            def read_local(start: int, end: int) -> bytes:
                f.seek(start)
                return f.read(end - start)

            data = extract_file(ztoc, args.path, read_local)
    else:
        from index.registry_source import layer_range_reader

        records = store.list_ztocs(ztoc_digest=args.digest)
        if not records:
            raise CliError(f"zTOC {args.digest} is not in the local store")
        if not args.image:
            raise CliError(
                "give --image REF (spans are fetched with Range requests) or --layer-file"
            )
        with layer_range_reader(args.image, records[0].layer_digest, args) as read:
            data = extract_file(ztoc, args.path, read)
    if args.output:
        Path(args.output).write_bytes(data)
    else:
        sys.stdout.buffer.write(data)


def _digest(text: str) -> Digest:
    try:
        return Digest(text)
    except DigestError as e:
        raise CliError(str(e)) from e


def _table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


# --- argument parsing ---------------------------------------------------------------------------


def _add_registry_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("registry")
    g.add_argument("-u", "--user", help="USER[:PASSWORD] for the registry")
    g.add_argument("--plain-http", action="store_true", help="talk HTTP, not HTTPS")
    g.add_argument(
        "-k", "--skip-verify", action="store_true", help="do not verify TLS certificates"
    )
    g.add_argument("--hosts-dir", action="append", help="containerd hosts.toml directory (certs.d)")


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
    p.add_argument(
        "-p",
        "--platform",
        action="append",
        help="os/arch[/variant]; repeatable (default: this host's)",
    )
    p.add_argument("--all-platforms", action="store_true", help="index every platform of the image")
    p.add_argument(
        "-f", "--force", action="store_true", help="rebuild zTOCs even if stored ones match"
    )
    _add_registry_flags(p)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="sociable", description=__doc__.splitlines()[0])
    top.add_argument("--root", help="local store directory (default /var/lib/sociable as root)")
    top.add_argument("-q", "--quiet", action="store_true", help="no progress or messages")
    sub = top.add_subparsers(dest="command", required=True)

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
    p.add_argument("-p", "--platform", action="append")
    p.add_argument("--all-platforms", action="store_true")
    p.add_argument("--existing-index", choices=("warn", "skip", "allow"), default="warn")
    _add_registry_flags(p)
    p.set_defaults(func=cmd_push)

    idx = sub.add_parser("index", help="inspect locally stored indexes").add_subparsers(
        dest="sub", required=True
    )
    p = idx.add_parser("list", aliases=["ls"])
    p.add_argument("--ref")
    p.add_argument("-p", "--platform")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_index_list)
    p = idx.add_parser("info")
    p.add_argument("digest")
    p.set_defaults(func=cmd_index_info)
    p = idx.add_parser("rm", aliases=["remove"])
    p.add_argument("digests", nargs="*")
    p.add_argument("--ref")
    p.set_defaults(func=cmd_index_rm)

    pull_cmd.add_parser(sub)

    zt = sub.add_parser("ztoc", help="inspect locally stored zTOCs").add_subparsers(
        dest="sub", required=True
    )
    p = zt.add_parser("list", aliases=["ls"])
    p.add_argument("--ztoc-digest")
    p.add_argument("--image-ref")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_ztoc_list)
    p = zt.add_parser("info")
    p.add_argument("digest")
    p.set_defaults(func=cmd_ztoc_info)
    p = zt.add_parser("get-file", help="extract one file, reading only the spans it needs")
    p.add_argument("digest")
    p.add_argument("path")
    p.add_argument("-o", "--output")
    p.add_argument("--layer-file", help="the layer blob on local disk")
    p.add_argument("--image", help="REF whose registry serves the layer (Range requests)")
    _add_registry_flags(p)
    p.set_defaults(func=cmd_ztoc_get_file)
    return top


def fail(message: str) -> NoReturn:
    print(f"sociable: error: {message}", file=sys.stderr)
    raise SystemExit(1)


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    console = Console(quiet=args.quiet)
    try:
        args.func(args, console)
    except (CliError, conv.ConvertError, StoreError, OciError, ZinfoError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted")
    except Exception as e:  # the one exit point: name the failure, never a bare traceback
        from index.ztoc_codec import ZtocFormatError

        if isinstance(e, ZtocFormatError | ValueError | OSError):
            fail(f"{type(e).__name__}: {e}")
        raise


if __name__ == "__main__":
    main()
