#!/usr/bin/env python3
"""Run the pods of a rendered Kubernetes overlay as Docker containers, without a cluster.

Usage: scripts/k8s-docker-smoke.py IMAGE [OVERLAY]      (OVERLAY default k8s/overlays/dev)

Schema validation says the manifests are well-formed; this says the pods they describe
work. It renders the overlay (scripts/kustomize-render.py), makes Secrets with
scripts/k8s-secrets.sh, then starts every coordinator replica and worker replica with what
the pod spec says: command and args (the ordinal entrypoint snippet), env and envFrom
ConfigMaps (metadata.name and metadata.namespace fieldRefs), Secret volumes (mode and fsGroup applied),
emptyDirs as tmpfs, a Docker volume per volumeClaimTemplate, runAsUser/runAsGroup,
readOnlyRootFilesystem, dropped capabilities, no privilege escalation. Peers reach each
other by the pod DNS names the certificates carry (`swarm-coordinator-N.swarm-coordinator`,
as Docker network aliases; each coordinator pod issues its own at start). Then it runs each container's readiness and liveness probe
commands until they pass, checks that each coordinator pod issued itself a certificate
naming it, checks `swarm status` (every replica a voter, a leader, every worker connected
under its pod name, with the certificate it enrolled for) and runs one task through a
follower. Cleans up always.

Not simulated: the kubelet's probe timing, Services other than pod DNS, the HPA, the PDB.
Needs Docker and PyYAML (or the venv scripts/validate-k8s.sh makes).
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent

try:
    import yaml
except ImportError:
    # scripts/validate-k8s.sh keeps a venv with PyYAML; use it rather than fail.
    venv_python = pathlib.Path(os.environ.get("SWARM_VALIDATE_DIR", REPO / "target/validate")) / "venv/bin/python"
    if venv_python.exists() and pathlib.Path(sys.executable) != venv_python:
        os.execv(venv_python, [str(venv_python), *sys.argv])
    raise SystemExit("k8s-docker-smoke: FAIL: needs PyYAML (scripts/validate-k8s.sh makes a venv with it)")


def run(*cmd, check=True, capture=True, timeout=120):
    r = subprocess.run(cmd, capture_output=capture, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise SystemExit(f"k8s-docker-smoke: FAIL: {' '.join(cmd[:6])}...: {r.stderr.strip()}")
    return r


class Smoke:
    def __init__(self, image, overlay):
        self.image = image
        self.tag = f"k8ssmoke{os.getpid()}"
        self.tmp = pathlib.Path(tempfile.mkdtemp(prefix="swarm-k8s-smoke."))
        rendered = run(sys.executable, str(REPO / "scripts/kustomize-render.py"), overlay).stdout
        self.objects = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(rendered) if o}
        self.namespace = next(n for (k, n) in self.objects if k == "Namespace")
        self.containers = []
        self.volumes = []

    def cleanup(self):
        for c in self.containers:
            run("docker", "rm", "-f", c, check=False)
        for v in self.volumes:
            run("docker", "volume", "rm", "-f", v, check=False)
        run("docker", "network", "rm", self.tag, check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def secrets(self, replicas):
        out = self.tmp / "secrets"
        # `swarm` on PATH makes the certificates, or else the image does.
        env = dict(os.environ, SWARM_IMAGE=self.image)
        r = subprocess.run([str(REPO / "scripts/k8s-secrets.sh"), "--namespace", self.namespace,
                            "--out", str(out)],
                           env=env, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise SystemExit(f"k8s-docker-smoke: FAIL: scripts/k8s-secrets.sh: {r.stderr.strip()}")
        self.secret_data = {}
        with open(out / "secrets.yaml") as f:
            for s in yaml.safe_load_all(f):
                if s:
                    self.secret_data[s["metadata"]["name"]] = s["data"]

    def secret_dir(self, name, mode, gid):
        """A directory like the kubelet's Secret volume: one file per key."""
        import base64

        d = self.tmp / f"secret-{name}"
        if not d.exists():
            d.mkdir()
            for key, value in self.secret_data[name].items():
                p = d / key
                p.write_bytes(base64.b64decode(value))
                # The kubelet adds group read for fsGroup to read-only volumes.
                os.chmod(p, mode | (0o440 if gid is not None else 0))
                if gid is not None:
                    os.chown(p, 0, gid)
            os.chmod(d, 0o755)
        return d

    def start(self, workload, pod_name):
        spec = workload["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        psc, csc = spec.get("securityContext", {}), c.get("securityContext", {})
        name = f"{self.tag}-{pod_name}"
        args = ["docker", "run", "-d", "--name", name, "--network", self.tag, "--hostname", pod_name]
        service = workload["spec"].get("serviceName")
        if service:
            args += ["--network-alias", f"{pod_name}.{service}"]
        args += ["--user", f"{psc.get('runAsUser', c.get('runAsUser'))}:{psc.get('runAsGroup')}"]
        if csc.get("readOnlyRootFilesystem"):
            args.append("--read-only")
        for cap in csc.get("capabilities", {}).get("drop", []):
            args += ["--cap-drop", cap]
        if csc.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        env = {}
        for src in c.get("envFrom", []):
            env.update(self.objects[("ConfigMap", src["configMapRef"]["name"])]["data"])
        for e in c.get("env", []):
            if "value" in e:
                env[e["name"]] = e["value"]
            elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
                env[e["name"]] = pod_name
            elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
                env[e["name"]] = self.namespace
            else:
                raise SystemExit(f"k8s-docker-smoke: cannot simulate env {e}")
        for k, v in env.items():
            args += ["-e", f"{k}={v}"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        claims = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        for m in c.get("volumeMounts", []):
            if m["name"] in claims:
                vol = f"{self.tag}-{m['name']}-{pod_name}"
                run("docker", "volume", "create", vol)
                self.volumes.append(vol)
                args += ["-v", f"{vol}:{m['mountPath']}"]
                continue
            v = volumes[m["name"]]
            if "secret" in v:
                d = self.secret_dir(v["secret"]["secretName"], v["secret"].get("defaultMode", 0o644),
                                    psc.get("fsGroup"))
                args += ["-v", f"{d}:{m['mountPath']}:ro"]
            elif "emptyDir" in v:
                args += ["--tmpfs", f"{m['mountPath']}:uid={psc.get('runAsUser')},gid={psc.get('fsGroup')}"]
            else:
                raise SystemExit(f"k8s-docker-smoke: cannot simulate volume {v}")
        command = c.get("command")
        if command:
            args += ["--entrypoint", command[0], self.image, *command[1:], *c.get("args", [])]
        else:
            args += [self.image, *c.get("args", [])]
        run(*args)
        self.containers.append(name)
        return name, c

    def probe_until_ok(self, container, c, deadline):
        for probe in ("readinessProbe", "livenessProbe"):
            cmd = c[probe]["exec"]["command"]
            while True:
                r = run("docker", "exec", container, *cmd, check=False)
                if r.returncode == 0:
                    break
                if time.monotonic() > deadline:
                    logs = run("docker", "logs", "--tail", "20", container, check=False)
                    raise SystemExit(f"k8s-docker-smoke: FAIL: {probe} of {container} never passed: "
                                     f"{r.stdout.strip()}\n{logs.stdout}{logs.stderr}")
                time.sleep(1)

    def main(self):
        started = time.monotonic()
        sts = self.objects[("StatefulSet", "swarm-coordinator")]
        dep = self.objects[("Deployment", "swarm-worker")]
        replicas, workers = sts["spec"]["replicas"], dep["spec"]["replicas"]
        self.secrets(replicas)
        run("docker", "network", "create", self.tag)
        coords = [self.start(sts, f"{sts['metadata']['name']}-{i}") for i in range(replicas)]
        for i in range(workers):
            self.start(dep, f"{dep['metadata']['name']}-{i}")
        deadline = time.monotonic() + 120
        for name, c in coords:
            self.probe_until_ok(name, c, deadline)
        print(f"{replicas} coordinators ready and live (swarm probe ready/live)")
        serials = set()
        for (name, _), i in zip(coords, range(replicas)):
            pod = f"{sts['metadata']['name']}-{i}"
            shown = run("docker", "exec", name, "swarm", "certs", "show",
                        "/etc/swarm/certs/coordinator.pem").stdout
            if not shown.startswith(f"coordinator certificate for {pod}, serial "):
                raise SystemExit(f"k8s-docker-smoke: FAIL: {pod}'s certificate: {shown!r}")
            serials.add(shown.split("serial ", 1)[1].split(",", 1)[0])
        if len(serials) != replicas:
            raise SystemExit(f"k8s-docker-smoke: FAIL: {replicas} coordinators share certificates")
        print(f"each coordinator pod issued itself a certificate naming it ({len(serials)} serials)")
        while True:
            status = json.loads(run("docker", "exec", coords[0][0], "swarm", "status", "--json").stdout)
            leader = status["cluster"].get("leader")
            voters = [n for n in status["cluster"]["nodes"] if n["voter"]]
            if leader:
                lead = coords[leader - 1][0]
                status = json.loads(run("docker", "exec", lead, "swarm", "status", "--json").stdout)
                if len(status["workers"]) == workers and len(voters) == replicas:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"k8s-docker-smoke: FAIL: leader {leader}, {len(voters)} voters, "
                                 f"{len(status['workers'])} of {workers} workers")
            time.sleep(1)
        ids = sorted(w["id"] for w in status["workers"])
        pods = sorted(f"{dep['metadata']['name']}-{i}" for i in range(workers))
        if ids != pods:
            raise SystemExit(f"k8s-docker-smoke: FAIL: workers {ids} are not the pods {pods} "
                             "(each enrolls for a certificate naming its pod)")
        print(f"leader {leader}, {len(voters)} voters, {workers} workers connected, each under "
              "its pod name with a certificate it enrolled for")
        follower = next(n for n, _ in coords if n != coords[leader - 1][0])
        out = run("docker", "exec", follower, "swarm", "submit", "--agent", "echo",
                  "--payload", "k8s-smoke", "--wait", "30s").stdout.strip()
        if out != "k8s-smoke":
            raise SystemExit(f"k8s-docker-smoke: FAIL: echo task through a follower returned {out!r}")
        print("a task submitted through a follower succeeded")
        print(f"k8s-docker-smoke: PASS in {time.monotonic() - started:.0f} s")


def main():
    if len(sys.argv) not in (2, 3):
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    overlay = sys.argv[2] if len(sys.argv) == 3 else str(REPO / "k8s/overlays/dev")
    smoke = Smoke(sys.argv[1], overlay)
    try:
        smoke.main()
    finally:
        smoke.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
