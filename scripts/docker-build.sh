#!/usr/bin/env bash
# `docker build` with BuildKit (the Dockerfile uses `RUN --mount=type=cache`).
#
# Usage: scripts/docker-build.sh [docker build args...]    e.g.  -t swarm:local .
#
# Docker clients from 23.0 on build with BuildKit only through the buildx plugin; older
# clients (e.g. Debian 12's docker.io 20.10) have BuildKit built in. This picks the first
# client that can: $DOCKER if set, then `docker`, then /usr/bin/docker. Print the choice
# with `scripts/docker-build.sh --which`.
set -euo pipefail

buildkit_client() {
    local c v
    for c in ${DOCKER:-} docker /usr/bin/docker; do
        command -v "$c" >/dev/null 2>&1 || continue
        if "$c" buildx version >/dev/null 2>&1; then
            echo "$c"
            return 0
        fi
        # Prints the client version even when it then fails to reach the daemon.
        v=$("$c" version --format '{{.Client.Version}}' 2>/dev/null || true)
        if [[ $v =~ ^([0-9]+)\. ]] && ((BASH_REMATCH[1] < 23)); then
            echo "$c"
            return 0
        fi
    done
    echo "error: no Docker client with BuildKit: install the buildx plugin (docker-buildx)" >&2
    return 1
}

client=$(buildkit_client)
if [[ ${1:-} == --which ]]; then
    echo "$client"
    exit 0
fi
DOCKER_BUILDKIT=1 exec "$client" build "$@"
