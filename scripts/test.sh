#!/usr/bin/env bash
# Sets up, starts a tansu broker on a free port, runs every test of the workspace (unit and
# integration), stops the broker, and exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
source scripts/broker.sh
start_broker
trap stop_broker EXIT
export KENSA_TEST_BROKERS="$KENSA_BROKERS"
export KENSA_BIN="$CARGO_TARGET_DIR/release/kensa"
if [ -d ../shared/data ]; then export KENSA_SHARED="$(cd ../shared && pwd)"; fi
echo "[test] broker $KENSA_TEST_BROKERS; shared data: ${KENSA_SHARED:-absent (tests that need it skip)}" >&2
# Lints and formatting are part of the test: clippy with the workspace lints, -D warnings.
cargo fmt --all --check
cargo clippy --release --workspace --all-targets -- -D warnings
# The shipped alert rules: valid, and their unit tests pass (promtool from Debian's prometheus).
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts.test.yml
log="$KENSA_CACHE/logs/test-$$.log"
status=0
cargo test --release --workspace --lib --bins --tests --no-fail-fast -- --test-threads=2 2>&1 | tee "$log" || status=$?
# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "all: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
rm -f "$log"
exit "$status"
