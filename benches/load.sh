#!/usr/bin/env bash
# Load benchmark of isrgate side by side with nginx (and Varnish) using the peer harness
# (`../shared/bench`: origin emulator, nginx, Varnish, wrk). Traffic stays on 127.0.0.1, every
# run is bounded in time, and only processes this script started are stopped.
#
#   benches/load.sh passthrough   isrgate as a plain proxy vs nginx-proxy, both in front of
#                                 origin-fast (0 ms render); ratio to origin-fast served directly
#
# The harness is copied to a writable work dir (default target/peer-bench) because shared/ is
# read-only; its setup.sh installs nginx, varnish and wrk from Debian when missing.
# Env: PEER_BENCH=path/to/bench  WORKDIR=target/peer-bench  and the harness's own knobs:
#      RUNS=3 DURATION=10 THREADS=2 CONNS=64 PAGES=100 ACCEPT_ENCODING=
# Baseline and machine: see the issue notes (2 vCPU VM, wrk and servers share both cores; only
# the ratios and CPU µs/request are comparable between runs).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
src=${PEER_BENCH:-$root/../shared/bench}
work=${WORKDIR:-$root/target/peer-bench}
mode=${1:-passthrough}

[ -f "$src/bench.sh" ] || { echo "peer harness not found at $src (set PEER_BENCH)" >&2; exit 1; }
mkdir -p "$work"
# Copy the scripts and sources, keep what earlier runs built (origin/target) and measured.
(cd "$src" && tar --exclude=./origin/target --exclude=./run --exclude=./results -cf - .) | (cd "$work" && tar -xf -)
chmod -R u+w "$work"
bash "$work/setup.sh"
cargo build --release --quiet --manifest-path "$root/Cargo.toml"

case "$mode" in
    passthrough)
        peers=(origin-fast nginx-proxy)
        upstream=127.0.0.1:3003
        targets=(gateway nginx-proxy)
        export LIMIT=origin-fast
        ;;
    *) echo "unknown mode '$mode' (passthrough)" >&2; exit 2 ;;
esac

cleanup() {
    "$work/stop-peers.sh" gateway "${peers[@]}" >/dev/null 2>&1 || true
}
trap cleanup EXIT

"$work/start-peers.sh" "${peers[@]}"
mkdir -p "$work/run"
# Health checks off: the bench measures the proxy path only.
ISRGATE__HEALTH__INTERVAL=0s ISRGATE__LOG__LEVEL=warn \
    "$root/target/release/isrgate" serve --config /dev/null \
    --listen 127.0.0.1:8080 --admin-listen "" --upstream "http://$upstream" \
    >"$work/run/gateway.log" 2>&1 &
echo $! >"$work/run/gateway.pid"
for _ in $(seq 1 100); do
    curl -s -o /dev/null http://127.0.0.1:8080/ && break
    sleep 0.1
done

"$work/bench.sh" "${targets[@]}"
