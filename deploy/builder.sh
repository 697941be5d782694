# shellcheck shell=bash
# Sourced by deploy/*.sh: picks the image builder and says which.
#
#   BUILDER=docker    `docker build` / `docker run` (a Docker daemon must answer)
#   BUILDER=buildah   `buildah build` / `buildah run` (no daemon; root or rootless)
#   unset             docker where a daemon answers `docker info`, else buildah
#
# BUILDAH_ISOLATION (chroot unless set) is passed to buildah build and buildah run:
# chroot works as root and rootless inside containers and CI runners where OCI
# runtimes cannot make cgroups; `oci` or `rootless` where they can.

pick_builder() {
    case "${BUILDER:-}" in
        docker|buildah) ;;
        "")
            if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
                BUILDER=docker
            elif command -v buildah >/dev/null 2>&1; then
                BUILDER=buildah
            else
                echo "gradserve: no image builder: start a Docker daemon, or install buildah" \
                     "(Debian/Ubuntu: apt-get install buildah)" >&2
                return 1
            fi ;;
        *) echo "gradserve: BUILDER must be docker or buildah, not '$BUILDER'" >&2; return 1 ;;
    esac
    export BUILDER
    export BUILDAH_ISOLATION="${BUILDAH_ISOLATION:-chroot}"
}

# Whether IMAGE exists in the builder's local store.
image_exists() {
    if [ "$BUILDER" = docker ]; then
        docker image inspect "$1" >/dev/null 2>&1
    else
        buildah inspect --type image "$1" >/dev/null 2>&1
    fi
}
