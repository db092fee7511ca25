# The Rust builder base image, made by scripts/base-images.sh on machines that cannot pull
# the official one: Debian bookworm slim, the C toolchain cargo links with, and a Rust
# toolchain copied from the host (the build context holds it as `toolchain/`), laid out
# with the paths and environment of the official rust:<version>-slim-bookworm image.
# Unlike the official image it has no rustup: cargo, rustc and rustdoc are linked
# straight into $CARGO_HOME/bin. It also trusts the CA certificates the host trusts beyond
# Debian's own (`host-ca-certificates.crt` in the context), so that cargo reaches crates.io
# through a TLS-intercepting proxy exactly when the host's cargo does.
FROM debian:bookworm-slim

ARG RUST_VERSION
ARG RUST_TARGET
ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    RUST_VERSION=${RUST_VERSION}

RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

COPY host-ca-certificates.crt /tmp/host-ca-certificates.crt
RUN awk ' \
        /-----BEGIN CERTIFICATE-----/ { c = "" } \
        { c = c $0 "\n" } \
        /-----END CERTIFICATE-----/ { \
            if (FILENAME == ARGV[1]) known[c] = 1; \
            else if (!(c in known)) { \
                f = sprintf("/usr/local/share/ca-certificates/host-%d.crt", ++n); \
                printf "%s", c > f; close(f) \
            } \
        }' /etc/ssl/certs/ca-certificates.crt /tmp/host-ca-certificates.crt \
 && rm /tmp/host-ca-certificates.crt \
 && update-ca-certificates

COPY toolchain /usr/local/rustup/toolchains/${RUST_VERSION}-${RUST_TARGET}

RUN set -eu; \
    tc="$RUSTUP_HOME/toolchains/$RUST_VERSION-$RUST_TARGET"; \
    mkdir -p "$CARGO_HOME/bin"; \
    for b in cargo rustc rustdoc; do ln -s "$tc/bin/$b" "$CARGO_HOME/bin/$b"; done; \
    chmod a+w "$RUSTUP_HOME" "$CARGO_HOME"; \
    cargo --version; \
    rustc --version | grep -q "^rustc $RUST_VERSION "
