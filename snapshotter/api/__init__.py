"""Generated containerd Snapshots and Content API stubs (proto/generate.sh); do not edit."""
