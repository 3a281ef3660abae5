#!/usr/bin/env bash
# Installs everything sociable and its tests need on Debian 12. Idempotent: re-running it
# installs nothing new. Needs root for apt-get (it uses sudo when not root).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  containerd runc docker-registry skopeo umoci
  fuse3 gcc python3-dev
  busybox-static pigz gzip tar iproute2 util-linux dnsmasq-base shellcheck
)

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY="${PYTHON:-python3}"
if ! "$PY" -c "import index, snapshotter, pytest_trio, hypothesis, cryptography" 2>/dev/null \
   || [ pyproject.toml -nt .setup-stamp ]; then
  echo "setup: installing Python packages (pip install -e '.[test]')"
  "$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore -e '.[test]'
  touch .setup-stamp
fi
