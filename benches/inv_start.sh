#!/usr/bin/env bash
# Start time with a long invalidation history (issue 18): from the gateway's process start to
# its first `/readyz` 200, with RECORDS records in isr:inv, all recent (none prunable).
#   1. RECORDS records written as a fleet from before the index did (HSET, no index): the first
#      start scans the hash (what every start did before the snapshot) and leaves a snapshot.
#   2. SINCE more records written through the function (indexed), as after a snapshot.
#   3. RUNS starts, each reading the snapshot and the index after it.
# Each start prints its time to ready and the gateway's own "invalidations loaded" line (via,
# took_ms). One redis-server on a free port (its own, no persistence) and the release gateway
# (its replica a closed port: with the cache on it is ready without one), on 127.0.0.1;
# everything started here is stopped by PID at the end.
# Env: RECORDS=1000000 SINCE=10000 RUNS=3 NO_BUILD=1 (use target/release/isrgate as it is)
#      WRAP="perf record -g -o /tmp/inv.perf --" runs each snapshot start under a profiler
#
# Results, 2026-12-04, 2 vCPU VM shared with other builds (load average 4-5.5), Redis 7.0.15,
# release build, loopback, 1,000,000 records + 10,000 in the index, four runs of this script:
#   scan (every start before the snapshot; 2.7 s measured then): 2.3-3.2 s, 1.0-1.1 s of CPU
#   snapshot: 230-636 ms to /readyz over 12 starts (median ~320 ms), 60-270 ms of CPU,
#             RSS 97 MiB (196 MiB after the scan, 38 MiB with no records)
#   1,100 records: 119-213 ms (the rest of a start: process, Redis connections, first look)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RECORDS=${RECORDS:-1000000}; SINCE=${SINCE:-10000}; RUNS=${RUNS:-3}
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
now_ns() { date +%s%N; }
[ -n "${NO_BUILD:-}" ] || cargo build --release --quiet --manifest-path "$root/Cargo.toml"
gateway_bin=$root/target/release/isrgate

rport=$(free_port)
redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" --logfile "$work/redis.log" &
pids+=($!)
cli() { redis-cli -p "$rport" "$@"; }
until cli ping >/dev/null 2>&1; do sleep 0.05; done

# Tags as Next.js gives them, half hard path purges, half soft tag purges; epochs over the
# last hour (Redis's clock). In scripts of 100,000 fields (one long script blocks Redis).
time_now=($(cli TIME))
now_ms=$(( time_now[0] * 1000 + time_now[1] / 1000 ))
seed='for i = tonumber(ARGV[1]), tonumber(ARGV[2]) do
  local e = string.format("%.0f", tonumber(ARGV[3]) - (i % 3600000))
  if i % 2 == 1 then redis.call("HSET", KEYS[1], "h:path:/products/" .. i, e)
  else redis.call("HSET", KEYS[1], "s:_N_T_/blog/" .. i .. "/page", e) end
end return 1'
for ((from = 1; from <= RECORDS; from += 100000)); do
    to=$(( from + 99999 < RECORDS ? from + 99999 : RECORDS ))
    cli EVAL "$seed" 1 isr:inv "$from" "$to" "$now_ms" >/dev/null
done
cli HSET isr:inv _epoch "$now_ms" >/dev/null

# Starts a gateway, waits for /readyz 200; prints the time and its load line. $gw: its PID.
start() {
    local port admin t0 t1
    port=$(free_port); admin=$(free_port)
    t0=$(now_ns)
    ISRGATE__LOG__LEVEL=info ISRGATE__LOG__ACCESS=false ISRGATE__LISTEN__ACCEPT_GRACE=0s \
        ${2:-} "$gateway_bin" serve --config /dev/null --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
        --redis "redis://127.0.0.1:$rport" --upstream http://127.0.0.1:9 >"$work/gw.log" 2>&1 &
    gw=$!; pids+=($gw)
    until curl -sf -o /dev/null "http://127.0.0.1:$admin/readyz"; do
        kill -0 "$gw" 2>/dev/null || { cat "$work/gw.log" >&2; exit 1; }
        sleep 0.01
    done
    t1=$(now_ns)
    # CPU time the process used until then (user + system, clock ticks): on a shared machine
    # the wall time also counts the waits for a core.
    local ticks cpu_ms rss_mb
    ticks=$(awk '{print $14 + $15}' "/proc/$gw/stat")
    cpu_ms=$(( ticks * 1000 / $(getconf CLK_TCK) ))
    rss_mb=$(( $(awk '$1 == "VmRSS:" {print $2}' "/proc/$gw/status") / 1024 ))
    # Log lines leave in batches (100 ms).
    for _ in $(seq 1 100); do grep -q 'invalidations loaded' "$work/gw.log" && break; sleep 0.02; done
    printf '%-9s ready in %5d ms (cpu %4d ms, rss %3d MiB) | %s\n' "$1" $(( (t1 - t0) / 1000000 )) "$cpu_ms" "$rss_mb" \
        "$(grep -o 'invalidations loaded.*' "$work/gw.log" | tr -s ' ' | head -1)"
}
stop() {
    kill -TERM "$gw" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$gw" 2>/dev/null || break; sleep 0.05; done
    kill -9 "$gw" 2>/dev/null || true
    wait "$gw" 2>/dev/null || true
}

echo "isr:inv: $(cli HLEN isr:inv) fields, $(( $(cli MEMORY USAGE isr:inv SAMPLES 0) / 1024 )) KiB in Redis"
start scan
# The scan's snapshot is written once the map is complete, after readiness.
until [ -n "$(cli HGET isr:inv _snapped)" ]; do sleep 0.05; done
stop
for ((i = 0; i < SINCE; i += 100)); do
    line="FCALL isrgate_invalidate_v2 2 isr:inv isr:{isr:inv}:z bench hard isr:bus 0"
    for ((j = i; j < i + 100 && j < SINCE; j++)); do line+=" path:/since/$j"; done
    echo "$line"
done | cli >/dev/null
echo "snapshot: $(( $(cli STRLEN 'isr:{isr:inv}:snap') / 1024 )) KiB; index since: $(cli ZCARD 'isr:{isr:inv}:z') records ($(( $(cli MEMORY USAGE 'isr:{isr:inv}:z' SAMPLES 0) / 1024 )) KiB)"
for ((run = 1; run <= RUNS; run++)); do
    start "snapshot" "${WRAP:-}"
    stop
done
