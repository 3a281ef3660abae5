"""Generated containerd Snapshots, Content and Images API and CRI ImageService stubs (proto/generate.sh); do not edit."""
