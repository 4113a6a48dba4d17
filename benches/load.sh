#!/usr/bin/env bash
# Load benchmark of isrgate side by side with nginx (and Varnish) using the peer harness
# (`../shared/bench`: origin emulator, nginx, Varnish, wrk). Traffic stays on 127.0.0.1, every
# run is bounded in time, and only processes this script started are stopped.
#
#   benches/load.sh passthrough   isrgate as a plain proxy vs nginx-proxy, both in front of
#                                 origin-fast (0 ms render); ratio to origin-fast served directly
#   benches/load.sh hit           cache hits: isrgate with its L1 (8080), in strict mode, every
#                                 hit a Redis read (8085), and with its L1 but the hit lane off
#                                 (8088), with its L1 and the access log on, JSON (8090, gw-log:
#                                 its cost against 8080 in one run), next to nginx proxy_cache
#                                 and Varnish,
#                                 against `limit` (identity clients) then `limit-gzip` (gzip
#                                 clients); Redis is a redis-server of this script on 127.0.0.1:6391.
#                                 Observability's cost, when named in HIT_TARGETS: gw-quiet
#                                 (8091, redis.publish_stats = false: no fleet snapshot), gw-tail
#                                 (8093, one `isrgate tail --status 5xx` follower: every hit
#                                 filtered, none sent), gw-tail-all (8094, one unfiltered
#                                 `isrgate tail --json` follower: every hit sent); `gateway`
#                                 publishes its snapshot and has no follower
#   benches/load.sh stampede      coalescing: a fleet of 3 isrgate (8080, 8086, 8087, one Redis)
#                                 against nginx and Varnish: cold stampede (examples/stampede.rs: K
#                                 requests for one new path, spread over the fleet; origin renders,
#                                 client latency) and
#                                 expiry under load (a path with s-maxage=EXPIRY_TTL hammered for
#                                 EXPIRY_DURATION s; re-renders). Env: K=200 RUNS=3 EXPIRY_TTL=2
#                                 EXPIRY_DURATION=10
#   benches/load.sh scrape        hit throughput of isrgate (L1, Redis) against `limit`, once
#                                 alone and once with a Prometheus-like scraper reading /metrics
#                                 and /api/stats every second: the dashboard's cost on hits
#
# The harness is copied to a writable work dir (default target/peer-bench) because shared/ is
# read-only; its setup.sh installs nginx, varnish and wrk from Debian when missing.
# Env: PEER_BENCH=path/to/bench  WORKDIR=target/peer-bench  and the harness's own knobs:
#      RUNS=3 DURATION=10 THREADS=2 CONNS=64 PAGES=100 ACCEPT_ENCODING=
#      hit mode: HIT_S_MAXAGE=3600 (the origin's s-maxage while measuring; 60 = the harness
#      default, every cache then re-renders its pages mid-run), HIT_TARGETS="gateway …" (a
#      subset of gateway, gw-strict=127.0.0.1:8085, gw-hyper=127.0.0.1:8088,
#      gw-log=127.0.0.1:8090, nginx, varnish),
#      HIT_BASELINE_BIN=path (another build as gw-base=127.0.0.1:8089: A/B in one run)
#      NO_PEER_CACHES=1: neither nginx nor Varnish (not installed, not started; HIT_TARGETS
#      then names gateways only), e.g. the access log's cost:
#      NO_PEER_CACHES=1 HIT_TARGETS="gateway gw-log=127.0.0.1:8090" benches/load.sh hit
#      and the fleet snapshot's and the live tail's (issue 19):
#      NO_PEER_CACHES=1 HIT_TARGETS="gateway gw-quiet=127.0.0.1:8091 gw-tail=127.0.0.1:8093
#      gw-tail-all=127.0.0.1:8094" benches/load.sh hit
# Every isrgate runs with its access log off (as the peers' nginx, `access_log off`), but gw-log.
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
if [ "${NO_PEER_CACHES:-}" = 1 ]; then
    command -v wrk >/dev/null || { echo "wrk not installed (apt-get install wrk)" >&2; exit 1; }
    (cd "$work/origin" && cargo build --release --quiet)
else
    bash "$work/setup.sh"
fi
cargo build --release --quiet --manifest-path "$root/Cargo.toml"
[ "$mode" = stampede ] && cargo build --release --quiet --example stampede --manifest-path "$root/Cargo.toml"

case "$mode" in
    passthrough)
        peers=(origin-fast nginx-proxy)
        upstream=127.0.0.1:3003
        ;;
    hit)
        peers=(origin limit limit-gzip nginx varnish)
        [ "${NO_PEER_CACHES:-}" = 1 ] && peers=(origin limit limit-gzip)
        upstream=127.0.0.1:3001
        ;;
    stampede)
        peers=(origin nginx varnish)
        upstream=127.0.0.1:3001
        ;;
    scrape)
        peers=(origin limit)
        upstream=127.0.0.1:3001
        ;;
    *) echo "unknown mode '$mode' (passthrough | hit | stampede | scrape)" >&2; exit 2 ;;
esac

redis_pid=""
tail_pids=()
cleanup() {
    "$work/stop-peers.sh" gateway gw-strict gw-hyper gw-base gw-log gw-quiet gw-tail gw-tail-all \
        gw-2 gw-3 "${peers[@]}" >/dev/null 2>&1 || true
    for pid in "${tail_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    [ -n "$redis_pid" ] && kill "$redis_pid" 2>/dev/null || true
}
trap cleanup EXIT

"$work/start-peers.sh" "${peers[@]}"
mkdir -p "$work/run"

# start_gateway NAME PORT [ENV=VALUE…]: an isrgate on 127.0.0.1:PORT, PID in run/NAME.pid
# (the binary: $BIN, default this tree's release build).
start_gateway() {
    local name=$1 port=$2; shift 2
    env ISRGATE__HEALTH__INTERVAL=0s ISRGATE__LOG__LEVEL=warn ISRGATE__LOG__ACCESS=false "$@" \
        "${BIN:-$root/target/release/isrgate}" serve --config /dev/null \
        --listen "127.0.0.1:$port" --admin-listen "${ADMIN_LISTEN:-}" --upstream "http://$upstream" \
        >"$work/run/$name.log" 2>&1 &
    echo $! >"$work/run/$name.pid"
    for _ in $(seq 1 100); do
        curl -s -o /dev/null "http://127.0.0.1:$port/" && return 0
        sleep 0.1
    done
    echo "$name did not start; see $work/run/$name.log" >&2
    return 1
}

# start_redis: a redis-server of this script on 127.0.0.1:6391 (stopped on exit).
start_redis() {
    redis-server --port 6391 --bind 127.0.0.1 --save "" --appendonly no \
        --logfile "$work/run/redis.log" &
    redis_pid=$!
    for _ in $(seq 1 50); do redis-cli -p 6391 ping >/dev/null 2>&1 && break; sleep 0.1; done
}

case "$mode" in
    passthrough)
        # Pure proxy: the cache off, health checks off: the bench measures the proxy path.
        start_gateway gateway 8080 ISRGATE__CACHE__ENABLED=false
        LIMIT=origin-fast "$work/bench.sh" gateway nginx-proxy
        ;;
    hit)
        start_redis
        start_gateway gateway 8080 ISRGATE__REDIS__URL=redis://127.0.0.1:6391
        start_gateway gw-strict 8085 ISRGATE__REDIS__URL=redis://127.0.0.1:6391 ISRGATE__CACHE__L1_MAX_BYTES=0
        # The same L1 gateway with the hit lane off (every hit through hyper's server): what
        # the lane is worth, in the same run.
        start_gateway gw-hyper 8088 ISRGATE__REDIS__URL=redis://127.0.0.1:6391 ISRGATE__LISTEN__HIT_LANE=false
        # HIT_BASELINE_BIN=path/to/older/isrgate: that build as gw-base (8089, L1), to compare
        # two builds in one run (add gw-base=127.0.0.1:8089 to HIT_TARGETS).
        # The L1 gateway again, with its access log on (JSON, one line per hit to its log file):
        # what the log costs per request, against `gateway` in the same run.
        start_gateway gw-log 8090 ISRGATE__REDIS__URL=redis://127.0.0.1:6391 \
            ISRGATE__LOG__ACCESS=true ISRGATE__LOG__FORMAT=json
        if [ -n "${HIT_BASELINE_BIN:-}" ]; then
            BIN=$HIT_BASELINE_BIN start_gateway gw-base 8089 ISRGATE__REDIS__URL=redis://127.0.0.1:6391
        fi
        # What watching costs (issue 19), started only when HIT_TARGETS names them: the fleet
        # snapshot off; a tail follower whose filter every hit fails; one that every hit reaches.
        read -r -a targets <<<"${HIT_TARGETS:-gateway gw-strict=127.0.0.1:8085 gw-hyper=127.0.0.1:8088 nginx varnish}"
        wants() { [[ " ${targets[*]} " == *" $1="* ]]; }
        if wants gw-quiet; then
            start_gateway gw-quiet 8091 ISRGATE__REDIS__URL=redis://127.0.0.1:6391 ISRGATE__REDIS__PUBLISH_STATS=false
        fi
        # follow NAME ADMIN_PORT ARGS…: an `isrgate tail` of gateway NAME through its admin API.
        follow() {
            local name=$1 port=$2; shift 2
            ISRGATE_ADMIN_TOKEN=bench-token "$root/target/release/isrgate" tail \
                --admin "http://127.0.0.1:$port" "$@" >/dev/null 2>"$work/run/$name-tail.log" &
            tail_pids+=($!)
        }
        for spec in gw-tail:8093:9193 gw-tail-all:8094:9194; do
            IFS=: read -r name port admin <<<"$spec"
            wants "$name" || continue
            ADMIN_LISTEN=127.0.0.1:$admin ISRGATE_ADMIN_TOKEN=bench-token \
                start_gateway "$name" "$port" ISRGATE__REDIS__URL=redis://127.0.0.1:6391
        done
        wants gw-tail && follow gw-tail 9193 --status 5xx
        wants gw-tail-all && follow gw-tail-all 9194 --json
        [ ${#tail_pids[@]} -gt 0 ] && sleep 1  # the followers attach
        # Hits, not refreshes: with the origin's default s-maxage=60 every cache re-renders its
        # 100 pages in the middle of the later rounds (HIT_S_MAXAGE=60 measures that too).
        curl -s -o /dev/null -X POST "http://127.0.0.1:3001/__config?s_maxage=${HIT_S_MAXAGE:-3600}"
        # HIT_TARGETS picks a subset (e.g. "gateway gw-strict=127.0.0.1:8085" with RUNS=8
        # DURATION=5: more, shorter pairs when the machine's speed drifts between minutes).
        LIMIT=limit "$work/bench.sh" "${targets[@]}"
        ACCEPT_ENCODING=gzip "$work/bench.sh" "${targets[@]}"
        # The access log gw-log wrote (one line per request it answered), then emptied: a run
        # writes hundreds of MB.
        log="$work/run/gw-log.log"
        echo "gw-log access lines: $(grep -c '"target":"isrgate::access"' "$log" || true) ($(du -h "$log" | cut -f1)); last: $(tail -1 "$log")"
        : >"$log"
        # Bytes at rest: one stored page vs its identity body.
        key=$(redis-cli -p 6391 --scan --pattern 'isr:*:e' | sed -n 1p)
        stored=$(redis-cli -p 6391 hstrlen "$key" b)
        identity=$(curl -s -H 'Accept-Encoding: identity' http://127.0.0.1:8080/page/1 | wc -c)
        awk -v s="$stored" -v i="$identity" 'BEGIN { printf "bytes at rest: %d gzip vs %d identity (%.1f%% smaller)\n", s, i, 100 - 100 * s / i }'
        ;;
    scrape)
        start_redis
        token=bench-token
        ADMIN_LISTEN=127.0.0.1:9191 ISRGATE_ADMIN_TOKEN=$token \
            start_gateway gateway 8080 ISRGATE__REDIS__URL=redis://127.0.0.1:6391
        plain() {
            echo "== hits, no scraper"
            LIMIT=limit "$work/bench.sh" gateway
        }
        scraped() {
            echo "== hits, /metrics and /api/stats scraped every second"
            (
                end=$((SECONDS + 60 * 10))
                while [ $SECONDS -lt $end ]; do
                    curl -s -o /dev/null -H "Authorization: Bearer $token" http://127.0.0.1:9191/metrics
                    curl -s -o /dev/null -H "Authorization: Bearer $token" http://127.0.0.1:9191/api/stats
                    sleep 1
                done
            ) &
            scraper=$!
            LIMIT=limit "$work/bench.sh" gateway
            kill "$scraper" 2>/dev/null || true
        }
        # ORDER=scraped-first swaps the runs (pages expire after 60 s: the second run pays
        # their refreshes, so run both orders).
        if [ "${ORDER:-}" = scraped-first ]; then scraped; plain; else plain; scraped; fi
        ;;
    stampede)
        start_redis
        fleet=()
        for spec in gateway:8080 gw-2:8086 gw-3:8087; do
            start_gateway "${spec%%:*}" "${spec##*:}" ISRGATE__REDIS__URL=redis://127.0.0.1:6391
            fleet+=("127.0.0.1:${spec##*:}")
        done
        for _ in $(seq 1 50); do
            [ "$(redis-cli -p 6391 pubsub numsub isr:bus | sed -n 2p)" = 3 ] && break
            sleep 0.1
        done
        K=${K:-200}; RUNS=${RUNS:-3}; EXPIRY_TTL=${EXPIRY_TTL:-2}; EXPIRY_DURATION=${EXPIRY_DURATION:-10}
        stamp=$(date +%Y%m%d-%H%M%S)
        out="$work/results/stampede-fleet-$stamp.jsonl"
        mkdir -p "$work/results"; : >"$out"
        systems=("isrgate-x3=$(IFS=,; echo "${fleet[*]}")" nginx=127.0.0.1:8081 varnish=127.0.0.1:8082)
        for sys in "${systems[@]}"; do
            name=${sys%%=*} targets=${sys#*=}
            for r in $(seq 1 "$RUNS"); do
                path="/page/stampede-$stamp-$name-$r-$RANDOM"
                res=$("$root/target/release/examples/stampede" --targets "$targets" --k "$K" --path "$path")
                echo "{\"kind\":\"stampede\",\"name\":\"$name\",\"run\":$r,\"result\":$res}" >>"$out"
                echo "$name stampede run $r: $res"
                sleep 1
            done
            # Expiry under load: every target of the system hammered at once, one wrk each,
            # 64 connections in all, the same Host everywhere (one key).
            path="/page/expiry-$stamp-$name-$RANDOM?s_maxage=$EXPIRY_TTL"
            first=${targets%%,*}
            curl -s -o /dev/null --max-time 10 -H 'Host: bench.local' "http://$first$path"
            sleep 0.3
            r0=$(curl -s -G "http://127.0.0.1:3001/__stats" --data-urlencode "path=$path" | sed -n 's/.*"renders":\([0-9]*\).*/\1/p')
            IFS=, read -r -a addrs <<<"$targets"
            conns=$(( 64 / ${#addrs[@]} ))
            pids=()
            for i in "${!addrs[@]}"; do
                PAGE_PATH="$path" timeout $((EXPIRY_DURATION + 30)) wrk -t1 -c"$conns" -d"${EXPIRY_DURATION}s" \
                    --timeout 5s -H 'Host: bench.local' -s "$work/lua/pages.lua" "http://${addrs[$i]}" \
                    >"$work/run/wrk-$i.out" 2>&1 &
                pids+=($!)
            done
            wait "${pids[@]}"
            sleep 1
            r1=$(curl -s -G "http://127.0.0.1:3001/__stats" --data-urlencode "path=$path" | sed -n 's/.*"renders":\([0-9]*\).*/\1/p')
            cat "$work"/run/wrk-*.out | grep '^RESULT' >"$work/run/wrk-all.out" || true
            python3 - "$name" "$EXPIRY_TTL" "$EXPIRY_DURATION" "$((r1 - r0))" "$work/run/wrk-all.out" >>"$out" <<'PY'
import json, sys
name, ttl, dur, renders, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
rows = [dict(kv.split("=") for kv in l.split()[1:]) for l in open(path)]
print(json.dumps({"kind": "expiry", "name": name, "ttl_s": ttl, "duration_s": dur,
    "renders_under_load": renders, "rps": sum(float(r["rps"]) for r in rows),
    "p99_us": max(int(r["p99_us"]) for r in rows), "max_us": max(int(r["max_us"]) for r in rows),
    "non2xx": sum(int(r["err_status"]) for r in rows)}))
PY
            echo "$name expiry: $(tail -1 "$out")"
            rm -f "$work"/run/wrk-*.out
        done
        python3 - "$out" <<'PY' | tee "${out%.jsonl}.md"
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
names = list(dict.fromkeys(r["name"] for r in rows))
print("| system | cold stampede: origin renders per run | client p50 / p90 / max ms (median run) | expiry under load: re-renders (ideal) | req/s | p99 / max ms | non-2xx |")
print("|---|---|---|---|---:|---|---:|")
for n in names:
    st = [r["result"] for r in rows if r["name"] == n and r["kind"] == "stampede"]
    x = [r for r in rows if r["name"] == n and r["kind"] == "expiry"][-1]
    s = sorted(st, key=lambda s: s["latency_ms"]["p50"])[len(st) // 2]
    per = ", ".join(str(s["origin_renders"]) for s in st)
    lat = f'{s["latency_ms"]["p50"]} / {s["latency_ms"]["p90"]} / {s["latency_ms"]["max"]}'
    e = f'{x["renders_under_load"]} in {x["duration_s"]} s, TTL {x["ttl_s"]} s (~{x["duration_s"] // x["ttl_s"]})'
    print(f'| {n} | {per} (K={st[0]["k"]}) | {lat} | {e} | {x["rps"]:,.0f} | {x["p99_us"]/1000:.2f} / {x["max_us"]/1000:.1f} | {x["non2xx"]} |')
PY
        ;;
esac
