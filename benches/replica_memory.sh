#!/usr/bin/env bash
# Memory of one `next start` replica of examples/nextjs after N distinct tagged pages
# (/tagged/1…N), with @isrgate/next on (ISRGATE_REDIS_URL) and off, side by side: the package
# must keep a replica bounded (Next's memory LRU, cacheMaxMemorySize, holds the pages; the
# package keeps nothing per page).
#   bash benches/replica_memory.sh [N=10000]
# Needs a built examples/nextjs (the e2e test or `npx next build` there) and redis-server.
# Traffic goes to 127.0.0.1 only; every process started here is stopped by PID on exit.
set -euo pipefail
n=${1:-10000}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
app=$root/examples/nextjs
[ -f "$app/.next/BUILD_ID" ] || { echo "build examples/nextjs first (npx next build)"; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

rport=$(free_port)
redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no >/dev/null &
pids+=($!)
until redis-cli -p "$rport" ping >/dev/null 2>&1; do sleep 0.1; done
redis-cli -p "$rport" FUNCTION LOAD REPLACE "$(cat "$root/src/invalidate/invalidate.lua")" >/dev/null

# RSS of a process and its children, MiB.
rss() { ps -o rss= --ppid "$1" -p "$1" | awk '{s+=$1} END {printf "%.0f", s/1024}'; }

run() {
  local label=$1 url=$2 port dir pid
  port=$(free_port)
  dir=$(mktemp -d)
  # A private copy, like a container: its own on-disk ISR cache.
  (cd "$app" && tar --exclude=.next/cache -cf - .next) | (cd "$dir" && tar -xf -)
  cp "$app/package.json" "$app/next.config.js" "$dir/"
  ln -s "$app/node_modules" "$dir/node_modules"
  (cd "$dir" && ISRGATE_REDIS_URL=$url NEXT_TELEMETRY_DISABLED=1 exec node node_modules/next/dist/bin/next start -p "$port" -H 127.0.0.1 >/dev/null 2>&1) &
  pid=$!
  pids+=($pid)
  until curl -sf -o /dev/null "http://127.0.0.1:$port/isr/one"; do sleep 0.2; done
  printf '%-22s start %5s MiB' "$label" "$(rss "$pid")"
  for stop in $((n / 4)) $((n / 2)) "$n"; do
    seq "${done_to:-1}" "$stop" | xargs -P 8 -I{} curl -s -o /dev/null "http://127.0.0.1:$port/tagged/{}"
    done_to=$((stop + 1))
    printf ' | %6s pages %5s MiB' "$stop" "$(rss "$pid")"
  done
  unset done_to
  echo
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rm -rf "$dir"
}

run "without @isrgate/next" ""
run "with @isrgate/next" "redis://127.0.0.1:$rport"
echo "isr:builds fields: $(redis-cli -p "$rport" HLEN isr:builds); Redis used_memory: $(redis-cli -p "$rport" INFO memory | grep '^used_memory_human' | cut -d: -f2 | tr -d '\r')"
