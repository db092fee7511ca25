#!/usr/bin/env bash
# Validate the deployment files without a cluster:
#   * render k8s/overlays/{dev,prod} (scripts/kustomize-render.py; compared with
#     `kubectl kustomize` when kubectl is installed), validate every object, plus the
#     prometheus-adapter ConfigMap and the Secret template, with `kubernetes-validate
#     --strict` against Kubernetes 1.30 and 1.37;
#   * self-check: copies of a rendered overlay with one deliberate mistake each must be
#     rejected, each for that mistake;
#   * cross-object checks (scripts/check-deploy.py k8s): names, replicas, probes, PDB,
#     HPA metric served by the adapter rules, Secrets, security settings, the worker's
#     grace period against its drain timeout (and the same in docker-compose.yml);
#   * Prometheus: `promtool check config` and `check rules`, the alert unit tests
#     (deploy/prometheus/alerts_test.yml), and the PromQL of the Grafana dashboard and of
#     the adapter rules; the dashboard and datasource files as JSON/YAML.
#
# Needs python3 (with venv) and network access to PyPI and a Debian mirror the first
# time: kubernetes-validate goes into a venv, promtool comes from Debian's `prometheus`
# package; both are kept under $SWARM_VALIDATE_DIR (default target/validate) and reused.
# Set PROMTOOL to use another promtool. Fails if any tool is missing: nothing is skipped.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
tools=${SWARM_VALIDATE_DIR:-$repo/target/validate}
k8s_versions=(1.30.0 1.37.0)
kv_version=1.37.0
started=$SECONDS

say() { echo "== $*"; }
fail() {
    echo "validate-k8s: FAIL: $*" >&2
    exit 1
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$tools"

# --- tools -----------------------------------------------------------------------------
venv=$tools/venv
if ! "$venv/bin/kubernetes-validate" --version 2>/dev/null | grep -q "$kv_version"; then
    say "installing kubernetes-validate $kv_version into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "kubernetes-validate==$kv_version" pyyaml
fi
py=$venv/bin/python

promtool=${PROMTOOL:-}
if [[ -z $promtool ]]; then
    promtool=$tools/promtool/usr/bin/promtool
    if [[ ! -x $promtool ]]; then
        say "fetching promtool from Debian's prometheus package"
        command -v apt-get >/dev/null || fail "no apt-get to fetch promtool; set PROMTOOL"
        (cd "$work" && apt-get download -q prometheus >/dev/null 2>&1) ||
            { apt-get update -qq && (cd "$work" && apt-get download -q prometheus >/dev/null 2>&1); } ||
            fail "apt-get download prometheus failed"
        dpkg-deb -x "$work"/prometheus_*.deb "$tools/promtool"
    fi
fi
"$promtool" --version >/dev/null 2>&1 || fail "promtool at $promtool does not run"

# --- render ----------------------------------------------------------------------------
say "render overlays"
for overlay in dev prod; do
    "$py" scripts/kustomize-render.py "k8s/overlays/$overlay" >"$work/$overlay.yaml" ||
        fail "rendering k8s/overlays/$overlay"
    echo "k8s/overlays/$overlay: $(grep -c '^kind:' "$work/$overlay.yaml") objects"
done
"$py" scripts/kustomize-render.py k8s/prometheus-adapter >"$work/adapter.yaml" ||
    fail "rendering k8s/prometheus-adapter"
if command -v kubectl >/dev/null 2>&1; then
    for dir in k8s/overlays/dev k8s/overlays/prod k8s/prometheus-adapter; do
        name=$(basename "$dir")
        [[ $name == prometheus-adapter ]] && name=adapter
        kubectl kustomize "$dir" >"$work/$name.kubectl.yaml" || fail "kubectl kustomize $dir"
        "$py" - "$work/$name.yaml" "$work/$name.kubectl.yaml" <<'EOF' || fail "scripts/kustomize-render.py and kubectl kustomize disagree on $dir"
import sys, yaml
def objects(path):
    return {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o
            for o in yaml.safe_load_all(open(path)) if o}
ours, theirs = objects(sys.argv[1]), objects(sys.argv[2])
diff = sorted(str(k) for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
for k in diff:
    print(f"differs: {k}", file=sys.stderr)
sys.exit(1 if diff else 0)
EOF
    done
    echo "renderer output identical to kubectl kustomize ($(kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: //p'))"
else
    echo "kubectl not installed: rendered with scripts/kustomize-render.py only"
fi

# --- schema validation -----------------------------------------------------------------
manifests=("$work/dev.yaml" "$work/prod.yaml" "$work/adapter.yaml" k8s/secrets.example.yaml)
for v in "${k8s_versions[@]}"; do
    say "kubernetes-validate --strict, Kubernetes $v"
    "$venv/bin/kubernetes-validate" --strict --quiet -k "$v" "${manifests[@]}" ||
        fail "manifests do not validate against Kubernetes $v"
    echo "ok: ${#manifests[@]} files"
done

say "self-check: deliberate mistakes must be rejected"
"$py" scripts/check-deploy.py bad-fixtures "$work/dev.yaml" "$work/bad"
declare -A expect=(
    [misspelt-field.yaml]="'comand' was unexpected"
    [wrong-type.yaml]="'three' is not of type 'integer'"
    [field-at-wrong-level.yaml]="'readOnlyRootFilesystem' was unexpected"
)
for f in "${!expect[@]}"; do
    if out=$("$venv/bin/kubernetes-validate" --strict --quiet -k "${k8s_versions[0]}" "$work/bad/$f" 2>&1); then
        fail "$f was accepted: validation does not catch mistakes"
    fi
    grep -qF "${expect[$f]}" <<<"$out" || fail "$f was rejected, but not for its mistake: $out"
    echo "rejected as expected: $f (${expect[$f]})"
done

say "cross-object checks"
for overlay in dev prod; do
    "$py" scripts/check-deploy.py k8s "$work/$overlay.yaml" k8s/prometheus-adapter/adapter-config.yaml \
        k8s/secrets.example.yaml || fail "k8s/overlays/$overlay: cross-object checks"
    echo "ok: $overlay"
done
"$py" scripts/check-deploy.py compose docker-compose.yml || fail "docker-compose.yml: worker drain"
echo "ok: docker-compose.yml worker drain timeout and stop_grace_period"

# --- Prometheus, Grafana -----------------------------------------------------------------
say "promtool ($("$promtool" --version 2>&1 | head -1))"
"$promtool" check config deploy/prometheus/prometheus.yml || fail "deploy/prometheus/prometheus.yml"
"$promtool" check rules deploy/prometheus/alerts.yml || fail "deploy/prometheus/alerts.yml"
"$promtool" test rules deploy/prometheus/alerts_test.yml || fail "alert unit tests"
# Debian's promtool is built without Kubernetes service discovery, so it cannot load the
# Kubernetes scrape config; check its rules reference and scrape job shape instead.
"$py" - deploy/prometheus/prometheus-kubernetes.yml <<'EOF' || fail "deploy/prometheus/prometheus-kubernetes.yml"
import sys, yaml
c = yaml.safe_load(open(sys.argv[1]))
jobs = {j["job_name"]: j for j in c["scrape_configs"]}
j = jobs["swarm-coordinator"]
assert j["kubernetes_sd_configs"] == [{"role": "pod"}], "pod discovery"
targets = {r.get("target_label") for r in j["relabel_configs"]}
assert {"namespace", "pod"} <= targets, "namespace and pod labels for prometheus-adapter"
assert c["rule_files"] == ["alerts.yml"]
print("ok: deploy/prometheus/prometheus-kubernetes.yml (structure; promtool lacks kubernetes_sd)")
EOF
"$py" scripts/check-deploy.py promql deploy/grafana/dashboards/swarm.json \
    k8s/prometheus-adapter/adapter-config.yaml "$work/extracted-rules.yml"
"$promtool" check rules "$work/extracted-rules.yml" >/dev/null ||
    { "$promtool" check rules "$work/extracted-rules.yml"; fail "PromQL of the dashboard or adapter rules"; }
echo "ok: dashboard and adapter PromQL parse"
"$py" - <<'EOF' || fail "Grafana provisioning"
import json, yaml
d = json.load(open("deploy/grafana/dashboards/swarm.json"))
ids = [p["id"] for p in d["panels"]]
assert len(ids) == len(set(ids)), "duplicate panel ids"
ds = yaml.safe_load(open("deploy/grafana/provisioning/datasources/prometheus.yml"))
assert ds["datasources"][0]["type"] == "prometheus"
dp = yaml.safe_load(open("deploy/grafana/provisioning/dashboards/swarm.yml"))
assert dp["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"
print(f"ok: Grafana dashboard ({len(ids)} panels) and provisioning")
EOF

echo "validate-k8s: PASS in $((SECONDS - started)) s"
