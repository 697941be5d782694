#!/usr/bin/env bash
# Builds a gradserve image: `make image` / `make image-gpu` run this.
#
#   deploy/build-image.sh cpu|gpu IMAGE
#
# Variables (the Makefile passes its own through; defaults shown):
#   BASE=registry        FROM python:3.11-slim, pulled from its registry (PYTHON_IMAGE
#                        names another, e.g. a mirror's copy or one pinned by digest)
#   BASE=debootstrap     FROM a Python base built here from Debian's archive with
#                        mmdebstrap (deploy/debian-base.sh; SUITE, MIRROR,
#                        SECURITY_MIRROR), for sites that cannot pull from a registry.
#                        Built once, then reused: REBUILD_BASE=1 builds it again.
#   BUILDER=docker|buildah   see deploy/builder.sh (default: docker where a daemon
#                        answers, else buildah with BUILDAH_ISOLATION=chroot)
#   WHEELS=DIR           copy DIR/*.whl into deploy/wheels/ first (replacing the wheels
#                        there): a torch wheel there is installed with no index
#   BUILD_ARGS="..."     more flags for the builder (--build-arg TORCH_INDEX=..., --no-cache)
#   PIP_CERT=FILE        a CA bundle pip inside the build trusts (as pip's own PIP_CERT),
#                        passed as the build secret `pip-cert`
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/builder.sh

flavour=${1:?usage: deploy/build-image.sh cpu|gpu IMAGE}
image=${2:?usage: deploy/build-image.sh cpu|gpu IMAGE}
case "$flavour" in
    cpu) dockerfile=deploy/Dockerfile ;;
    gpu) dockerfile=deploy/Dockerfile.gpu ;;
    *) echo "gradserve: the first argument is cpu or gpu, not '$flavour'" >&2; exit 2 ;;
esac
pick_builder

args=()
case "${BASE:-registry}" in
    registry)
        [ -z "${PYTHON_IMAGE:-}" ] || args+=(--build-arg "PYTHON_IMAGE=$PYTHON_IMAGE") ;;
    debootstrap)
        base=${PYTHON_IMAGE:-localhost/gradserve-python:${SUITE:-bookworm}}
        if [ -n "${REBUILD_BASE:-}" ] || ! image_exists "$base"; then
            deploy/debian-base.sh "$base"
        else
            echo ">> reusing the Debian Python base $base (REBUILD_BASE=1 builds it again)"
        fi
        args+=(--build-arg "PYTHON_IMAGE=$base") ;;
    *) echo "gradserve: BASE must be registry or debootstrap, not '$BASE'" >&2; exit 2 ;;
esac

if [ -n "${WHEELS:-}" ]; then
    compgen -G "$WHEELS/*.whl" >/dev/null \
        || { echo "gradserve: WHEELS=$WHEELS holds no *.whl" >&2; exit 2; }
    rm -f deploy/wheels/*.whl
    cp -l "$WHEELS"/*.whl deploy/wheels/ 2>/dev/null || cp "$WHEELS"/*.whl deploy/wheels/
    echo ">> wheels offered to the build: $(cd deploy/wheels && echo *.whl)"
fi

# pip's CA bundle, where this machine's pip needs one (a TLS-intercepting proxy), is
# the build's too: a build secret, so it lands in no layer of the image.
if [ -n "${PIP_CERT:-}" ] && [ -s "$PIP_CERT" ]; then
    args+=(--secret "id=pip-cert,src=$PIP_CERT")
fi

# BUILD_ARGS is split on spaces on purpose: several flags in one variable.
# shellcheck disable=SC2206
args+=(${BUILD_ARGS:-})
echo ">> building $image from $dockerfile with $BUILDER (BASE=${BASE:-registry})"
start=$SECONDS
if [ "$BUILDER" = docker ]; then
    # BuildKit reads $dockerfile.dockerignore by itself.
    DOCKER_BUILDKIT=1 docker build -f "$dockerfile" -t "$image" "${args[@]}" .
else
    # Docker format: OCI image configs have no HEALTHCHECK. --layers caches each step.
    buildah build --format docker --layers --isolation "$BUILDAH_ISOLATION" \
        --ignorefile "$dockerfile.dockerignore" -f "$dockerfile" -t "$image" "${args[@]}" .
fi
echo ">> built $image in $((SECONDS - start)) s"
