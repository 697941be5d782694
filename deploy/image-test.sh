#!/usr/bin/env bash
# Smoke test of a built gradserve image (`make image-test` runs it after `make image`):
#
#   deploy/image-test.sh IMAGE
#
# 1. starts the image's own ENTRYPOINT + CMD (the bundled digits model),
# 2. waits until the image's own HEALTHCHECK command says SERVING,
# 3. runs examples/saliency.py inside the container against it: a Forward and a
#    Vjp through the server, checked against the example's expected output,
# 4. sends SIGTERM and expects the server to drain and exit 0 within its grace.
#
# With BUILDER=docker (a daemon answers): `docker run`, `docker exec`, `docker kill
# -s TERM`, the server as PID 1. With BUILDER=buildah (no daemon): `buildah from`
# and one `buildah run` (BUILDAH_ISOLATION, chroot by default) of a script that
# does the same with the server in the background of a shell.
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/builder.sh

image=${1:?usage: deploy/image-test.sh IMAGE}
pick_builder
image_exists "$image" || { echo "gradserve: no image $image: run make image first" >&2; exit 1; }

# The image's configuration: what it runs, and how it checks its health.
if [ "$BUILDER" = docker ]; then
    config=$(docker image inspect --format '{{json .Config}}' "$image")
else
    config=$(buildah inspect --type image "$image" \
             | python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin)["Docker"]["config"]))')
fi
read_config() {   # read_config KEY: the JSON list, space-joined (no argument has spaces)
    python3 -c 'import json, sys
c = json.loads(sys.argv[1]); key = sys.argv[2]
v = (c.get("Healthcheck") or {}).get("Test") if key == "Healthcheck" else c.get(key)
print(" ".join(v or []))' "$config" "$1"
}
server="$(read_config Entrypoint) $(read_config Cmd)"
health=$(read_config Healthcheck)
case "$health" in
    "CMD "*) health=${health#CMD } ;;
    *) echo "FAIL: the image has no exec-form HEALTHCHECK (got '$health')" >&2; exit 1 ;;
esac
echo ">> image      $image ($BUILDER)"
echo ">> server     $server"
echo ">> health     $health"

smoke=/tmp/gradserve-smoke
if [ "$BUILDER" = docker ]; then
    name=gradserve-image-test-$$
    cleanup() { docker rm -f "$name" >/dev/null 2>&1 || true; }
    trap cleanup EXIT
    docker run -d --name "$name" "$image" >/dev/null
    docker exec "$name" mkdir -p "$smoke"
    docker cp examples/saliency.py "$name:$smoke/saliency.py"
    docker cp examples/digits_samples.npz "$name:$smoke/digits_samples.npz"
    docker cp deploy/smoke.sh "$name:$smoke/smoke.sh"
    # The in-container steps without starting a server (PID 1 is the server).
    docker exec -e "HEALTH=$health" "$name" sh "$smoke/smoke.sh" --probe-only
    status=$(docker inspect --format '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$name")
    echo ">> docker reports the container ${status:-without a health status}"
    echo ">> SIGTERM to the server (PID 1)"
    start=$SECONDS
    docker kill --signal TERM "$name" >/dev/null
    rc=$(timeout 60 docker wait "$name")
    echo ">> server exited $rc after $((SECONDS - start)) s"
    docker logs "$name" 2>&1 | tail -n 5 | sed 's/^/   server| /'
    [ "$rc" = 0 ] || { echo "FAIL: the server exited $rc on SIGTERM"; exit 1; }
else
    ctr=$(buildah from --pull-never "$image")
    cleanup() { buildah rm "$ctr" >/dev/null 2>&1 || true; }
    trap cleanup EXIT
    buildah copy --quiet --chown 10001:10001 "$ctr" examples/saliency.py \
        examples/digits_samples.npz deploy/smoke.sh "$smoke/"
    # shellcheck disable=SC2086  # word splitting: the server's argv
    buildah run --isolation "$BUILDAH_ISOLATION" --env "HEALTH=$health" "$ctr" -- \
        sh "$smoke/smoke.sh" $server
fi
echo "PASS: $image serves, reports SERVING, computes gradients for a client, stops cleanly on SIGTERM"
