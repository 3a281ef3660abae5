"""Lazily mounted layers: the remote-snapshot handshake between containerd and the FUSE host.

Modules, one concern each:

- `labels`: label keys (CRI's and ours) and the parsed `LayerLabels` of a Prepare.
- `errors`: this package's exceptions (`NoIndex`, `NoZtoc`, ...), each a fallback reason.
- `discovery`: find an image's SOCI index (spec/soci.md §3.5) and fetch its zTOCs.
- `unpack`: the local fallback for a layer without a zTOC (download, decompress, diffID check);
  `apply`: applying a tar stream with overlay whiteouts, as containerd's applier does.
- `bindmount`: mount(2)/umount2(2) and `/proc/self/mountinfo` helpers.
- `mounter`: `RemoteMounter`, the daemon's `LayerMounter`, and `open_remote_mounter`.
"""
