# Sourced by demo.sh and test.sh: start_broker starts a tansu broker on a free loopback port,
# sets KENSA_BROKERS and TANSU_PID, and waits until it accepts connections.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
start_broker() {
  local port; port=$(free_port)
  local logf="$KENSA_CACHE/logs/tansu-$port.log"
  tansu broker --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine memory://tansu/ >"$logf" 2>&1 &
  TANSU_PID=$!
  KENSA_BROKERS="127.0.0.1:$port"
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    kill -0 "$TANSU_PID" 2>/dev/null || { echo "tansu exited; see $logf" >&2; cat "$logf" >&2; return 1; }
    sleep 0.1
  done
  echo "tansu did not open port $port; see $logf" >&2
  return 1
}
stop_broker() { [ -n "${TANSU_PID:-}" ] && kill "$TANSU_PID" 2>/dev/null && wait "$TANSU_PID" 2>/dev/null; TANSU_PID=""; }
