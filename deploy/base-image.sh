#!/usr/bin/env bash
# Builds worldstream-base:cpu, the base of the CPU image (docker-compose.cpu.yml), with no image registry:
#   - Debian bookworm minbase with python3 (3.11) and venv, by mmdebstrap from the Debian mirror that this
#     machine's apt uses;
#   - the CPU build of torch that pip on this machine resolves for TORCH_SPEC (default: the Dockerfile's), in
#     /opt/wheels (PIP_FIND_LINKS);
#   - this machine's CA bundle, so that pip in the image builds reaches PyPI through the same HTTPS proxy. It is
#     copied at build time only and never committed.
# Does nothing when an image built from the same inputs exists. Needs a running Docker engine, mmdebstrap, root.
#   deploy/base-image.sh [PYTHON]    PYTHON: whose pip downloads torch (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-python3}
TAG=${WORLDSTREAM_BASE_IMAGE:-worldstream-base:cpu}
# Default: the Dockerfile's pin, the torch the CPU image installs.
TORCH_SPEC=${TORCH_SPEC:-$(sed -n 's/^ARG TORCH_SPEC=//p' deploy/Dockerfile)}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
WHEELS=build/base-image/wheels

# The host's Debian archive and security mirrors (deb822 URIs: or one-line deb entries).
apt_uris() {
    { grep -hsE '^[[:space:]]*(URIs:|deb[[:space:]])' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources \
            /etc/apt/sources.list.d/*.list || true; } | sed -E 's/\[[^]]*\]//' | awk '{for (i = 2; i <= NF; i++) print $i}'
}
uris=$(apt_uris)
mirror=$(grep -m1 -E '/debian/?$' <<<"$uris" || echo http://deb.debian.org/debian)
security=$(grep -m1 -E '/debian-security/?$' <<<"$uris" || echo http://deb.debian.org/debian-security)
sources=("deb ${mirror%/} bookworm main" "deb ${mirror%/} bookworm-updates main"
         "deb ${security%/} bookworm-security main")

rm -rf "$WHEELS" && mkdir -p "$WHEELS"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 -d "$WHEELS" "$TORCH_SPEC"
wheel=$(ls "$WHEELS")
inputs=$( { cat "$0"; printf '%s\n' "$wheel" "${sources[@]}"; cat "$CA_BUNDLE"; } | sha256sum | cut -c1-16)
if [ "$(docker image inspect -f '{{index .Config.Labels "org.worldstream.base.inputs"}}' "$TAG" 2>/dev/null)" \
        = "$inputs" ]; then
    echo "$TAG is up to date ($wheel)"
    exit 0
fi

echo "building $TAG: Debian bookworm minbase from $mirror + $wheel"
rootfs=build/base-image/rootfs.tar  # a file, not a pipe: a failed mmdebstrap must not import a broken image
mmdebstrap --quiet --variant=minbase --include=python3,python3-venv \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --customize-hook='mkdir -p "$1/etc/ssl/certs" "$1/opt/wheels"' \
    --customize-hook="upload $CA_BUNDLE /etc/ssl/certs/ca-certificates.crt" \
    --customize-hook="copy-in $WHEELS/$wheel /opt/wheels" \
    bookworm "$rootfs" "${sources[@]}"
docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV PIP_FIND_LINKS=/opt/wheels PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt LANG=C.UTF-8' \
    --change "LABEL org.worldstream.base.inputs=$inputs org.worldstream.base.torch=$wheel" \
    --change 'CMD ["python3"]' \
    "$rootfs" "$TAG"
rm "$rootfs"
