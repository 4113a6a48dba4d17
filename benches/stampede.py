#!/usr/bin/env python3
"""Cold-key stampede over a fleet: K concurrent requests for one never-requested path, spread
round-robin over one or more targets (the gateways of a fleet), all with the same Host header
so they share one cache key; then the origin's render count for that path (/__stats).
Latency is reported twice: to the whole response, and to the response head (when the cache
answered; with K=200 the client spends tens of ms reading the 200 bodies).

All K connections are opened first, then the K requests are written back to back, and every
response is read to EOF (Connection: close). Prints one JSON object. Standard library only;
loopback addresses only. Modelled on ../shared/bench/stampede.py (single target).
"""
import argparse
import asyncio
import json
import statistics
import time
import urllib.parse
import urllib.request


def split_addr(a):
    a = a.removeprefix("http://").rstrip("/")
    host, port = a.rsplit(":", 1)
    if not (host.startswith("127.") or host in ("localhost", "[::1]")):
        raise SystemExit(f"refusing non-loopback address {a}")
    return host.strip("[]"), int(port)


def renders(origin, path):
    q = urllib.parse.urlencode({"path": path})
    with urllib.request.urlopen(f"http://{origin}/__stats?{q}", timeout=5) as r:
        return json.load(r)["renders"]


async def run(args, targets):
    req = (f"GET {args.path} HTTP/1.1\r\nHost: {args.host}\r\nUser-Agent: stampede\r\n"
           f"Accept: */*\r\nConnection: close\r\n\r\n").encode()
    addrs = [targets[i % len(targets)] for i in range(args.k)]
    conns = await asyncio.gather(*[asyncio.open_connection(h, p) for h, p in addrs])
    sent = []
    t_first = time.perf_counter()
    for _, w in conns:
        w.write(req)
        sent.append(time.perf_counter())
    t_last = time.perf_counter()

    async def read(i, r, w):
        first = await r.readuntil(b"\r\n\r\n")
        t_head = time.perf_counter()
        data = first + await r.read()
        t = time.perf_counter()
        w.close()
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = lines[0].split(" ")[1] if lines and " " in lines[0] else "ERR"
        hdrs = {}
        for ln in lines[1:]:
            k, _, v = ln.partition(":")
            hdrs[k.strip().lower()] = v.strip()
        return {"status": status, "ms": (t - sent[i]) * 1000, "head_ms": (t_head - sent[i]) * 1000,
                "len": len(body),
                "cache": hdrs.get("cache-status") or hdrs.get("x-cache") or "",
                "gen": hdrs.get("x-origin-render", "")}

    res = await asyncio.wait_for(
        asyncio.gather(*[read(i, r, w) for i, (r, w) in enumerate(conns)]), timeout=args.timeout)
    return res, (t_last - t_first) * 1000


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--targets", required=True, help="HOST:PORT[,HOST:PORT…] of the fleet")
    ap.add_argument("--origin", default="127.0.0.1:3001", help="HOST:PORT of the origin emulator")
    ap.add_argument("--path", required=True, help="uncached path, e.g. /page/stampede-123")
    ap.add_argument("--host", default="bench.local", help="Host header sent to every target")
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--settle", type=float, default=1.0, help="seconds before reading origin stats")
    a = ap.parse_args()
    split_addr(a.origin)
    targets = [split_addr(t) for t in a.targets.split(",") if t]
    before = renders(a.origin, a.path)
    res, spread = asyncio.run(run(a, targets))
    time.sleep(a.settle)
    after = renders(a.origin, a.path)
    ms = [r["ms"] for r in res]
    head_ms = [r["head_ms"] for r in res]
    statuses, caches = {}, {}
    for r in res:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
        caches[r["cache"] or "-"] = caches.get(r["cache"] or "-", 0) + 1
    print(json.dumps({
        "targets": a.targets, "path": a.path, "k": a.k,
        "origin_renders": after - before,
        "statuses": statuses, "cache_header": caches,
        "distinct_origin_renders_seen": len({r["gen"] for r in res}),
        "body_bytes_min": min(r["len"] for r in res),
        "send_spread_ms": round(spread, 1),
        "latency_ms": {"min": round(min(ms), 1), "p50": round(statistics.median(ms), 1),
                       "p90": round(pct(ms, 90), 1), "max": round(max(ms), 1)},
        # Time to the response head: when the cache answered, without the time the client
        # takes to read K bodies (10 MB for K=200) on the same cores.
        "head_ms": {"min": round(min(head_ms), 1), "p50": round(statistics.median(head_ms), 1),
                    "p90": round(pct(head_ms, 90), 1), "max": round(max(head_ms), 1)},
    }))


if __name__ == "__main__":
    main()
