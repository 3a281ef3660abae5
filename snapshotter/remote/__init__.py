"""Lazily mounted layers: the remote-snapshot handshake between containerd and the FUSE host.

Modules, one concern each:

- `labels`: label keys (CRI's and ours) and the parsed `LayerLabels` of a Prepare.
- `errors`: this package's exceptions (`NoIndex`, `NoZtoc`, ...), each a fallback reason.
- `discovery`: find an image's SOCI index (docs/format.md, "Finding an index") and fetch its zTOCs.
- `catalog`: the discovery cache (image manifest -> index and zTOCs; singleflight, bounded).
- `trees`, `preresolve`: layer trees from zTOCs, built ahead in the background.
- `treeprocs`: building a tree from zTOC bytes, in worker processes off the daemon's interpreter.
- `heap`: malloc tuning of the daemon and giving freed heap back.
- `records`: restore records (`<root>/remote/snap-<id>.json`).
- `layers`: mounting a lazy layer (FUSE host, bind mount, its task scope, background fetch).
- `local`, `unpack`, `apply`: the local-unpack fallback (download, decompress, apply the tar
  with overlay whiteouts as containerd's applier does).
- `bindmount`: bind mounts of layer subtrees and their removal (mount(2)/umount2(2)).
- `mounter`: `RemoteMounter` (the fallback matrix) and `DegradedMounter`.
- `compose`: `open_remote_mounter`, the composition root, start-up policy and task tree.
- `status`: `<root>/status.json` and `sociable-snapshotter status`.

See docs/architecture.md and docs/snapshotter.md.
"""
