# A stand-in for prom/prometheus:v<version>, made by scripts/base-images.sh on machines
# that cannot pull it: Debian bookworm's `prometheus` package (which must be that
# version), with the official image's user, paths, entrypoint and default arguments.
FROM debian:bookworm-slim

ARG PROMETHEUS_VERSION
RUN apt-get update \
 && apt-get install -y --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/* \
 && /usr/bin/prometheus --version 2>&1 | grep -q "version ${PROMETHEUS_VERSION}[+ ]" \
 && install -d -o nobody -g nogroup /prometheus \
 && install -d /etc/prometheus

USER nobody
WORKDIR /prometheus
EXPOSE 9090
VOLUME ["/prometheus"]
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
