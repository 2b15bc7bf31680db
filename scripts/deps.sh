#!/usr/bin/env bash
# Installs the Debian packages dev-box needs: at run time (btrfs-progs, util-linux, iproute2,
# nftables and conntrack for sandbox networks) and for
# its tests (busybox-static for test images), and builds CRIU ≥ 4.1 for
# snapshots with processes (scripts/criu/build.sh). `scripts/deps.sh bench` adds the peers the
# benchmark compares against. Idempotent: does nothing when everything is there.
set -euo pipefail

# python3-venv: the test command's validator of the OpenAPI document (from PyPI).
packages=(btrfs-progs util-linux busybox-static iproute2 nftables conntrack ca-certificates python3 python3-venv procps curl)
if [[ "${1:-}" == "bench" ]]; then
  # netavark and iptables: podman's default bridge network, for the network row.
  packages+=(runc bubblewrap podman netavark iptables hyperfine)
fi

"$(dirname "$0")"/apt-install.sh "${packages[@]}"

"$(dirname "$0")"/criu/build.sh
