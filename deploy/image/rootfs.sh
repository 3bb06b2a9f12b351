#!/usr/bin/env bash
# The image's base: a Debian root file system made by debootstrap (no base image can be pulled
# here), packed as a tarball that the Containerfile ADDs FROM scratch. Cached OUTSIDE the repo
# and reused while it exists; prints the tarball's path on stdout.
#
#   FACEPAY_DEBIAN_SUITE   default bookworm (its python3 is 3.11, the project's Python)
#   FACEPAY_DEBIAN_MIRROR  default: the first Debian mirror in this machine's apt sources
#   FACEPAY_IMAGE_CACHE    default /var/cache/facepay-image
set -euo pipefail

suite=${FACEPAY_DEBIAN_SUITE:-bookworm}
cache=${FACEPAY_IMAGE_CACHE:-/var/cache/facepay-image}
tarball=$cache/rootfs-$suite.tar
# python3-venv: the image's venv (its ensurepip wheel); ca-certificates: TLS to Redis/Qdrant.
packages=python3,python3-venv,ca-certificates

if [[ -s $tarball ]]; then
    echo "rootfs: reusing $tarball" >&2
    echo "$tarball"
    exit 0
fi

host_mirror() {
    # deb822 (*.sources): the URIs of the stanza that names Debian's main archive; else sources.list.
    local uri
    uri=$(awk '/^URIs:/ {print $2}' /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | grep -v -- '-security' | grep '/debian/\?$' | head -n1 || true)
    if [[ -z $uri && -f /etc/apt/sources.list ]]; then
        uri=$(awk '$1 == "deb" && $2 !~ /^\[/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list)
    fi
    echo "$uri"
}
mirror=${FACEPAY_DEBIAN_MIRROR:-$(host_mirror)}
if [[ -z $mirror ]]; then
    echo "rootfs: no Debian mirror in this machine's apt sources; set FACEPAY_DEBIAN_MIRROR" >&2
    exit 1
fi
command -v debootstrap >/dev/null || { echo "rootfs: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }

mkdir -p "$cache"
work=$(mktemp -d "$cache/rootfs-$suite.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "rootfs: debootstrap $suite ($packages) — a few minutes, once" >&2
debootstrap --variant=minbase --include="$packages" "$suite" "$work/root" "$mirror" >&2
rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"*
tar -C "$work/root" --numeric-owner -cf "$work/rootfs.tar" .
mv "$work/rootfs.tar" "$tarball"
echo "rootfs: $(du -h "$tarball" | cut -f1) in $tarball" >&2
echo "$tarball"
