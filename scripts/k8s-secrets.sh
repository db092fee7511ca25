#!/usr/bin/env bash
# Make the Secrets the Kubernetes manifests (k8s/) mount: a new cluster CA (certificate
# and key: each coordinator pod issues itself a certificate with it at its start, and the
# coordinators sign enrolling workers' certificates with it), and random API and
# enrollment tokens. No node certificate is made here: every pod makes its own key.
#
# Usage: scripts/k8s-secrets.sh [--namespace NS] [--out DIR]
#        kubectl apply -f DIR/secrets.yaml
#
#   --namespace     where the Secrets go (default swarm; the dev overlay uses swarm-dev)
#   --out           where to write (default ./swarm-k8s-secrets); must not exist yet
#
# DIR keeps a copy of ca-key.pem: store it offline if you will issue certificates outside
# the cluster (`swarm certs issue`), and delete DIR afterwards.
# Runs the `swarm` binary from $SWARM (default: `swarm` on PATH), or else the image
# $SWARM_IMAGE (default swarm:local) with Docker.
set -euo pipefail

namespace=swarm
out=./swarm-k8s-secrets
while [[ $# -gt 0 ]]; do
    case $1 in
    --namespace) namespace=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h | --help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "k8s-secrets: unknown argument $1" >&2; exit 2 ;;
    esac
done
[[ ! -e $out ]] || { echo "k8s-secrets: $out exists; refusing to overwrite a CA" >&2; exit 1; }

mkdir -p "$out/certs"
chmod 700 "$out"
out=$(cd "$out" && pwd)
swarm=${SWARM:-swarm}
if command -v "$swarm" >/dev/null 2>&1; then
    "$swarm" certs init --dir "$out/certs" >/dev/null
else
    docker run --rm --user "$(id -u):$(id -g)" -v "$out/certs:/out" \
        "${SWARM_IMAGE:-swarm:local}" certs init --dir /out >/dev/null
fi
# Only the CA is kept: `certs init` also writes node certificates for one machine.
find "$out/certs" -type f ! -name ca.pem ! -name ca-key.pem -delete
umask 077
od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$out/api-token"
od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$out/callback-secret"
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
    # Coordinators only: each pod issues its own certificate with it and signs enrolling
    # workers' certificates. Workers get only the public CA and the enrollment token,
    # and make their own keys.
    secret swarm-ca coordinator \
        ca.pem="$out/certs/ca.pem" ca-key.pem="$out/certs/ca-key.pem"
    secret swarm-enroll worker \
        ca.pem="$out/certs/ca.pem" enroll-token="$out/enroll-token"
    # The API token, and the secret task callbacks are signed with (the same on every
    # coordinator).
    secret swarm-api-token coordinator api-token="$out/api-token" \
        callback-secret="$out/callback-secret"
} >"$out/secrets.yaml"

cat <<EOF
wrote $out/secrets.yaml (Secrets swarm-ca, swarm-enroll, swarm-api-token in namespace
$namespace; coordinator pods issue their own certificates, worker pods enroll for theirs)
  kubectl apply -f $out/secrets.yaml
then move $out/certs/ca-key.pem offline (a copy) and delete $out.
EOF
