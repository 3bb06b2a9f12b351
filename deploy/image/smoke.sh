#!/usr/bin/env bash
# Smoke test of a built image, as the image's own (non-root) user: the weights baked in verify,
# the CLI and a stage's worker start, the model cache and the code are not writable.
#
#   deploy/image/smoke.sh [IMAGE]      (default localhost/facepay:cpu)
set -euo pipefail
image=${1:-localhost/facepay:cpu}
buildah=(buildah --storage-driver vfs)

container=$("${buildah[@]}" from --pull-never "$image")
trap '"${buildah[@]}" rm "$container" >/dev/null' EXIT
# `buildah run` runs as the image's USER (no --user given): what a pod runs as.
run() { "${buildah[@]}" run --isolation chroot "$container" -- "$@"; }

check() {
    local what=$1; shift
    if "$@"; then echo "smoke: ok    $what"; else echo "smoke: FAIL  $what" >&2; exit 1; fi
}
user_is_facepay() { [[ $(run id -u) == 10001 && $(run id -g) == 10001 ]]; }
models_verify() { run facepay models verify >/dev/null; }
cli_help() { run facepay --help | grep -q "worker"; }
worker_help() { run facepay worker pose --help >/dev/null; }
contract_current() { [[ $(run facepay contract build) == /opt/facepay/lib/python3*/site-packages/facepay/v1 ]]; }
stage_import() { run python -c "import services.pose.stage" >/dev/null; }
cache_read_only() { ! run touch /opt/facepay-models/probe 2>/dev/null && ! run touch /opt/facepay/probe 2>/dev/null; }
workdir_writable() { run sh -c 'touch /var/lib/facepay/probe && rm /var/lib/facepay/probe'; }

check "runs as uid/gid 10001 (non-root)" user_is_facepay
check "facepay models verify (weights in the image, sha256)" models_verify
check "facepay --help" cli_help
check "facepay worker pose --help" worker_help
check "facepay contract build: shipped code is current, nothing written" contract_current
check "import services.pose.stage" stage_import
check "model cache and code are read-only to the user" cache_read_only
check "working directory /var/lib/facepay is writable (mount a volume there)" workdir_writable
echo "smoke: writable by uid 10001 (mount volumes/emptyDirs there under a read-only root fs):" \
    "$(run sh -c 'find / -xdev \( -path /proc -o -path /sys -o -path /dev \) -prune -o -writable -type d -print 2>/dev/null || true' | tr '\n' ' ')"
echo "smoke: $image ok"
