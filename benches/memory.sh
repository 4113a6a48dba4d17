#!/usr/bin/env bash
# What the gateway's memory really is, against what `cache.l1_max_bytes` says (issue 15): RSS
# plus sealed bodies above baseline, after PAGES distinct pages of BYTES each were filled through
# it and read once more from Redis (at the end, 2 s after the load), and the most it held while
# the load ran (sampled every 0.5 s).
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
rss() { awk '$1 == "VmRSS:" {print $2}' "/proc/$gw/status"; }
# Sealed bodies are memory files only sent from (sendfile), never mapped: they are in the
# system's Shmem, not in the process's RSS or RssShmem. Summed over the gateway's own
# descriptors in whole pages (KiB), so no other process's shared memory enters the measure.
# (A file closed between the listing and the stat is simply not counted.)
sealed() {
    { find /proc/$gw/fd -lname '/memfd:isrgate-body*' -print0 2>/dev/null || true; } |
        { xargs -0 -r stat -L -c %s 2>/dev/null || true; } |
        awk '{s += int(($1 + 4095) / 4096) * 4} END {print s + 0}'
}
base_rss=$(rss); base_shm=$(sealed)
# The most held while the load runs, KiB above baseline.
echo 0 > "$work/peak"
(
    set +e
    peak=0
    while sleep 0.5; do
        now=$(( $(rss) + $(sealed) - base_rss - base_shm ))
        if (( now > peak )); then peak=$now; echo "$peak" > "$work/peak"; fi
    done
) &
sampler=$!; pids+=($sampler)

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
kill "$sampler" 2>/dev/null || true
peak=$(cat "$work/peak")
sleep 2
rss=$(rss); shm=$(sealed)
entries=$(redis-cli -p 6391 dbsize)
awk -v b="$BYTES" -v l1="$L1_MB" -v r="$((rss - base_rss))" -v s="$((shm - base_shm))" -v p="$peak" -v e="$entries" -v q="${rate:-?}" 'BEGIN {
    printf "| %d B pages | %d MiB L1 | %d keys in Redis | end: RSS +%.1f MiB, sealed +%.1f MiB, %.2fx the bound | peak under load %.2fx | %s req/s |\n",
        b, l1, e, r / 1024, s / 1024, (l1 > 0) ? ((r + s) / 1024) / l1 : 0, (l1 > 0) ? (p / 1024) / l1 : 0, q }'
