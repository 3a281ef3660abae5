"""OCI plumbing shared by the `sociable` CLI and the daemon.

Image references, media types, descriptors and platforms, OCI image layouts, and the
registry client (auth, Range reads, redirects, push, referrers, `hosts.toml` mirrors).
Import the submodules directly (`from index.oci.registry import RegistryClient`).
"""
