#!/usr/bin/env bash
# The performance benchmark (benches/perf.rs): kernels, the Python baseline side by side, and the
# pipeline with 1, 4 and 16 cameras. KENSA_PERF selects sections (kernels,baseline,pipeline);
# see benches/perf.rs for the other knobs. Prints tables; takes about 6 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
export KENSA_BIN="$CARGO_TARGET_DIR/release/kensa"
export KENSA_PYTHON="$KENSA_VENV/bin/python"
cargo bench --bench perf
