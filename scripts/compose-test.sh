#!/usr/bin/env bash
# End-to-end test of the container image and docker-compose.yml:
#   make the base images if missing (scripts/base-images.sh), build the image from the
#   Dockerfile, bring the cluster up under a unique project name, wait for 3 ready
#   coordinators and 3 workers, submit tasks through a follower, kill the Raft leader's
#   container (SIGKILL), keep submitting through the survivors, start it again, submit
#   through it, then check that every acknowledged task succeeded on all three replicas,
#   that `swarm status` shows 3 voters and every worker, that each worker enrolled for a
#   certificate of its own named for its container, and that `--scale worker=4` brings a
#   fourth worker, enrolled likewise. Prometheus (the `observability` profile, from an image
#   base-images.sh makes of Debian's package) runs alongside: at the end it must scrape all
#   three coordinators and have loaded the alert rules. Always tears down (`down -v`).
#   Prints PASS or FAIL and timings.
#
# Usage: scripts/compose-test.sh
# Environment: SWARM_IMAGE (default swarm:local), PROMETHEUS_IMAGE (default
# prom/prometheus:v2.42.0, Debian 12's version), SWARM_COMPOSE_TEST_TIMEOUT (seconds for
# the whole run including the image build, default 1500).
# Needs Docker with BuildKit (see scripts/docker-build.sh), Compose (v2 or 1.29), python3.
set -euo pipefail

# The whole run is bounded: timeout(1) sends SIGTERM, on which the trap below tears down.
timeout_s=${SWARM_COMPOSE_TEST_TIMEOUT:-1500}
if [[ -z ${SWARM_COMPOSE_TEST_BOUNDED:-} ]]; then
    SWARM_COMPOSE_TEST_BOUNDED=1 exec timeout "$timeout_s" "$0" "$@"
fi

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
export SWARM_IMAGE=${SWARM_IMAGE:-swarm:local}
export COMPOSE_PROJECT_NAME=swarmtest$$
# Random host ports: never collide with a cluster the user runs, or another test.
export SWARM_API_PUBLISH_1=127.0.0.1: SWARM_API_PUBLISH_2=127.0.0.1: SWARM_API_PUBLISH_3=127.0.0.1:
export PROMETHEUS_PUBLISH=127.0.0.1: GRAFANA_PUBLISH=127.0.0.1:
export PROMETHEUS_IMAGE=${PROMETHEUS_IMAGE:-prom/prometheus:v2.42.0}
workers=3
t0=$SECONDS
timings=()

if docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
    compose=(docker-compose)
else
    echo "compose-test: FAIL: neither \`docker compose\` nor docker-compose is installed" >&2
    exit 1
fi

log() { echo "[$((SECONDS - t0))s] $*"; }
fail() {
    echo "compose-test: FAIL: $*" >&2
    exit 1
}
phase_start=$SECONDS
phase() { # name of the phase that just ended
    timings+=("$1 $((SECONDS - phase_start))s")
    phase_start=$SECONDS
}

up=false
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if $up; then
        if ((rc != 0)); then
            echo "--- last log lines of each service"
            "${compose[@]}" logs --no-color --tail=25 2>&1 | tail -150 || true
        fi
        "${compose[@]}" down -v --remove-orphans -t 5 >/dev/null 2>&1 ||
            echo "compose-test: warning: down -v failed; remove project $COMPOSE_PROJECT_NAME by hand" >&2
    fi
    echo "--- timings: ${timings[*]:-none} (total $((SECONDS - t0))s)"
    if ((rc == 0)); then
        echo "compose-test: PASS"
    else
        echo "compose-test: FAIL (exit $rc)"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'echo "compose-test: FAIL: interrupted, or over ${timeout_s} s" >&2; exit 124' INT TERM

# --- image ------------------------------------------------------------------------------
log "base images"
scripts/base-images.sh "$PROMETHEUS_IMAGE"
phase base-images
log "building $SWARM_IMAGE"
build_log=$(mktemp)
if ! scripts/docker-build.sh --progress=plain -t "$SWARM_IMAGE" . >"$build_log" 2>&1; then
    grep -v ' sha256:' "$build_log" | tail -40
    rm -f "$build_log"
    fail "docker build"
fi
grep -o 'Finished .*' "$build_log" | tail -1 || true
rm -f "$build_log"
phase image-build
docker run --rm "$SWARM_IMAGE" --version
docker run --rm "$SWARM_IMAGE" probe --help >/dev/null 2>&1 ||
    fail "the image's swarm has no \`probe\` subcommand: the health checks cannot work"
[[ $(docker image inspect -f '{{.Config.User}}' "$SWARM_IMAGE") == 10001:10001 ]] ||
    fail "the image does not run as the non-root user 10001"

# --- cluster ------------------------------------------------------------------------------
log "compose up (project $COMPOSE_PROJECT_NAME)"
up=true
"${compose[@]}" up -d --no-build >/dev/null 2>&1 || {
    "${compose[@]}" up -d --no-build
    fail "compose up"
}

container() { "${compose[@]}" ps -q "$1" | head -1; }
# swarm CLI inside coordinator N, against that coordinator's API (token from the volume).
cli() {
    local n=$1
    shift
    "${compose[@]}" exec -T "coordinator-$n" swarm "$@"
}
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
# The leader's id as coordinator N sees it ("" while there is none).
leader_seen_by() { cli "$1" status --json 2>/dev/null | json 'd["cluster"].get("leader") or ""' 2>/dev/null || true; }

wait_healthy() { # coordinator numbers...
    local n deadline=$((SECONDS + 120))
    for n in "$@"; do
        until [[ $(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$(container "coordinator-$n")") == healthy ]]; do
            ((SECONDS < deadline)) || fail "coordinator-$n not healthy (swarm probe ready) within 120 s"
            sleep 1
        done
    done
}

log "waiting for 3 ready coordinators"
wait_healthy 1 2 3
leader=$(leader_seen_by 1)
[[ $leader =~ ^[123]$ ]] || fail "no leader among the coordinators (got '$leader')"
log "leader: coordinator-$leader"

wait_workers() { # count
    local deadline=$((SECONDS + 90)) n=0 l
    while ((SECONDS < deadline)); do
        l=$(leader_seen_by 1)
        if [[ $l =~ ^[123]$ ]]; then
            n=$(cli "$l" status --json 2>/dev/null | json 'len(d["workers"])' 2>/dev/null || echo 0)
            ((n == $1)) && return 0
        fi
        sleep 1
    done
    fail "expected $1 workers connected to the leader, saw $n"
}
wait_workers "$workers"
log "$workers workers connected"

# Each worker enrolled for a certificate of its own: its id is its container's host name,
# and its certificate (a serial no other worker has) names exactly that.
check_enrolled() { # count
    local l ids hosts serials c
    l=$(leader_seen_by 1)
    ids=$(cli "$l" status --json | json '"\n".join(sorted(w["id"] for w in d["workers"]))')
    hosts=$(for c in $("${compose[@]}" ps -q worker); do docker inspect -f '{{.Config.Hostname}}' "$c"; done | sort)
    [[ $ids == "$hosts" ]] || fail "worker ids [$(echo $ids)] are not the workers' host names [$(echo $hosts)]"
    serials=$(for c in $("${compose[@]}" ps -q worker); do
        docker exec "$c" swarm certs show /etc/swarm/certs/worker.pem | grep -o 'serial [0-9a-f]*'
    done | sort -u | wc -l)
    ((serials == $1)) || fail "$1 workers hold $serials distinct certificates, expected one each"
    local shown host
    for c in $("${compose[@]}" ps -q worker); do
        # Read the whole output first: `grep -q` stops reading at its first match, and the
        # writer's broken pipe would fail the pipeline (pipefail) although it matched.
        shown=$(docker exec "$c" swarm certs show /etc/swarm/certs/worker.pem) ||
            fail "swarm certs show failed in worker $c"
        host=$(docker inspect -f '{{.Config.Hostname}}' "$c")
        grep -q "^worker certificate for $host, " <<<"$shown" ||
            fail "worker $c's certificate does not name its host $host: $shown"
    done
}
check_enrolled "$workers"
log "each worker enrolled: its own key and certificate, named for its container"
"${compose[@]}" --profile observability up -d --no-build --no-deps prometheus >/dev/null 2>&1 ||
    fail "starting prometheus"
phase cluster-up

# --- tasks through failover -------------------------------------------------------------------
acked=()
# submit N COUNT AGENT PAYLOAD: COUNT submits through coordinator N; appends the
# acknowledged ids to `acked` and sets `submitted` to how many there were. (Not called in
# a subshell, or `acked` would be lost.)
submitted=0
submit() {
    local n=$1 count=$2 agent=$3 payload=$4 out id
    # shellcheck disable=SC2016  # expanded by the container's sh
    out=$("${compose[@]}" exec -T "coordinator-$n" sh -c '
        i=0
        while [ "$i" -lt "$1" ]; do
            swarm submit --agent "$2" --payload "$3" 2>&1 || true
            i=$((i + 1))
        done' sh "$count" "$agent" "$payload" 2>&1) || true
    submitted=0
    while read -r id; do
        if [[ $id =~ ^[0-9]+$ ]]; then
            acked+=("$id")
            submitted=$((submitted + 1))
        fi
    done <<<"$out"
}

follower=$(((leader % 3) + 1))
# The sleep tasks are still running on the workers when the leader dies: the new leader
# must take them over.
log "submitting 20 echo and 10 sleep (2.5 s) tasks through follower coordinator-$follower"
submit "$follower" 20 echo '{"phase":"before"}'
n=$submitted
submit "$follower" 10 sleep 2500
n2=$submitted
((n == 20 && n2 == 10)) || fail "only $n of 20 echo and $n2 of 10 sleep submits acknowledged through a follower"
phase submit-before

running=$(cli "$leader" status --json | json 'd["queue"]["running"]')
log "killing the leader, coordinator-$leader (SIGKILL), with $running tasks running"
docker kill -s KILL "$(container "coordinator-$leader")" >/dev/null
survivor=$(((leader % 3) + 1))
deadline=$((SECONDS + 60))
new_leader=
while ((SECONDS < deadline)); do
    new_leader=$(leader_seen_by "$survivor")
    [[ $new_leader =~ ^[123]$ && $new_leader != "$leader" ]] && break
    sleep 1
done
[[ $new_leader =~ ^[123]$ && $new_leader != "$leader" ]] || fail "no new leader within 60 s of killing coordinator-$leader"
log "new leader: coordinator-$new_leader"
phase failover

log "submitting while coordinator-$leader is down"
during=0
deadline=$((SECONDS + 90))
while ((during < 20 && SECONDS < deadline)); do
    submit "$survivor" 5 echo '{"phase":"during"}'
    during=$((during + submitted))
done
((during >= 20)) || fail "only $during submits acknowledged in 90 s with one coordinator down"
phase submit-during

log "starting coordinator-$leader again"
"${compose[@]}" start "coordinator-$leader" >/dev/null 2>&1
wait_healthy "$leader"
submit "$leader" 10 echo '{"phase":"after"}'
((submitted == 10)) || fail "only $submitted of 10 submits acknowledged through the restarted coordinator-$leader"
phase restart

# --- every acknowledged task succeeded, on every replica ------------------------------------
total=${#acked[@]}
((total > 0)) || fail "no task was acknowledged"
unique=$(printf '%s\n' "${acked[@]}" | sort -u | wc -l)
((unique == total)) || fail "$total acknowledgements but only $unique distinct task ids"
log "checking $total acknowledged tasks on all 3 coordinators"
for n in 1 2 3; do
    # shellcheck disable=SC2016  # expanded by the container's sh
    out=$("${compose[@]}" exec -T "coordinator-$n" sh -c '
        for id in "$@"; do
            if swarm task get "$id" --wait 60s >/dev/null 2>&1; then echo "ok $id"; else echo "bad $id"; fi
        done' sh "${acked[@]}")
    good=$(grep -c '^ok ' <<<"$out" || true)
    ((good == total)) || fail "coordinator-$n: $((total - good)) of $total acknowledged tasks not succeeded: $(grep '^bad ' <<<"$out" | head -5 | tr '\n' ' ')"
    log "coordinator-$n: all $total succeeded"
done
phase verify

# --- status and scaling ---------------------------------------------------------------------
leader=$(leader_seen_by 1)
log "swarm status (coordinator-$leader, the leader)"
cli "$leader" status
status=$(cli "$leader" status --json)
voters=$(json 'sum(1 for x in d["cluster"]["nodes"] if x["voter"])' <<<"$status")
seen=$(json 'len(d["workers"])' <<<"$status")
((voters == 3)) || fail "swarm status shows $voters voters, expected 3"
((seen == workers)) || fail "swarm status shows $seen workers, expected $workers"

log "scaling workers to 4"
"${compose[@]}" up -d --no-build --no-recreate --scale worker=4 worker >/dev/null 2>&1 ||
    fail "compose up --scale worker=4"
wait_workers 4
check_enrolled 4
log "4 workers connected, the fourth enrolled for a certificate of its own"
phase status-scale

# --- Prometheus -------------------------------------------------------------------------------
log "Prometheus: every coordinator scraped, alert rules loaded"
prom=http://$("${compose[@]}" port prometheus 9090 | tail -1)
deadline=$((SECONDS + 60))
rule_groups=$(grep -c '^  - name:' deploy/prometheus/alerts.yml)
until python3 - "$prom" "$rule_groups" <<'EOF'
import json, sys, urllib.request
base, want_groups = sys.argv[1], int(sys.argv[2])
def get(path):
    return json.load(urllib.request.urlopen(base + path, timeout=5))["data"]
targets = get("/api/v1/targets")["activeTargets"]
up = sorted(t["labels"]["instance"] for t in targets
            if t["labels"]["job"] == "swarm-coordinator" and t["health"] == "up")
groups = [g["name"] for g in get("/api/v1/rules")["groups"]]
leaders = get("/api/v1/query?query=sum(swarm_raft_is_leader)")["result"]
submitted = get("/api/v1/query?query=sum(swarm_tasks_submitted_total)")["result"]
print(f"  targets up: {up}; rule groups: {groups}; leaders: "
      f"{leaders[0]['value'][1] if leaders else None}; submitted: "
      f"{submitted[0]['value'][1] if submitted else None}")
ok = (len(up) == 3 and len(groups) == want_groups and leaders and leaders[0]["value"][1] == "1"
      and submitted and float(submitted[0]["value"][1]) > 0)
sys.exit(0 if ok else 1)
EOF
do
    ((SECONDS < deadline)) || fail "Prometheus does not scrape all coordinators or lacks the alert rules"
    sleep 5
done
phase prometheus
