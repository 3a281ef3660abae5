"""OCI plumbing shared by the `sociable` CLI and the daemon.

Image references, media types, descriptors and platforms, OCI image layouts, and the
registry client: `client.AsyncRegistryClient` (the one implementation: `session` for
endpoints, auth, TLS, redirects and blob locations; `manifests`, `blobs`, `uploads`,
`referrers`) and its synchronous facade `registry.RegistryClient` for the CLI. Import the
submodules directly (`from index.oci.registry import RegistryClient`).
"""
