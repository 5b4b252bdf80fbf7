#!/usr/bin/env bash
# The demo: set up, start a local tansu broker, enroll a product from synthetic references, run
# `kensa run` on two synthetic cameras for about 30 s, print the events read back from Kafka,
# and stop everything cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
source scripts/broker.sh
DEMO_SECONDS="${DEMO_SECONDS:-30}"
work=$(mktemp -d "${TMPDIR:-/tmp}/kensa-demo.XXXXXX")
KENSA_PID=""
cleanup() {
  [ -n "$KENSA_PID" ] && kill "$KENSA_PID" 2>/dev/null && wait "$KENSA_PID" 2>/dev/null
  stop_broker
  rm -rf "$work"
}
trap cleanup EXIT
say() { printf '\n== %s\n' "$*"; }

say "starting a tansu broker"
start_broker
echo "broker: $KENSA_BROKERS"

say "enrolling product 'disc' from 4 synthetic normal references"
bin/kensa synth --out "$work/refs" --count 0 --train 4 --seed 42
bin/kensa enroll --product disc --images "$work/refs/train/good" --out "$work/disc.kbank"

port=$(free_port)
cat > "$work/kensa.toml" <<TOML
[kafka]
brokers = "$KENSA_BROKERS"
topic = "kensa.results"
defects_topic = "kensa.defects"

[telemetry]
listen = "127.0.0.1:$port"

[products.disc]
bank = "disc.kbank"

[[cameras]]
id = "line-1"
product = "disc"
source = { kind = "synthetic", seed = 1, fps = 4, defect_rate = 0.25 }

[[cameras]]
id = "line-2"
product = "disc"
source = { kind = "synthetic", seed = 2, fps = 4, defect_rate = 0.25 }
TOML

say "running kensa on two synthetic cameras for ${DEMO_SECONDS}s"
echo "metrics: http://127.0.0.1:$port/metrics   health: http://127.0.0.1:$port/healthz"
bin/kensa run --config "$work/kensa.toml" --max-runtime-s "$DEMO_SECONDS" 2>"$work/kensa.log" &
KENSA_PID=$!
sleep $(( DEMO_SECONDS / 2 ))
echo "-- a scrape of /metrics half-way:"
curl -s "http://127.0.0.1:$port/metrics" | grep -E '^kensa_(frames_captured|frames_scored|anomalies|events_published)_total' || true
code=0; wait "$KENSA_PID" || code=$?
KENSA_PID=""
echo "kensa exited with code $code (log: last lines)"
tail -n 3 "$work/kensa.log"

say "events read back from Kafka (topic kensa.results), decoded"
bin/kensa tail --brokers "$KENSA_BROKERS" --topic kensa.results --from-beginning --idle-timeout-s 3 >"$work/events.jsonl"
python3 - "$work/events.jsonl" <<'PY'
import json, sys
evs = [json.loads(l) for l in open(sys.argv[1])]
for e in evs[:12]:
    print(f"{e['camera']:7} frame {e['frame']:3}  score {e['score']:.3f}  {e['answer']}")
if len(evs) > 12:
    print(f"... {len(evs) - 12} more")
print(f"{len(evs)} events, {sum(e['anomalous'] for e in evs)} anomalous")
PY

say "defect events (topic kensa.defects)"
bin/kensa tail --brokers "$KENSA_BROKERS" --topic kensa.defects --from-beginning --idle-timeout-s 3 \
  --masks "$work/masks" >"$work/defects.jsonl"
python3 - "$work/defects.jsonl" <<'PY'
import json, sys
evs = [json.loads(l) for l in open(sys.argv[1])]
for e in evs[:8]:
    print(f"{e['camera']:7} frame {e['frame']:3}  {e['answer']}  (confidence {e['confidence']:.2f}, mask PNG {e['mask_png_bytes']} bytes)")
print(f"{len(evs)} defect events")
PY
say "done; stopping the broker"
