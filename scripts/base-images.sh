#!/usr/bin/env bash
# Make, from Debian packages, the base images the Dockerfile's FROM lines name (and any
# image named as an argument), for machines that cannot pull from a registry. An image
# that already exists (made here earlier, or pulled) is left alone, so a second run
# costs a second.
#
#   debian:bookworm-slim       debootstrap --variant=minbase bookworm, with the updates and
#                              security pockets applied and docs, man pages and locales left
#                              out like the official slim image, then `docker import`
#   rust:<X.Y>-slim-bookworm   that image plus gcc, libc6-dev, ca-certificates and the
#                              host's Rust <X.Y> toolchain (deploy/base-images/rust.Dockerfile)
#   prom/prometheus:v<version> Debian's prometheus package, which must be that version
#                              (deploy/base-images/prometheus.Dockerfile); only on request
#
# Usage: scripts/base-images.sh [--check] [IMAGE...]
#   --check  only report what is missing (exit 1 if anything is)
#   IMAGE    more images to make, e.g. prom/prometheus:v2.42.0 for the compose test
#
# Environment:
#   DEBIAN_MIRROR           default http://deb.debian.org/debian
#   DEBIAN_SECURITY_MIRROR  default http://deb.debian.org/debian-security
#   SWARM_BASE_CACHE        .deb cache and lock, default /var/cache/swarm-base-images
#   RUST_SYSROOT            toolchain to copy, default `rustc --print sysroot`
#   HOST_CA_BUNDLE          CA bundle whose extra certificates (beyond Debian's) the Rust
#                           image trusts, for TLS-intercepting proxies; default
#                           /etc/ssl/certs/ca-certificates.crt if present
#
# Making debian:bookworm-slim needs root (debootstrap, chroot); apt-get installs
# debootstrap if it is missing.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
dockerfile=$repo/Dockerfile
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
security_mirror=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
cache=${SWARM_BASE_CACHE:-/var/cache/swarm-base-images}
DOCKER=${DOCKER:-docker}

log() { echo "base-images: $*" >&2; }
die() {
    echo "base-images: error: $*" >&2
    exit 1
}

have_image() { "$DOCKER" image inspect "$1" >/dev/null 2>&1; }

# External images named by FROM lines (stage names excluded), in order.
base_images() {
    awk '
        toupper($1) == "FROM" {
            img = ""
            for (i = 2; i <= NF; i++) if ($i !~ /^--/) { img = $i; break }
            if (!(img in stage)) print img
            for (i = 2; i <= NF; i++) if (toupper($i) == "AS") stage[$(i + 1)] = 1
        }' "$dockerfile"
}

rootfs=
staging=
# shellcheck disable=SC2317  # run by the EXIT trap
cleanup() {
    if [[ -n $rootfs ]]; then
        umount "$rootfs/proc" 2>/dev/null || true
        rm -rf "$rootfs"
    fi
    [[ -z $staging ]] || rm -rf "$staging"
}
trap cleanup EXIT

# debian:<suite>-slim from debootstrap.
make_debian_slim() {
    local image=$1 suite=$2
    [[ $(id -u) == 0 ]] || die "making $image needs root (debootstrap and chroot)"
    if ! command -v debootstrap >/dev/null 2>&1; then
        log "installing debootstrap"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    fi
    mkdir -p "$cache/debs"
    rootfs=$(mktemp -d /var/tmp/swarm-rootfs.XXXXXX)
    log "debootstrap $suite from $mirror"
    debootstrap --variant=minbase --cache-dir="$cache/debs" "$suite" "$rootfs" "$mirror" \
        >"$cache/debootstrap.log" 2>&1 || die "debootstrap failed; see $cache/debootstrap.log"

    # What the official slim image leaves out, now and from later installs.
    cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
EOF
    cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    rm -f "$rootfs/etc/apt/sources.list"
    cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $suite $suite-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security_mirror
Suites: $suite-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    log "applying $suite-updates and $suite-security"
    cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
    mount -t proc proc "$rootfs/proc"
    chroot "$rootfs" /bin/sh -ec '
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get upgrade -y -qq >/dev/null
        apt-get clean' >>"$cache/debootstrap.log" 2>&1 || die "apt-get upgrade in the new rootfs failed; see $cache/debootstrap.log"
    umount "$rootfs/proc"
    (
        cd "$rootfs"
        find usr/share/doc -mindepth 1 -not -name copyright -not -type d -delete
        find usr/share/doc -mindepth 1 -type d -empty -delete
        rm -rf usr/share/man/* usr/share/groff/* usr/share/info/* usr/share/lintian/* usr/share/linda/*
        find usr/share/locale -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
        rm -rf var/lib/apt/lists/* var/cache/apt/*.bin var/cache/apt/archives/*.deb tmp/* var/tmp/*
        find var/log -type f -delete
        : >etc/resolv.conf
        : >etc/hostname
    )
    log "importing $image"
    tar --numeric-owner -C "$rootfs" -c . |
        "$DOCKER" import \
            --change 'CMD ["bash"]' \
            --change "LABEL org.swarm.base-image=\"debootstrap $suite from $mirror\"" \
            - "$image" >/dev/null
    rm -rf "$rootfs"
    rootfs=
}

# rust:<X.Y>-slim-<suite> from the Debian image plus the host's toolchain.
make_rust() {
    local image=$1 want=$2 suite=$3
    have_image "debian:$suite-slim" || make_debian_slim "debian:$suite-slim" "$suite"
    local sysroot=${RUST_SYSROOT:-}
    if [[ -z $sysroot ]]; then
        command -v rustc >/dev/null 2>&1 || die "making $image needs a Rust $want toolchain on this host (or RUST_SYSROOT)"
        sysroot=$(rustc --print sysroot)
    fi
    local version target
    version=$("$sysroot/bin/rustc" -vV | sed -n 's/^release: //p')
    target=$("$sysroot/bin/rustc" -vV | sed -n 's/^host: //p')
    [[ $version == "$want" || $version == "$want".* ]] ||
        die "$image needs Rust $want but $sysroot is Rust $version; point RUST_SYSROOT at a $want toolchain (rustup toolchain install $want)"
    staging=$(mktemp -d /var/tmp/swarm-rust-image.XXXXXX)
    cp "$repo/deploy/base-images/rust.Dockerfile" "$staging/Dockerfile"
    # Hard links when the toolchain is on the same filesystem: no copy, no extra space.
    cp -al "$sysroot" "$staging/toolchain" 2>/dev/null || cp -a "$sysroot" "$staging/toolchain"
    rm -rf "$staging/toolchain/share/doc" "$staging/toolchain/lib/rustlib/src"
    local bundle=${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
    if [[ -f $bundle ]]; then
        cp "$bundle" "$staging/host-ca-certificates.crt"
    else
        : >"$staging/host-ca-certificates.crt"
    fi
    log "building $image (Rust $version, $target) from $sysroot"
    "$repo/scripts/docker-build.sh" -q -t "$image" \
        --build-arg RUST_VERSION="$version" --build-arg RUST_TARGET="$target" \
        "$staging" >/dev/null || die "building $image failed"
    rm -rf "$staging"
    staging=
}

# prom/prometheus:v<version> from Debian's package.
make_prometheus() {
    local image=$1 version=${1##*:v}
    have_image debian:bookworm-slim || make_debian_slim debian:bookworm-slim bookworm
    staging=$(mktemp -d /var/tmp/swarm-prometheus-image.XXXXXX)
    cp "$repo/deploy/base-images/prometheus.Dockerfile" "$staging/Dockerfile"
    log "building $image from Debian's prometheus package"
    "$repo/scripts/docker-build.sh" -q -t "$image" --build-arg PROMETHEUS_VERSION="$version" \
        "$staging" >/dev/null || die "building $image failed (is Debian's prometheus $version?)"
    rm -rf "$staging"
    staging=
}

check_only=false
if [[ ${1:-} == --check ]]; then
    check_only=true
    shift
fi

mapfile -t images < <(base_images)
[[ ${#images[@]} -gt 0 ]] || die "no FROM lines in $dockerfile"
images+=("$@")

# One maker at a time (CI and a developer may share the daemon).
if ! $check_only; then
    mkdir -p "$cache"
    exec 9>"$cache/lock"
    flock 9
fi

missing=0
for image in "${images[@]}"; do
    if have_image "$image"; then
        log "$image: present"
        continue
    fi
    missing=1
    if $check_only; then
        log "$image: missing"
        continue
    fi
    started=$SECONDS
    case $image in
    debian:*-slim)
        suite=${image#debian:}
        make_debian_slim "$image" "${suite%-slim}"
        ;;
    rust:*-slim-*)
        tag=${image#rust:}
        make_rust "$image" "${tag%%-slim-*}" "${tag##*-slim-}"
        ;;
    prom/prometheus:v*) make_prometheus "$image" ;;
    *) die "do not know how to make $image from Debian packages" ;;
    esac
    log "$image: made in $((SECONDS - started)) s"
done
if $check_only && ((missing)); then exit 1; fi
exit 0
