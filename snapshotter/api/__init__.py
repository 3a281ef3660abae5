"""Generated containerd Snapshots, Content and Images API stubs (proto/generate.sh); do not edit."""
