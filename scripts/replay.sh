#!/usr/bin/env bash
# The backlog replay benchmark (benches/replay.rs): a 10-minute backlog of one 5 fps camera
# spooled with the broker down, then replayed while the line runs; RSS against its bound.
# KENSA_REPLAY_EVENTS, KENSA_REPLAY_BASELINE_S, KENSA_REPLAY_SYNTHETIC override.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
export KENSA_BIN="$CARGO_TARGET_DIR/release/kensa"
cargo build --release -p kensa
cargo bench --bench replay
