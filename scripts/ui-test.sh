#!/usr/bin/env bash
# Browser test of the web dashboard (/ui): a real cluster (`swarm up` plus a worker
# process) driven by Playwright in the system's headless Chromium. See scripts/ui_test.py
# for the checks; it prints PASS/FAIL per check and the first-load figures.
#
#   scripts/ui-test.sh [SWARM_BINARY]        # default target/debug/swarm
#
# Installs what is missing: Debian's `chromium` (apt-get; needs root) and Playwright for
# Python in a venv at ${UI_TEST_VENV:-/tmp/swarm-ui-venv} (no `playwright install`: the
# system browser is used). Screenshots go to ${UI_SCREENSHOTS:-target/ui-screenshots}.
# Bounded: installs within 10 minutes each, the test within 12; exits non-zero on failure.
set -euo pipefail

# A binary named on the command line is taken from where the script was called.
if [ $# -ge 1 ]; then
    SWARM_BIN="$(cd "$(dirname "$1")" 2>/dev/null && pwd)/$(basename "$1")"
fi
cd "$(dirname "$0")/.."
SWARM_BIN="${SWARM_BIN:-target/debug/swarm}"
VENV="${UI_TEST_VENV:-/tmp/swarm-ui-venv}"
export UI_SCREENSHOTS="${UI_SCREENSHOTS:-target/ui-screenshots}"

if [ ! -x "$SWARM_BIN" ]; then
    echo "ui-test: no swarm binary at $SWARM_BIN (cargo build -p swarm-cli first)" >&2
    exit 2
fi

CHROMIUM="${CHROMIUM:-$(command -v chromium || true)}"
if [ -z "$CHROMIUM" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "ui-test: chromium is not installed and this is not root: apt-get install chromium" >&2
        exit 2
    fi
    echo "ui-test: installing chromium (Debian package)"
    export DEBIAN_FRONTEND=noninteractive
    timeout 600 apt-get update -qq
    timeout 600 apt-get install -y -qq chromium >/dev/null
    CHROMIUM="$(command -v chromium)"
fi

if ! "$VENV/bin/python" -c 'import playwright.sync_api' 2>/dev/null; then
    echo "ui-test: installing Playwright for Python into $VENV"
    python3 -m venv "$VENV"
    timeout 600 "$VENV/bin/pip" install --quiet --disable-pip-version-check playwright
fi

exec timeout -k 15 720 "$VENV/bin/python" scripts/ui_test.py \
    --swarm "$SWARM_BIN" --chromium "$CHROMIUM" --screenshots "$UI_SCREENSHOTS"
