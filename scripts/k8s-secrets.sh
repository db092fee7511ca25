#!/usr/bin/env bash
# Make the Secrets the Kubernetes manifests (k8s/) mount: a cluster CA with coordinator
# certificates (`swarm certs init`), the CA key the coordinators sign enrolling workers'
# certificates with, and random API and enrollment tokens.
#
# Usage: scripts/k8s-secrets.sh [--namespace NS] [--coordinators N] [--out DIR]
#        kubectl apply -f DIR/secrets.yaml
#
#   --namespace     where the Secrets go (default swarm; the dev overlay uses swarm-dev)
#   --coordinators  the certificate names cover pods 0..N-1 (default 5, room to grow
#                   from 3 without new certificates)
#   --out           where to write (default ./swarm-k8s-secrets); must not exist yet
#
# DIR keeps a copy of ca-key.pem (the coordinators hold it in Secret swarm-ca-key, to
# enroll workers): store it offline (it issues certificates for more coordinators later)
# and delete DIR afterwards.
# Runs the `swarm` binary from $SWARM (default: `swarm` on PATH), or else the image
# $SWARM_IMAGE (default swarm:local) with Docker.
set -euo pipefail

namespace=swarm
coordinators=5
out=./swarm-k8s-secrets
while [[ $# -gt 0 ]]; do
    case $1 in
    --namespace) namespace=$2; shift 2 ;;
    --coordinators) coordinators=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h | --help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "k8s-secrets: unknown argument $1" >&2; exit 2 ;;
    esac
done
[[ $coordinators =~ ^[1-9][0-9]*$ ]] || { echo "k8s-secrets: --coordinators must be a positive number" >&2; exit 2; }
[[ ! -e $out ]] || { echo "k8s-secrets: $out exists; refusing to overwrite a CA" >&2; exit 1; }

# Names peers and workers dial (k8s/base/coordinator.yaml), short and namespace-qualified.
sans=()
for ((i = 0; i < coordinators; i++)); do
    host=swarm-coordinator-$i.swarm-coordinator
    sans+=("$host" "$host.$namespace.svc" "$host.$namespace.svc.cluster.local")
done
san_list=$(IFS=,; echo "${sans[*]}")

mkdir -p "$out/certs"
chmod 700 "$out"
out=$(cd "$out" && pwd)
swarm=${SWARM:-swarm}
if command -v "$swarm" >/dev/null 2>&1; then
    "$swarm" certs init --dir "$out/certs" --san "$san_list" >/dev/null
else
    docker run --rm --user "$(id -u):$(id -g)" -v "$out/certs:/out" \
        "${SWARM_IMAGE:-swarm:local}" certs init --dir /out --san "$san_list" >/dev/null
fi
umask 077
od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$out/api-token"
od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$out/enroll-token"

b64() { base64 -w0 <"$1"; }
secret() { # name component file-key=path...
    local name=$1 component=$2
    shift 2
    printf -- '---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: %s\n  namespace: %s\n' "$name" "$namespace"
    printf '  labels:\n    app.kubernetes.io/name: swarm\n    app.kubernetes.io/component: %s\n' "$component"
    printf '    app.kubernetes.io/part-of: swarm\ntype: Opaque\ndata:\n'
    local kv
    for kv in "$@"; do
        printf '  %s: %s\n' "${kv%%=*}" "$(b64 "${kv#*=}")"
    done
}
{
    secret swarm-coordinator-tls coordinator \
        ca.pem="$out/certs/ca.pem" coordinator.pem="$out/certs/coordinator.pem" \
        coordinator-key.pem="$out/certs/coordinator-key.pem"
    # Coordinators sign enrolling workers' certificates; workers get only the CA and
    # the enrollment token, and make their own keys.
    secret swarm-ca-key coordinator ca-key.pem="$out/certs/ca-key.pem"
    secret swarm-enroll worker \
        ca.pem="$out/certs/ca.pem" enroll-token="$out/enroll-token"
    secret swarm-api-token coordinator api-token="$out/api-token"
} >"$out/secrets.yaml"

cat <<EOF
wrote $out/secrets.yaml (Secrets swarm-coordinator-tls, swarm-ca-key, swarm-enroll,
swarm-api-token in namespace $namespace; certificates for
swarm-coordinator-0..$((coordinators - 1)); worker pods enroll for their own)
  kubectl apply -f $out/secrets.yaml
then move $out/certs/ca-key.pem offline (a copy) and delete $out.
EOF
