#!/usr/bin/env bash
# Coverage-guided fuzzing of every decoder that reads outside bytes (the targets in
# fuzz/fuzz_targets/), SECONDS per target, one target after the other.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]        # default 60 s, every target
#
# Prints, per target, libFuzzer's executions, time and corpus size, and fails (exit 1) if
# any target found a crash (panic, sanitizer report), a timeout (an input that takes
# longer than SWARM_FUZZ_TIMEOUT s: a hang) or an out-of-memory; the input is kept under
# fuzz/artifacts/TARGET/ and the command to reproduce and minimise it is printed.
#
# Needs cargo-fuzz (installed from crates.io if missing, pinned) and preferably a nightly
# toolchain. Environment:
#   SWARM_FUZZ_TARGET_DIR  cargo target dir for the instrumented builds
#                          (default /work/fuzz-target, else fuzz/target)
#   SWARM_FUZZ_SANITIZER   address (default) or none (faster; panics, hangs and OOMs are
#                          still caught, the Rust code is memory-safe)
#   SWARM_FUZZ_TIMEOUT     seconds one input may take before it counts as a hang (10)
#   SWARM_FUZZ_RSS_MB      memory limit in MiB before it counts as an OOM (2048)
#   SWARM_FUZZ_TOOLCHAIN   rustup toolchain (nightly; without it, the default toolchain
#                          with RUSTC_BOOTSTRAP=1)
#   SWARM_FUZZ_CODEGEN_UNITS  codegen units of the build (cargo-fuzz's default is 1;
#                          16 builds faster, e.g. for a CI smoke run)
#   SWARM_FUZZ_NO_BUILD=1  run the targets as last built
#   SWARM_FUZZ_ALLOW_KNOWN=1  tolerate the panics of bugs already reported and not fixed
#                          yet (KNOWN_PANICS in fuzz/src/lib.rs), to fuzz past them
# Seeds are written by the targets themselves from valid values of the current code
# (fuzz/src/lib.rs), into fuzz/corpus/TARGET/, which is kept between runs and ignored by
# git.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

secs=${1:-60}
shift || true
case "$secs" in
'' | *[!0-9]*)
    echo "usage: $0 [SECONDS] [TARGET...]" >&2
    exit 2
    ;;
esac

CARGO_FUZZ_VERSION=0.13.2
toolchain=${SWARM_FUZZ_TOOLCHAIN:-nightly}
sanitizer=${SWARM_FUZZ_SANITIZER:-address}
timeout=${SWARM_FUZZ_TIMEOUT:-10}
rss_mb=${SWARM_FUZZ_RSS_MB:-2048}
if [ -n "${SWARM_FUZZ_TARGET_DIR:-}" ]; then
    target_dir=$SWARM_FUZZ_TARGET_DIR
elif [ -d /work ] && [ -w /work ]; then
    target_dir=/work/fuzz-target
else
    target_dir=$root/fuzz/target
fi

# cargo-fuzz's sanitizer and coverage flags are nightly-only. Without a nightly
# toolchain, the default one is told to accept them (RUSTC_BOOTSTRAP=1): its standard
# library ships the same sanitizer runtimes.
if rustup run "$toolchain" rustc --version >/dev/null 2>&1; then
    tc=(+"$toolchain")
else
    echo "fuzz: no $toolchain toolchain; using $(rustc --version) with RUSTC_BOOTSTRAP=1"
    export RUSTC_BOOTSTRAP=1
    tc=()
    toolchain=$(rustc --version | cut -d' ' -f2)
fi
if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
    echo "== installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
fi

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cd fuzz && cargo "${tc[@]}" fuzz list)
fi

build=(--sanitizer "$sanitizer" --target-dir "$target_dir")
if [ -n "${SWARM_FUZZ_CODEGEN_UNITS:-}" ]; then
    # More units build faster (CI smoke runs) and fuzz somewhat slower.
    build+=(--codegen-units "$SWARM_FUZZ_CODEGEN_UNITS")
fi
echo "== building ${#targets[@]} fuzz targets ($toolchain, sanitizer $sanitizer, $target_dir)"
started=$(date +%s)
if [ "${SWARM_FUZZ_NO_BUILD:-0}" != 1 ]; then
    (cd fuzz && cargo "${tc[@]}" fuzz build "${build[@]}")
fi
echo "built in $(($(date +%s) - started)) s"
# The binaries are run directly rather than through `cargo fuzz run`, so that every
# target runs the code built above, even while the sources change.
bin_dir=$target_dir/x86_64-unknown-linux-gnu/release
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_odr_violation=0}

logs=$root/fuzz/logs
mkdir -p "$logs"
failed=()
rows=()
for t in "${targets[@]}"; do
    corpus=$root/fuzz/corpus/$t
    artifacts=$root/fuzz/artifacts/$t
    mkdir -p "$corpus" "$artifacts"
    log=$logs/$t.log
    echo "== $t: ${secs} s"
    t0=$(date +%s)
    set +e
    (cd fuzz && SWARM_FUZZ_SEED_DIR=$corpus "$bin_dir/$t" "$corpus" \
        -max_total_time="$secs" -timeout="$timeout" -rss_limit_mb="$rss_mb" \
        -malloc_limit_mb="$rss_mb" -print_final_stats=1 -artifact_prefix="$artifacts/" \
        >"$log" 2>&1)
    rc=$?
    set -e
    elapsed=$(($(date +%s) - t0))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    if [ -z "$execs" ]; then
        execs=$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$log" | tail -n 1)
    fi
    if [ -z "$execs" ]; then
        # A crash ends the run before the final stats: take the last status line.
        execs=$(sed -n 's/^#\([0-9]*\).*/\1/p' "$log" | tail -n 1)
    fi
    corpus_n=$(find "$corpus" -type f | wc -l)
    result=ok
    if [ "$rc" -ne 0 ] || grep -qE '^(==[0-9]+==ERROR|SUMMARY: libFuzzer)|deadly signal|panicked at' "$log"; then
        result="FAILED (exit $rc)"
        failed+=("$t")
        echo "   $t failed; last lines of $log:"
        tail -n 30 "$log" | sed 's/^/   | /'
        for a in "$artifacts"/*; do
            [ -f "$a" ] || continue
            echo "   reproduce: $bin_dir/$t $a"
            echo "   minimise:  $bin_dir/$t -minimize_crash=1 -runs=100000 $a"
        done
    fi
    rows+=("$(printf '%-22s %12s %6s s %10s %7s  %s' "$t" "${execs:-?}" "$elapsed" \
        "$(( ${execs:-0} / (elapsed > 0 ? elapsed : 1) ))/s" "$corpus_n" "$result")")
done

echo
echo "== fuzz summary (${secs} s per target; logs in fuzz/logs/)"
printf '%-22s %12s %8s %10s %7s  %s\n' target execs time rate corpus result
for r in "${rows[@]}"; do
    echo "$r"
done
passed=$((${#targets[@]} - ${#failed[@]}))
echo "fuzz: ${passed} passed, ${#failed[@]} failed"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "failed targets: ${failed[*]}" >&2
    exit 1
fi
