"""Kubernetes CRI: the client side of containerd's CRI ImageService (`pull`).

See docs/architecture.md.
"""
