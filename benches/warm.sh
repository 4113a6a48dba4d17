#!/usr/bin/env bash
# `isrgate warm` throughput: a sitemap of PAGES paths warmed through one gateway (embedded
# cache) in front of the peer harness's origin emulator (DELAY_MS per render, ~50 KB ISR pages),
# at each concurrency of CONCS, on cold pages; then the same sitemap again, every page already
# fresh (the cost of a warm that finds nothing to do). Prints renders/s as `isrgate warm`
# reports them (targets finished / elapsed) and the renders the origin counted.
# Everything on 127.0.0.1 (origin 3491, gateway 8491), stopped by PID at the end.
# Env: PAGES=1000 CONCS="4 16" DELAY_MS=50 VARIANTS=html
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
src=${PEER_BENCH:-$root/../shared/bench}
work=${WORKDIR:-$root/target/peer-bench}
PAGES=${PAGES:-1000}; CONCS=${CONCS:-"4 16"}; DELAY_MS=${DELAY_MS:-50}; VARIANTS=${VARIANTS:-html}
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
mkdir -p "$work"
(cd "$src" && tar --exclude=./origin/target --exclude=./run --exclude=./results -cf - origin) | (cd "$work" && tar -xf -)
chmod -R u+w "$work"
cargo build --release --quiet --manifest-path "$work/origin/Cargo.toml"
cargo build --release --quiet --manifest-path "$root/Cargo.toml"
bin=$root/target/release/isrgate

"$work/origin/target/release/origin" --port 3491 --delay-ms "$DELAY_MS" --s-maxage 3600 >/dev/null 2>&1 &
pids+=($!)
ISRGATE__LOG__LEVEL=warn "$bin" serve --config /dev/null --listen 127.0.0.1:8491 --admin-listen "" \
    --upstream http://127.0.0.1:3491 >/dev/null 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do curl -s -o /dev/null http://127.0.0.1:8491/page/ready && break; sleep 0.2; done

renders() { curl -s http://127.0.0.1:3491/__stats | sed -n 's/^{"total":\([0-9]*\).*/\1/p'; }
rate() { sed -n 's/^warmed .* (\([0-9.]*\)\/s).*/\1/p'; }
echo "| concurrency | cold: renders/s | origin renders | fresh pass: targets/s | cores |"
echo "|---|---|---|---|---|"
for c in $CONCS; do
    map=$work/warm-c$c.xml
    { echo '<urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">'
      for i in $(seq 1 "$PAGES"); do echo "<url><loc>http://bench.local/page/warm-c$c-$i</loc></url>"; done
      echo '</urlset>'; } >"$map"
    warm() { "$bin" warm "$map" --gateway http://127.0.0.1:8491 --variants "$VARIANTS" --concurrency "$c"; }
    before=$(renders)
    out=$(warm); echo "$out" >&2; cold=$(echo "$out" | rate)
    after=$(renders)
    out=$(warm); echo "$out" >&2; fresh=$(echo "$out" | rate)
    echo "| $c | $cold | $((after - before)) | $fresh | $(nproc) |"
done
