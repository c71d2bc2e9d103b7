#!/usr/bin/env bash
# Make sure the Debian packages libcaller builds with are installed.
#
# Usage: scripts/ensure-deps.sh [extra-package ...]
#
# Fast when everything is present (one dpkg-query per package, no apt call).
# As root, installs what is missing; otherwise says what to install and fails.
set -euo pipefail

packages=(cmake pkg-config gcc make libuv1-dev libzmq3-dev
    libjansson-dev libsodium-dev libglib2.0-dev python3-jupyter-client python3-ipykernel jupyter-console "$@")

missing=()
for pkg in "${packages[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    if [[ "$status" != "install ok installed" ]]; then
        missing+=("$pkg")
    fi
done

if ((${#missing[@]} == 0)); then
    exit 0
fi

if [[ "$(id -u)" -ne 0 ]]; then
    echo "libcaller needs: ${missing[*]}" >&2
    echo "Run as root:  sudo apt-get install -y ${missing[*]}" >&2
    exit 1
fi

echo "ensure-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq -o Dpkg::Use-Pty=0 "${missing[@]}"
