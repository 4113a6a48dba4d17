//! Cold-key stampede client for `benches/load.sh stampede` (the same measurement as
//! `benches/stampede.py`, without Python's single event loop in the way: with K=200 that loop
//! needs tens of milliseconds just to read the 200 responses, which hides the cache's own
//! latency).
//!
//! Opens K connections spread round-robin over the targets, writes one GET for a never-seen path
//! on each (one Host header, so one cache key), reads every response to EOF (`Connection:
//! close`) on its own task, then reads the origin's render count for the path. Prints one JSON
//! line. Loopback addresses only.
//!
//! `cargo run --release --example stampede -- --targets 127.0.0.1:8080,127.0.0.1:8086 \
//!     --origin 127.0.0.1:3001 --path /page/stampede-1 [--k 200] [--host bench.local]`

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Args {
    targets: Vec<SocketAddr>,
    origin: SocketAddr,
    path: String,
    host: String,
    k: usize,
}

fn args() -> Result<Args, String> {
    let mut a = std::env::args().skip(1);
    let (mut targets, mut origin, mut path) = (None, "127.0.0.1:3001".to_owned(), None);
    let (mut host, mut k) = ("bench.local".to_owned(), 200usize);
    while let Some(flag) = a.next() {
        let value = a.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--targets" => targets = Some(value),
            "--origin" => origin = value,
            "--path" => path = Some(value),
            "--host" => host = value,
            "--k" => k = value.parse().map_err(|e| format!("--k: {e}"))?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    let loopback = |s: &str| -> Result<SocketAddr, String> {
        let addr: SocketAddr = s.parse().map_err(|e| format!("{s}: {e}"))?;
        if !addr.ip().is_loopback() {
            return Err(format!("refusing non-loopback address {s}"));
        }
        Ok(addr)
    };
    Ok(Args {
        targets: targets
            .ok_or("--targets is required")?
            .split(',')
            .map(loopback)
            .collect::<Result<_, _>>()?,
        origin: loopback(&origin)?,
        path: path.ok_or("--path is required")?,
        host,
        k,
    })
}

/// One response: status, time to the end of the head, time to EOF, body bytes, Cache-Status.
struct Got {
    status: String,
    head: Duration,
    total: Duration,
    body: usize,
    cache: String,
}

async fn exchange(mut s: TcpStream, request: &[u8], sent: Instant) -> std::io::Result<Got> {
    s.write_all(request).await?;
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut head_at = None;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if head_at.is_none() && buf.windows(4).any(|w| w == b"\r\n\r\n") {
            head_at = Some(sent.elapsed());
        }
    }
    let total = sent.elapsed();
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(buf.len());
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or("ERR")
        .to_owned();
    let cache = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.eq_ignore_ascii_case("cache-status") || n.eq_ignore_ascii_case("x-cache"))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default();
    Ok(Got {
        status,
        head: head_at.unwrap_or(total),
        total,
        body: buf.len().saturating_sub(end + 4),
        cache,
    })
}

async fn renders(origin: SocketAddr, path: &str) -> std::io::Result<u64> {
    let mut s = TcpStream::connect(origin).await?;
    let q: String = path
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    let req =
        format!("GET /__stats?path={q} HTTP/1.1\r\nHost: origin\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    let n = out
        .split("\"renders\":")
        .nth(1)
        .map(|r| {
            r.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
        })
        .and_then(|d| d.parse().ok())
        .unwrap_or(0);
    Ok(n)
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

fn summary(mut v: Vec<Duration>) -> String {
    v.sort();
    let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    format!(
        "{{\"min\": {}, \"p50\": {}, \"p90\": {}, \"max\": {}}}",
        ms(v[0]),
        ms(at(0.5)),
        ms(at(0.9)),
        ms(v[v.len() - 1])
    )
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let a = args()?;
    let before = renders(a.origin, &a.path)
        .await
        .map_err(|e| e.to_string())?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: stampede\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        a.path, a.host
    );
    let mut conns = Vec::with_capacity(a.k);
    for i in 0..a.k {
        let s = TcpStream::connect(a.targets[i % a.targets.len()])
            .await
            .map_err(|e| e.to_string())?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        conns.push(s);
    }
    let request: &'static [u8] = Box::leak(request.into_bytes().into_boxed_slice());
    let started = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|s| tokio::spawn(exchange(s, request, Instant::now())))
        .collect();
    let spread = started.elapsed();
    let mut got = Vec::with_capacity(a.k);
    for t in tasks {
        got.push(
            t.await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?,
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = renders(a.origin, &a.path)
        .await
        .map_err(|e| e.to_string())?;
    let count = |f: &dyn Fn(&Got) -> String| {
        let mut m = std::collections::BTreeMap::<String, usize>::new();
        for g in &got {
            *m.entry(f(g)).or_default() += 1;
        }
        m.iter()
            .map(|(k, v)| format!("\"{k}\": {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "{{\"targets\": \"{}\", \"path\": \"{}\", \"k\": {}, \"origin_renders\": {}, \"statuses\": {{{}}}, \"cache_header\": {{{}}}, \"body_bytes_min\": {}, \"send_spread_ms\": {}, \"latency_ms\": {}, \"head_ms\": {}}}",
        a.targets
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
        a.path,
        a.k,
        after.saturating_sub(before),
        count(&|g| g.status.clone()),
        count(&|g| g.cache.clone()),
        got.iter().map(|g| g.body).min().unwrap_or(0),
        ms(spread),
        summary(got.iter().map(|g| g.total).collect()),
        summary(got.iter().map(|g| g.head).collect()),
    );
    Ok(())
}
