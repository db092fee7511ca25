#!/usr/bin/env bash
# Supply-chain checks of the workspace with cargo-deny (deny.toml): licenses (allowlist),
# bans (crates swarm must not depend on; duplicate versions only warn) and sources
# (crates.io only). Installs the pinned cargo-deny from crates.io if it is missing.
#
#   scripts/deny.sh                           # licenses bans sources (needs crates.io)
#   SWARM_DENY_ADVISORIES=1 scripts/deny.sh   # also advisories: fetches the RustSec
#                                             # database from GitHub, so only where
#                                             # GitHub is reachable
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DENY_VERSION=0.20.2

if ! cargo deny --version 2>/dev/null | grep -q "$CARGO_DENY_VERSION"; then
    echo "== installing cargo-deny $CARGO_DENY_VERSION (a few minutes)"
    cargo install cargo-deny --locked --version "$CARGO_DENY_VERSION"
fi
cargo deny --version

checks=(licenses bans sources)
if [ "${SWARM_DENY_ADVISORIES:-0}" = 1 ]; then
    checks+=(advisories)
else
    echo "(advisories skipped: they need the RustSec database from GitHub; set SWARM_DENY_ADVISORIES=1 where it is reachable)"
fi
echo "== cargo deny check ${checks[*]}"
cargo deny --color never check "${checks[@]}"
