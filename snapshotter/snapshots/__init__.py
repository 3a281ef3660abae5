"""The Snapshots API: containerd's snapshot semantics over a metadata store.

- `service`: `SnapshotService` (Prepare … Cleanup as plain async Python) and the
  `LayerMounter` seam through which remote layers are mounted.
- `metadata`: the sqlite store of snapshots; `model`: its records; `filters`: List filters.
- `mounts`: overlay/bind mount specs for containerd and the overlay features of this kernel.
- `grpc_server`: the gRPC boundary (decode, call into trio, encode, one error table).

See docs/architecture.md.
"""
