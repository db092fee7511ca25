# swarm: one `swarm` binary (coordinator, worker, CLI) on Debian slim, running as a
# non-root user.
#
#   docker build -t swarm:local .            (BuildKit: the default builder of Docker 23+;
#                                             scripts/docker-build.sh finds one otherwise)
#
# Offline machines: scripts/base-images.sh makes both base images from Debian packages.
# Building needs crates.io (cargo) and a Debian mirror (tini).

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
# The registry and target dir live in BuildKit cache mounts, so a rebuild compiles only
# the workspace's own crates, not its dependencies. Cargo decides freshness by mtime, and a
# context can carry sources older than the cached artifacts (git archive, a git URL, an
# older checkout), so the workspace's files are touched first: its crates always
# rebuild. The binary is copied out of the cache mount in the same step.
RUN --mount=type=cache,id=swarm-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=swarm-cargo-git,target=/usr/local/cargo/git \
    --mount=type=cache,id=swarm-target-release,target=/src/target \
    find . -path ./target -prune -o -type f -exec touch {} + \
 && cargo build --release --locked -p swarm-cli --bin swarm \
 && install -D -m 0755 target/release/swarm /out/swarm \
 && /out/swarm --version

FROM debian:bookworm-slim
# tini reaps the orphans agent processes leave behind (the worker is PID 1's only child)
# and forwards SIGTERM, on which coordinators and workers shut down cleanly.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 swarm \
 && useradd --system --uid 10001 --gid swarm --home-dir /var/lib/swarm --shell /usr/sbin/nologin swarm \
 && install -d -o swarm -g swarm -m 0750 /var/lib/swarm /etc/swarm/certs /etc/swarm/token /etc/swarm/ca \
    /etc/swarm/issue/coordinator-1 /etc/swarm/issue/coordinator-2 /etc/swarm/issue/coordinator-3 \
    /etc/swarm/issue/enroll \
 && install -d -o swarm -g swarm -m 0755 /etc/swarm/issue/ca-public
COPY --from=build /out/swarm /usr/local/bin/swarm

# Where things go (named volumes mounted here start out owned by the swarm user):
#   /var/lib/swarm        coordinator Raft data (--data-dir)
#   /etc/swarm/certs      ca.pem and the coordinator or worker certificate and key
#   /etc/swarm/token      api-token, the bearer token for /v1/*
#   /etc/swarm/ca         ca-key.pem, only in docker-compose.yml's one-shot init service
#   /etc/swarm/issue/*    where that init service writes each node's certificates
ENV SWARM_DATA_DIR=/var/lib/swarm \
    SWARM_CERTS=/etc/swarm/certs \
    SWARM_TOKEN_FILE=/etc/swarm/token/api-token
USER 10001:10001
WORKDIR /var/lib/swarm
# 7070/udp: QUIC for workers and Raft peers; 8080/tcp: HTTPS API, /health, /ready, /metrics.
EXPOSE 7070/udp 8080/tcp

# Liveness of a coordinator: the process answers and its data dir takes an fsync'd write
# (/health never depends on quorum). The API listens beyond loopback, so it serves HTTPS
# (`--api-tls auto`), verified with the cluster CA. Workers serve no HTTP: disable it for
# them (docker-compose.yml does).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/swarm", "probe", "live", "--api", "https://127.0.0.1:8080", "--ca", "/etc/swarm/certs/ca.pem"]

ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/swarm"]
CMD ["--help"]
