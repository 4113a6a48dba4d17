#!/usr/bin/env bash
# isrgate in front of real Next.js (examples/nextjs, issue 7): three `next start` replicas, a
# redis-server and two gateways, all on 127.0.0.1 and stopped by PID at the end.
#   1. TTFB, cold and warm, direct to a replica vs through isrgate (medians of N requests);
#   2. renders per 1 000 requests, and per page per revalidate window, over DURATION s of mixed
#      traffic (HTML and RSC) on 20 pages revalidating every 5 s, direct (spread over the
#      replicas) vs through the gateways (which refresh with the build's previewModeId, read
#      from its prerender manifest: one render per page per window is the target);
#   3. Redis bytes per cached page vs the identity body;
#   4. bytes a gzip client gets for the largest /_next/static chunk, replica vs gateway.
# Env: DURATION=60 N=20 (warm TTFB samples) COLD_N=300 (cold pairs: the replica's render time
# varies by milliseconds, so the median of a few hundred differences is what is steady) CONNS=8
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
app=${NEXT_DIR:-$root/examples/nextjs}
DURATION=${DURATION:-60}; N=${N:-20}; COLD_N=${COLD_N:-300}; CONNS=${CONNS:-8}
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

command -v wrk >/dev/null || { echo "wrk is needed (benches/load.sh installs it)" >&2; exit 1; }
cargo build --release --quiet --manifest-path "$root/Cargo.toml"
(cd "$app" && { [ -d node_modules ] || npm ci --no-audit --no-fund; } && NEXT_TELEMETRY_DISABLED=1 npx next build >/dev/null)

for i in 1 2 3; do
    (cd "$app" && REPLICA_ID=r$i REVALIDATE_SECRET=s NEXT_TELEMETRY_DISABLED=1 \
        exec node node_modules/next/dist/bin/next start -p 320$i -H 127.0.0.1 >/dev/null 2>&1) &
    pids+=($!)
done
redis-server --port 6394 --bind 127.0.0.1 --save "" --appendonly no --logfile /dev/null &
pids+=($!)
for i in 1 2; do
    env ISRGATE__HEALTH__INTERVAL=0s ISRGATE__LOG__LEVEL=warn ISRGATE__CACHE__NAMESPACE=isrgate-example \
        ISRGATE__UPSTREAM__PRERENDER_MANIFEST="$app/.next/prerender-manifest.json" \
        "$root/target/release/isrgate" serve --config /dev/null --listen 127.0.0.1:820$i --admin-listen "" \
        --redis redis://127.0.0.1:6394 \
        --upstream http://127.0.0.1:3201 --upstream http://127.0.0.1:3202 --upstream http://127.0.0.1:3203 \
        >/dev/null 2>&1 &
    pids+=($!)
done
# A third gateway in front of replica 3201 alone, for the TTFB pairs: direct and through the
# gateway then reach the same replica, warmed by the same traffic.
env ISRGATE__HEALTH__INTERVAL=0s ISRGATE__LOG__LEVEL=warn ISRGATE__CACHE__NAMESPACE=isrgate-example \
    "$root/target/release/isrgate" serve --config /dev/null --listen 127.0.0.1:8203 --admin-listen "" \
    --redis redis://127.0.0.1:6394 --upstream http://127.0.0.1:3201 >/dev/null 2>&1 &
pids+=($!)
for port in 3201 3202 3203 8201 8202 8203; do
    for _ in $(seq 1 100); do curl -s -o /dev/null "http://127.0.0.1:$port/api/renders" && break; sleep 0.2; done
done

ttfb() { curl -s -o /dev/null -w '%{time_starttransfer}\n' -H 'Host: bench.local' "$1"; }
median() { sort -n | awk '{a[NR]=$1} END {printf "%.1f", a[int((NR+1)/2)] * 1000}'; }
echo "| TTFB ms (median; cold: $COLD_N pages each, warm: $N requests) | direct to a replica | through isrgate |"
echo "|---|---:|---:|"
# Cold pages in pairs (direct and through the gateway, both to replica 3201), COLD_N of them:
# the replica's render time drifts over a run, and a pair sees the same drift. The order within
# a pair is drawn at random: whichever request follows the other pays for the replica's
# background work after the first render (writing its ISR cache), a bias of a few tenths of a
# millisecond that a fixed order would put on one side.
: >/tmp/isrgate-cold-d; : >/tmp/isrgate-cold-g
for i in $(seq 1 "$COLD_N"); do
    for side in $(printf 'd\ng\n' | shuf); do
        case $side in d) port=3201 ;; g) port=8203 ;; esac
        ttfb "http://127.0.0.1:$port/isr/cold-$side-$RANDOM-$i" >>/tmp/isrgate-cold-$side
    done
done
cold_d=$(median </tmp/isrgate-cold-d)
cold_g=$(median </tmp/isrgate-cold-g)
warm_d=$(for i in $(seq 1 "$N"); do ttfb "http://127.0.0.1:3201/isr/one"; done | median)
warm_g=$(for i in $(seq 1 "$N"); do ttfb "http://127.0.0.1:8203/isr/one"; done | median)
echo "| cold (a page never rendered) | $cold_d | $cold_g |"
cold_diff=$(paste /tmp/isrgate-cold-d /tmp/isrgate-cold-g | awk '{print $2 - $1}' | median)
echo "| warm (the same page again) | $warm_d | $warm_g |"
echo "cold overhead through isrgate, median of the $COLD_N paired differences: $cold_diff ms"

cat >/tmp/isrgate-mixed.lua <<'LUA'
math.randomseed(os.time() + (tonumber(os.getenv("SEED") or "0")))
request = function()
  local headers = { ["Host"] = "bench.local" }
  -- Half the requests are client-side navigations: the page's RSC payload.
  if math.random(1, 2) == 1 then headers["RSC"] = "1" end
  return wrk.format("GET", "/isr5/" .. math.random(1, 20), headers)
end
done = function(summary) io.write(string.format("REQUESTS %d\n", summary.requests)) end
LUA
renders() {
    local total=0 n
    for port in 3201 3202 3203; do
        n=$(curl -s "http://127.0.0.1:$port/api/renders" | python3 -c 'import json,sys; r=json.load(sys.stdin)["renders"]; print(sum(v for k,v in r.items() if k.startswith("/isr5/")))')
        total=$((total + n))
    done
    echo "$total"
}
mixed() {  # mixed LABEL PORT…
    local label=$1; shift
    local before; before=$(renders)
    local outs=() wrks=() per=$(( CONNS / $# ))
    [ "$per" -ge 1 ] || per=1
    for port in "$@"; do
        out=$(mktemp); outs+=("$out")
        SEED=$port timeout $((DURATION + 30)) wrk -t1 -c"$per" -d"${DURATION}s" -s /tmp/isrgate-mixed.lua "http://127.0.0.1:$port" >"$out" 2>&1 &
        wrks+=($!)
    done
    wait "${wrks[@]}"   # only the load generators: the servers run in the background too
    local after; after=$(renders)
    local reqs; reqs=$(cat "${outs[@]}" | awk '/^REQUESTS/ {s += $2} END {print s}')
    rm -f "${outs[@]}"
    awk -v l="$label" -v r="$((after - before))" -v q="$reqs" -v w="$(( (DURATION + 4) / 5 ))" \
        'BEGIN { printf "| %s | %d | %d | %.2f | %.2f |\n", l, q, r, 1000 * r / q, r / (20 * w) }'
}
echo
echo "| ${DURATION} s of mixed traffic (HTML and RSC), 20 pages with revalidate 5 | requests | renders | renders per 1 000 requests | renders per page per window |"
echo "|---|---:|---:|---:|---:|"
mixed "direct (spread over 3 replicas)" 3201 3202 3203
mixed "through 2 isrgate (one Redis)" 8201 8202

echo
echo "| cached page | identity bytes | Redis: gzip body + metadata | smaller |"
echo "|---|---:|---:|---:|"
for path in / /isr/one /tagged/1 /legacy/1 /isr5/1 /products; do
    curl -s -o /dev/null -H 'Host: bench.local' "http://127.0.0.1:8201$path"
done
sleep 0.5
for path in / /isr/one /tagged/1 /legacy/1 /isr5/1 /products; do
    identity=$(curl -s "http://127.0.0.1:3201$path" | wc -c)
    key=$(cd "$root" && cargo run --quiet --release --example keyhex -- bench.local "$path" 2>/dev/null || true)
    [ -n "$key" ] || continue
    stored=$(( $(redis-cli -p 6394 hstrlen "isr:{$key}:e" b) + $(redis-cli -p 6394 hstrlen "isr:{$key}:e" m) ))
    [ "$stored" -gt 0 ] || { echo "| $path | $identity | not cached | - |"; continue; }
    awk -v p="$path" -v i="$identity" -v s="$stored" 'BEGIN { printf "| %s | %d | %d | %.1f %% |\n", p, i, s, 100 - 100 * s / i }'
done

echo
echo "| largest /_next/static chunk, gzip client | identity bytes | replica's gzip | through isrgate (miss) | through isrgate (hit) |"
echo "|---|---:|---:|---:|---:|"
chunk=$(ls -S "$app"/.next/static/chunks/*.js | head -1 | sed "s|$app/.next|/_next|")
size() { curl -s -o /dev/null -w '%{size_download}' -H 'Host: bench.local' -H 'Accept-Encoding: gzip' "$1"; }
identity=$(curl -s -o /dev/null -w '%{size_download}' "http://127.0.0.1:3201$chunk")
echo "| $chunk | $identity | $(size "http://127.0.0.1:3201$chunk") | $(size "http://127.0.0.1:8202$chunk") | $(size "http://127.0.0.1:8201$chunk") |"
