#!/usr/bin/env bash
# What the gateway's memory really is, against what `cache.l1_max_bytes` says (issue 15): RSS
# plus sealed bodies (the system's Shmem: run it on an otherwise quiet machine) above baseline, after
# PAGES distinct pages of BYTES each were filled through it and read once more from Redis.
# One gateway, one redis-server and the peer harness's origin emulator, on 127.0.0.1;
# stopped by PID at the end.
# Env: BYTES=2048 PAGES=200000 L1_MB=64 CONNS=8 DURATION=60 (wrk runs for DURATION, cycling the pages) (sizes to try: 2048, 12288, 307200 with PAGES=2000)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
src=${PEER_BENCH:-$root/../shared/bench}
work=${WORKDIR:-$root/target/peer-bench}
BYTES=${BYTES:-2048}; PAGES=${PAGES:-200000}; L1_MB=${L1_MB:-64}; CONNS=${CONNS:-8}
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
command -v wrk >/dev/null || { echo "wrk is needed (benches/load.sh installs it)" >&2; exit 1; }
mkdir -p "$work"
(cd "$src" && tar --exclude=./origin/target --exclude=./run --exclude=./results -cf - origin) | (cd "$work" && tar -xf -)
chmod -R u+w "$work"
cargo build --release --quiet --manifest-path "$work/origin/Cargo.toml"
cargo build --release --quiet --manifest-path "$root/Cargo.toml"

"$work/origin/target/release/origin" --port 3391 --delay-ms 0 --body-bytes "$BYTES" --s-maxage 3600 >/dev/null 2>&1 &
pids+=($!)
redis-server --port 6391 --bind 127.0.0.1 --save "" --appendonly no --logfile /dev/null &
pids+=($!)
env ${GW_ENV:-} ISRGATE__LOG__LEVEL=warn ISRGATE__CACHE__L1_MAX_BYTES=$((L1_MB * 1024 * 1024)) \
    "$root/target/release/isrgate" serve --config /dev/null --listen 127.0.0.1:8391 --admin-listen "" \
    --redis redis://127.0.0.1:6391 --upstream http://127.0.0.1:3391 >/dev/null 2>&1 &
gw=$!; pids+=($gw)
for _ in $(seq 1 100); do curl -s -o /dev/null http://127.0.0.1:8391/page/warm && break; sleep 0.2; done
kib() { awk -v k="$1" '$1 == k":" {print $2}' "/proc/$gw/status"; }
# Sealed bodies are memory files only sent from (sendfile), never mapped: they show in the
# system's Shmem, not in the process's RSS or RssShmem.
sys_shmem() { awk '$1 == "Shmem:" {print $2}' /proc/meminfo; }
base_rss=$(kib VmRSS); base_shm=$(sys_shmem)

# One wrk thread (one Lua state): a counter walks the pages in order, over and over.
cat >/tmp/isrgate-memory.lua <<LUA
counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", "/page/m-" .. (((counter - 1) % $PAGES) + 1), { ["Host"] = "bench.local" })
end
LUA
# wrk stops on time, not count: long enough for PAGES pages, bounded.
rate=$(timeout 600 wrk -t1 -c"$CONNS" -d"${DURATION:-60}s" -s /tmp/isrgate-memory.lua http://127.0.0.1:8391 2>/dev/null | awk '/Requests\/sec/ {print $2}' || true)
sleep 2
rss=$(kib VmRSS); shm=$(sys_shmem)
entries=$(redis-cli -p 6391 dbsize)
awk -v b="$BYTES" -v l1="$L1_MB" -v r="$((rss - base_rss))" -v s="$((shm - base_shm))" -v e="$entries" -v q="${rate:-?}" 'BEGIN {
    printf "| %d B pages | %d MiB L1 | %d keys in Redis | RSS +%.1f MiB, sealed (system Shmem) +%.1f MiB | %.2fx the bound | %s req/s |\n",
        b, l1, e, r / 1024, s / 1024, (l1 > 0) ? ((r + s) / 1024) / l1 : 0, q }'
