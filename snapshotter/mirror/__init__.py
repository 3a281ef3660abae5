"""The registry mirror as containerd sees it: the `hosts.toml` files that make containerd ask
this node's mirror first (`hoststoml`, behind `sociable-snapshotter mirror configure`)."""
