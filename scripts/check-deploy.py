#!/usr/bin/env python3
"""Checks on the deployment files that schema validation cannot make.

Usage:
  check-deploy.py k8s RENDERED.yaml ADAPTER.yaml SECRETS.yaml
      cross-object consistency of one rendered overlay (see check_overlay)
  check-deploy.py promql DASHBOARD.json ADAPTER.yaml OUT.yml
      write every PromQL expression of the Grafana dashboard and the prometheus-adapter
      rules (templates filled in) as recording rules, for `promtool check rules`
  check-deploy.py bad-fixtures RENDERED.yaml OUTDIR
      write copies of one rendered overlay with one deliberate mistake each; schema
      validation must reject every one
  check-deploy.py compose docker-compose.yml
      the worker's stop_grace_period outlasts its --drain-timeout (see check_drain)

Exits 1 with one line per problem.
"""

import copy
import json
import pathlib
import re
import sys

import yaml


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def index(objects):
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def adapter_rules(adapter_path):
    (cm,) = load_all(adapter_path)
    config = yaml.safe_load(cm["data"]["config.yaml"])
    unknown = set(config) - {"rules", "externalRules", "resourceRules"}
    if unknown:
        raise SystemExit(f"{adapter_path}: unknown adapter config keys {sorted(unknown)}")
    return config


# After its drain timeout a worker waits up to 2 s (swarm_worker::DRAIN_REPORT_GRACE) for
# the reports of the attempts it cut short, then exits: a grace period must exceed the
# drain timeout by at least this much, or the pod is SIGKILLed first.
DRAIN_MARGIN_S = 3


def duration_s(text):
    """A duration in swarm's syntax (500ms, 30s, 2m, 1h; a bare number is seconds)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)?\s*", str(text))
    if m is None:
        return None
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    return float(m.group(1)) * scale


def check_drain(where, drain, grace):
    """Problems with a worker's drain timeout `drain` and its grace period `grace`."""
    d, g = duration_s(drain) if drain is not None else None, duration_s(grace)
    if drain is None:
        return [f"{where}: the worker's drain timeout is not set (its grace period is sized for it)"]
    if d is None or g is None:
        return [f"{where}: cannot read drain timeout {drain!r} or grace period {grace!r}"]
    if g < d + DRAIN_MARGIN_S:
        return [
            f"{where}: grace period {g:g}s does not outlast the drain timeout {d:g}s by "
            f"{DRAIN_MARGIN_S}s: a stopping worker would be killed mid-drain"
        ]
    return []


def check_compose(path):
    with open(path) as f:
        services = yaml.safe_load(f)["services"]
    worker = services["worker"]
    drain = next(
        (a.split("=", 1)[1] for a in worker.get("command", []) if a.startswith("--drain-timeout=")),
        (worker.get("environment") or {}).get("SWARM_DRAIN_TIMEOUT"),
    )
    # Docker's default grace period is 10 s.
    return check_drain(f"{path}: service worker", drain, worker.get("stop_grace_period", "10s"))


def selector_matches(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


def check_overlay(rendered, adapter_path, secrets_path):
    problems = []
    objs = index(load_all(rendered))

    def get(kind, name):
        o = objs.get((kind, name))
        if o is None:
            problems.append(f"missing {kind}/{name}")
        return o

    namespaces = [n for (k, n) in objs if k == "Namespace"]
    if len(namespaces) != 1:
        problems.append(f"expected one Namespace, found {namespaces}")
    else:
        for (kind, name), o in objs.items():
            if kind != "Namespace" and o["metadata"].get("namespace") != namespaces[0]:
                problems.append(f"{kind}/{name} is not in namespace {namespaces[0]}")

    sts = get("StatefulSet", "swarm-coordinator")
    ccm = get("ConfigMap", "swarm-coordinator")
    wcm = get("ConfigMap", "swarm-worker")
    hpa = get("HorizontalPodAutoscaler", "swarm-worker")
    pdb = get("PodDisruptionBudget", "swarm-coordinator")
    dep = get("Deployment", "swarm-worker")
    if problems:
        return problems

    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    svc = objs.get(("Service", sts["spec"]["serviceName"]))
    if svc is None:
        problems.append(f"StatefulSet serviceName {sts['spec']['serviceName']} has no Service")
    else:
        if svc["spec"].get("clusterIP") != "None":
            problems.append("the StatefulSet's Service is not headless (clusterIP: None)")
        if svc["spec"].get("publishNotReadyAddresses") is not True:
            problems.append("the headless Service must publish not-ready addresses")
        if not selector_matches(svc["spec"]["selector"], pod_labels):
            problems.append("the headless Service does not select the coordinator pods")
    if sts["spec"].get("podManagementPolicy") != "Parallel":
        problems.append("coordinators must start in parallel (podManagementPolicy: Parallel)")
    replicas = sts["spec"]["replicas"]
    if str(replicas) != ccm["data"].get("COORDINATOR_REPLICAS"):
        problems.append(
            f"StatefulSet replicas {replicas} != COORDINATOR_REPLICAS "
            f"{ccm['data'].get('COORDINATOR_REPLICAS')} (the voters pod 0 bootstraps)"
        )
    want = ",".join(
        f"{sts['metadata']['name']}-{i}.{sts['spec']['serviceName']}:7070" for i in range(replicas)
    )
    if wcm["data"].get("SWARM_COORDINATOR") != want:
        problems.append(f"worker SWARM_COORDINATOR should list every coordinator: {want}")

    (coord,) = sts["spec"]["template"]["spec"]["containers"]
    for probe, verb in (("readinessProbe", "ready"), ("livenessProbe", "live")):
        cmd = coord.get(probe, {}).get("exec", {}).get("command", [])
        if cmd[1:3] != ["probe", verb]:
            problems.append(f"coordinator {probe} must run `swarm probe {verb}`, not {cmd}")

    if pdb["spec"].get("maxUnavailable") != 1 or not selector_matches(
        pdb["spec"]["selector"]["matchLabels"], pod_labels
    ):
        problems.append("the PodDisruptionBudget must allow 1 unavailable coordinator")

    problems += check_drain(
        "Deployment/swarm-worker",
        wcm["data"].get("SWARM_DRAIN_TIMEOUT"),
        # Kubernetes' default grace period is 30 s.
        dep["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30),
    )

    target = hpa["spec"]["scaleTargetRef"]
    if (target["kind"], target["name"]) != ("Deployment", dep["metadata"]["name"]):
        problems.append(f"the HPA scales {target}, not the worker Deployment")
    kinds = {m["type"] for m in hpa["spec"]["metrics"]}
    if kinds != {"Resource", "External"}:
        problems.append(f"the HPA should scale on CPU and an External metric, has {kinds}")
    served = {r["name"]["as"] for r in adapter_rules(adapter_path).get("externalRules", [])}
    for m in hpa["spec"]["metrics"]:
        if m["type"] == "External" and m["external"]["metric"]["name"] not in served:
            problems.append(
                f"the HPA's External metric {m['external']['metric']['name']} is not one "
                f"prometheus-adapter serves ({sorted(served)})"
            )

    secrets = {s["metadata"]["name"]: set(s["stringData"]) for s in load_all(secrets_path)}
    required_files = {
        "swarm-ca": {"ca.pem", "ca-key.pem"},
        "swarm-enroll": {"ca.pem", "enroll-token"},
        "swarm-api-token": {"api-token", "callback-secret"},
    }
    for workload in (sts, dep):
        spec = workload["spec"]["template"]["spec"]
        where = f"{workload['kind']}/{workload['metadata']['name']}"
        if spec.get("securityContext", {}).get("runAsNonRoot") is not True:
            problems.append(f"{where}: pods must run as non-root")
        for c in spec["containers"]:
            sc = c.get("securityContext", {})
            if sc.get("readOnlyRootFilesystem") is not True or sc.get("allowPrivilegeEscalation"):
                problems.append(f"{where}: container {c['name']} needs a read-only root, no escalation")
            res = c.get("resources", {})
            if not {"cpu", "memory"} <= set(res.get("requests", {})) or "memory" not in res.get(
                "limits", {}
            ):
                problems.append(f"{where}: container {c['name']} needs cpu/memory requests and a memory limit")
        for v in spec.get("volumes", []):
            if "secret" not in v:
                continue
            name = v["secret"]["secretName"]
            if name not in secrets:
                problems.append(f"{where}: mounts Secret {name}, which secrets.example.yaml lacks")
            elif not required_files.get(name, set()) <= secrets[name]:
                problems.append(f"{where}: Secret {name} lacks {required_files[name] - secrets[name]}")
    return problems


def promql_rules(dashboard_path, adapter_path, out_path):
    dash = json.load(open(dashboard_path))
    rules = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            expr = t["expr"].replace("$__rate_interval", "1m").replace("$__interval", "1m")
            rules.append({"record": f"dashboard:panel_{p['id']}_{t['refId']}", "expr": expr})
    for i, r in enumerate(adapter_rules(adapter_path).get("externalRules", [])):
        series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", r["seriesQuery"]).group(0)
        expr = (
            r["metricsQuery"]
            .replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", 'namespace="swarm"')
            .replace("<<.GroupBy>>", "namespace")
        )
        if "<<" in expr:
            raise SystemExit(f"adapter rule {i}: unknown template in {r['metricsQuery']}")
        rules.append({"record": f"adapter:external_{i}", "expr": expr})
        rules.append({"record": f"adapter:series_{i}", "expr": r["seriesQuery"]})
    with open(out_path, "w") as f:
        yaml.safe_dump({"groups": [{"name": "extracted", "rules": rules}]}, f, sort_keys=False)
    print(f"{len(rules)} expressions from the dashboard and the adapter rules")
    return []


def bad_fixtures(rendered, outdir):
    """One mistake per file, each a kind schema validation must catch."""
    objects = load_all(rendered)
    out = pathlib.Path(outdir)
    out.mkdir(parents=True, exist_ok=True)

    def write(name, mutate):
        objs = copy.deepcopy(objects)
        sts = next(o for o in objs if o["kind"] == "StatefulSet")
        mutate(sts)
        with open(out / name, "w") as f:
            yaml.safe_dump_all(objs, f, sort_keys=False)

    def misspelt(sts):
        probe = sts["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
        probe["exec"]["comand"] = probe["exec"].pop("command")

    def wrong_type(sts):
        sts["spec"]["replicas"] = "three"

    def unknown_field(sts):
        sts["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFilesystem"] = True

    write("misspelt-field.yaml", misspelt)
    write("wrong-type.yaml", wrong_type)
    write("field-at-wrong-level.yaml", unknown_field)
    return []


def main():
    args = sys.argv[1:]
    if args[:1] == ["k8s"] and len(args) == 4:
        problems = check_overlay(*args[1:])
    elif args[:1] == ["promql"] and len(args) == 4:
        problems = promql_rules(*args[1:])
    elif args[:1] == ["bad-fixtures"] and len(args) == 3:
        problems = bad_fixtures(*args[1:])
    elif args[:1] == ["compose"] and len(args) == 2:
        problems = check_compose(args[1])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    for p in problems:
        print(f"check-deploy: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
