#!/usr/bin/env bash
# Load benchmark of isrgate side by side with nginx (and Varnish) using the peer harness
# (`../shared/bench`: origin emulator, nginx, Varnish, wrk). Traffic stays on 127.0.0.1, every
# run is bounded in time, and only processes this script started are stopped.
#
#   benches/load.sh passthrough   isrgate as a plain proxy vs nginx-proxy, both in front of
#                                 origin-fast (0 ms render); ratio to origin-fast served directly
#   benches/load.sh hit           cache hits: isrgate with its L1 (8080) and in strict mode, every
#                                 hit a Redis read (8085), next to nginx proxy_cache and Varnish,
#                                 against `limit` (identity clients) then `limit-gzip` (gzip
#                                 clients); Redis is a redis-server of this script on 127.0.0.1:6391
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
        ;;
    hit)
        peers=(origin limit limit-gzip nginx varnish)
        upstream=127.0.0.1:3001
        ;;
    *) echo "unknown mode '$mode' (passthrough | hit)" >&2; exit 2 ;;
esac

redis_pid=""
cleanup() {
    "$work/stop-peers.sh" gateway gw-strict "${peers[@]}" >/dev/null 2>&1 || true
    [ -n "$redis_pid" ] && kill "$redis_pid" 2>/dev/null || true
}
trap cleanup EXIT

"$work/start-peers.sh" "${peers[@]}"
mkdir -p "$work/run"

# start_gateway NAME PORT [ENV=VALUE…]: an isrgate on 127.0.0.1:PORT, PID in run/NAME.pid.
start_gateway() {
    local name=$1 port=$2; shift 2
    env ISRGATE__HEALTH__INTERVAL=0s ISRGATE__LOG__LEVEL=warn "$@" \
        "$root/target/release/isrgate" serve --config /dev/null \
        --listen "127.0.0.1:$port" --admin-listen "" --upstream "http://$upstream" \
        >"$work/run/$name.log" 2>&1 &
    echo $! >"$work/run/$name.pid"
    for _ in $(seq 1 100); do
        curl -s -o /dev/null "http://127.0.0.1:$port/" && return 0
        sleep 0.1
    done
    echo "$name did not start; see $work/run/$name.log" >&2
    return 1
}

case "$mode" in
    passthrough)
        # Pure proxy: the cache off, health checks off: the bench measures the proxy path.
        start_gateway gateway 8080 ISRGATE__CACHE__ENABLED=false
        LIMIT=origin-fast "$work/bench.sh" gateway nginx-proxy
        ;;
    hit)
        redis-server --port 6391 --bind 127.0.0.1 --save "" --appendonly no \
            --logfile "$work/run/redis.log" &
        redis_pid=$!
        for _ in $(seq 1 50); do redis-cli -p 6391 ping >/dev/null 2>&1 && break; sleep 0.1; done
        start_gateway gateway 8080 ISRGATE__REDIS__URL=redis://127.0.0.1:6391
        start_gateway gw-strict 8085 ISRGATE__REDIS__URL=redis://127.0.0.1:6391 ISRGATE__CACHE__L1_MAX_BYTES=0
        targets=(gateway gw-strict=127.0.0.1:8085 nginx varnish)
        LIMIT=limit "$work/bench.sh" "${targets[@]}"
        ACCEPT_ENCODING=gzip "$work/bench.sh" "${targets[@]}"
        # Bytes at rest: one stored page vs its identity body.
        key=$(redis-cli -p 6391 --scan --pattern 'isr:*:e' | sed -n 1p)
        stored=$(redis-cli -p 6391 hstrlen "$key" b)
        identity=$(curl -s -H 'Accept-Encoding: identity' http://127.0.0.1:8080/page/1 | wc -c)
        awk -v s="$stored" -v i="$identity" 'BEGIN { printf "bytes at rest: %d gzip vs %d identity (%.1f%% smaller)\n", s, i, 100 - 100 * s / i }'
        ;;
esac
