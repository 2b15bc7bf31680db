#!/usr/bin/env bash
# Builds CRIU for `sandbox snapshot --with-processes` and installs it as /usr/local/sbin/criu.
# Debian bookworm's CRIU (3.17) fails on current kernels (vDSO bounds) and trixie's 4.1.1
# package needs a newer glibc, so this builds 4.1.1 from Debian's source tarball, checked
# against its digest, with the patches in this directory. Idempotent: does nothing when the
# same build is installed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
version=4.1.1
tarball=criu_${version}.orig.tar.xz
url=http://deb.debian.org/debian/pool/main/c/criu/$tarball
sha256=f80a66cb3726bb2116266d4759ce3bcbfab7abdb6b6d430bf20dd41911717afe
prefix=${CRIU_PREFIX:-/usr/local}
stamp=$prefix/lib/dev-box/criu.build
want="$version rundir=/dev/shm/dev-box-criu $(cat "$here"/*.patch | sha256sum | cut -d' ' -f1)"

if [[ -x $prefix/sbin/criu && -f $stamp && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi

build_deps=(curl ca-certificates xz-utils gcc make pkg-config patch libprotobuf-c-dev
  protobuf-c-compiler protobuf-compiler libprotobuf-dev libnl-3-dev libnet1-dev libcap-dev libbsd-dev
  libgnutls28-dev libnftables-dev)
"$here/../apt-install.sh" "${build_deps[@]}"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "building CRIU $version (about a minute)..." >&2
curl -fsSL --retry 3 -o "$work/$tarball" "$url"
echo "$sha256  $work/$tarball" | sha256sum -c --quiet
tar -C "$work" -xf "$work/$tarball"
src=$work/criu-$version
for p in "$here"/*.patch; do
  patch -s -d "$src" -p1 < "$p"
done
# CRIU caches what it learns of the kernel (~50 ms a run) only on a tmpfs; /run is not one on
# every host, so the cache goes to a root-only directory in /dev/shm that dev-box keeps.
make -s -C "$src" -j"$(nproc)" RUNDIR=/dev/shm/dev-box-criu criu > "$work/build.log" 2>&1 || {
  tail -30 "$work/build.log" >&2
  exit 1
}
install -D -m 0755 "$src/criu/criu" "$prefix/sbin/criu"
install -d "$prefix/lib/dev-box"
echo "$want" > "$stamp"
"$prefix/sbin/criu" --version | head -1 >&2
