"""Generated containerd Snapshots API stubs (proto/generate.sh); do not edit."""
