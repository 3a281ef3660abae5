"""Installing sociable on a node (docs/install.md) and EKS node launch user data
(docs/eks.md).

    command     the `install`/`uninstall` command lines (also `python -m snapshotter.install`)
    installer   plan, apply and undo an install, recorded in a manifest
    layout      where things go, under `--prefix`
    files       one file's change: diff, backup, atomic write
    manifest    /etc/sociable/install.json
    containerd  containerd's config.toml merged (tomlkit), version 2 or 3
    kubelet     kubelet's image-service endpoint for the CRI proxy
    units       systemd units, docs, containerd's drop-in, a first config
    venv        the virtual environment from a wheelhouse
    bundle      `make dist`: the tarball with the wheelhouse and install.sh
    eks         EKS user data (AL2023 nodeadm, AL2 bootstrap.sh)

`install` and `uninstall` import nothing of the daemon (no trio, grpc, httpx or PyYAML;
`eks` needs PyYAML): a bundle's `install.sh` runs them from its wheels before any of them is
installed (tests/unit/test_install_node.py checks it).
"""
