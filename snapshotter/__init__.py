"""sociable-snapshotter: the containerd proxy snapshotter daemon."""
