#!/usr/bin/env bash
# Builds the images' Python base from Debian's archive with mmdebstrap, for sites
# that cannot pull python:3.11-slim from a registry (`make image BASE=debootstrap`).
#
#   deploy/debian-base.sh IMAGE        e.g. localhost/gradserve-python:bookworm
#
# The result is a minimal Debian (variant minbase) with Debian's python3, venv
# and CA certificates: what deploy/Dockerfile* need from a Python base (a
# `python` on PATH that can make a venv, /bin/sh, groupadd/useradd).
#
# Variables (defaults shown):
#   SUITE=bookworm                           Debian release; bookworm's python3 is 3.11,
#                                            the Python deploy/constraints.txt was made with
#   MIRROR=http://deb.debian.org/debian      any Debian mirror: a local one, or
#                                            http://snapshot.debian.org/archive/debian/<date>/
#                                            to pin every package to one day's archive
#   SECURITY_MIRROR=http://deb.debian.org/debian-security   (none: leave it out)
#   BUILDER=docker|buildah                   see deploy/builder.sh
#
# Needs mmdebstrap (apt-get install mmdebstrap) and root, or unprivileged user
# namespaces with subuids (mmdebstrap's unshare mode).
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/builder.sh

name=${1:?usage: deploy/debian-base.sh IMAGE}
suite=${SUITE:-bookworm}
mirror=${MIRROR:-http://deb.debian.org/debian}
security=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}
pick_builder
command -v mmdebstrap >/dev/null || { echo "gradserve: BASE=debootstrap needs mmdebstrap" \
                                           "(apt-get install mmdebstrap)" >&2; exit 1; }

sources=("deb $mirror $suite main" "deb $mirror $suite-updates main")
[ "$security" = none ] || sources+=("deb $security $suite-security main")

mkdir -p build
rootfs=build/gradserve-python-$suite.tar
echo ">> mmdebstrap $suite from $mirror -> $rootfs"
mmdebstrap --variant=minbase \
    --include=python3,python3-venv,python-is-python3,ca-certificates,passwd \
    --aptopt='APT::Install-Recommends "false"' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    "$suite" "$rootfs" "${sources[@]}"

# The configuration a registry python image has: PATH, a UTF-8 locale, python3.
path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
echo ">> importing $rootfs as $name ($BUILDER)"
if [ "$BUILDER" = docker ]; then
    docker import --change "ENV PATH=$path" --change "ENV LANG=C.UTF-8" \
        --change 'CMD ["python3"]' "$rootfs" "$name"
else
    ctr=$(buildah from scratch)
    trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
    buildah add --quiet "$ctr" "$rootfs" /
    buildah config --env "PATH=$path" --env LANG=C.UTF-8 --cmd python3 \
        --label "org.opencontainers.image.description=Debian $suite minbase with python3 (mmdebstrap)" "$ctr"
    buildah commit --quiet --rm "$ctr" "$name"
    trap - EXIT
fi
rm -f "$rootfs"
echo ">> built $name"
