"""Domain errors of the snapshotter daemon.

The tree is small on purpose; each class says when you see it. The gRPC layer
translates these to status codes in exactly one table
(`snapshotter.snapshots.grpc_server.STATUS_FOR_ERROR`); nothing else inspects them by type
to pick a code.

    SnapshotterError
    ├── NotFound             unknown key/name, missing parent
    ├── AlreadyExists        key or commit name taken; remote-snapshot handshake
    ├── FailedPrecondition   wrong state: Commit of a non-active, Mounts of a
    │                        committed snapshot, Remove of a snapshot with children
    ├── InvalidArgument      malformed input: bad filter, immutable field path,
    │                        parent not committed
    ├── Unavailable          a lazily mounted layer failed its health check
    ├── Unimplemented        an operation this daemon does not offer
    ├── ConfigError          a configuration file is missing or invalid
    ├── UsageError           the command line is malformed
    ├── RootLocked           another daemon holds the root (snapshotter.rootlock)
    └── DaemonError          the daemon cannot start (snapshotter.daemon)
        └── AddressInUse     another process answers on the socket address

The command line's exit status for each is one table, `snapshotter.cli.EXIT_CODES`.
Errors raised inside trio nurseries arrive as ExceptionGroups; `index.exitpoint.leaf_error`
is the one place that unwraps them.
"""

from __future__ import annotations


class SnapshotterError(Exception):
    """Base of every error the snapshotter raises on purpose."""


class NotFound(SnapshotterError):
    """The named snapshot (or the parent it refers to) does not exist."""


class AlreadyExists(SnapshotterError):
    """A snapshot with that key or name already exists."""


class FailedPrecondition(SnapshotterError):
    """The snapshot exists but is in the wrong state for the operation."""


class InvalidArgument(SnapshotterError):
    """The request itself is malformed or asks for something never allowed."""


class Unavailable(SnapshotterError):
    """A backing resource (a remote layer mount) is temporarily unusable."""


class Unimplemented(SnapshotterError):
    """The operation is not offered by this daemon."""


class ConfigError(SnapshotterError):
    """A configuration file cannot be read or holds an invalid value."""


class UsageError(SnapshotterError):
    """The command line is malformed (unknown option, missing operand)."""
