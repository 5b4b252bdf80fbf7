#!/usr/bin/env bash
# The soak benchmark (benches/soak.rs): 8 synthetic cameras for 30 minutes by default.
# KENSA_SOAK_SECONDS, KENSA_SOAK_CAMERAS, KENSA_SOAK_FPS, KENSA_SOAK_INTERVAL override.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
export KENSA_BIN="$CARGO_TARGET_DIR/release/kensa"
cargo bench --bench soak
