//! Reload (`crate::reload`): SIGHUP, `isrgate reload` and `POST /api/reload` apply what can
//! change live without dropping a request, keep and report what needs a restart, and refuse an
//! invalid file with every problem while the running configuration stays.

use std::io::Write as _;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use bytes::Bytes;
use isrgate::Options;

use crate::support::origin::{FakeNext, Route};
use crate::support::process::on_free_ports;
use crate::support::{Client, Gateway, config};

const BIN: &str = env!("CARGO_BIN_EXE_isrgate");
const TOKEN: &str = "reload-test-token";

/// Sends signal `name` to `child`.
fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// The process's log, a line at a time.
struct Log(std::sync::mpsc::Receiver<String>);

impl Log {
    fn of(child: &mut Child) -> Log {
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        Log(rx)
    }

    /// The next line with `needle` (lines before it are skipped).
    fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.0.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!("no log line with {needle:?}"),
            }
        }
    }
}

fn gateway_file(port: u16, admin: u16, replica: &str, extra: &str) -> String {
    format!(
        "[listen]\naddr = \"127.0.0.1:{port}\"\naccept_grace = \"0s\"\n\
         [admin]\nlisten = \"127.0.0.1:{admin}\"\n\
         [upstream]\nreplicas = [\"{replica}\"]\n{extra}"
    )
}

/// Requests `/p` (never cached) from `clients` loops until `stop`, counting answers of 200 in
/// `ok`: (answered 200, anything else).
fn load(
    url: String,
    clients: usize,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<(usize, Vec<String>)> {
    tokio::spawn(async move {
        let mut loops = tokio::task::JoinSet::new();
        for _ in 0..clients {
            let (url, stop, ok) = (url.clone(), Arc::clone(&stop), Arc::clone(&ok));
            loops.spawn(async move {
                let client = Client::default();
                let mut failed = Vec::new();
                while !stop.load(Relaxed) {
                    match client.try_send("GET", &url, &[], Bytes::new()).await {
                        Ok(got) if got.status == 200 => _ = ok.fetch_add(1, Relaxed),
                        Ok(got) => failed.push(format!("status {}", got.status)),
                        Err(e) => failed.push(e),
                    }
                }
                failed
            });
        }
        let mut failed = Vec::new();
        while let Some(f) = loops.join_next().await {
            failed.extend(f.expect("load loop"));
        }
        (ok.load(Relaxed), failed)
    })
}

/// The operator's path: SIGHUP with an invalid file changes nothing (the log names the
/// problem), SIGHUP with a valid one moves the traffic to the new replica and reports the key
/// that needs a restart, `isrgate reload` does the same through the admin API; requests all
/// the while (a hundred more after the last reload), none failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_and_isrgate_reload_apply_live_settings_without_dropping_a_request() {
    let a = FakeNext::start(|o| {
        o.route("/p", Route::html("A").header("cache-control", "no-store"));
    })
    .await;
    let b = FakeNext::start(|o| {
        o.route("/p", Route::html("B").header("cache-control", "no-store"));
    })
    .await;
    let cfg = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("temp");
    let (mut gw, ports) = on_free_ports(2, |ports| {
        std::fs::write(cfg.path(), gateway_file(ports[0], ports[1], &a.url(), "")).expect("write");
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(cfg.path())
            .env("ISRGATE_ADMIN_TOKEN", TOKEN)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn")
    });
    let (port, admin) = (ports[0], ports[1]);
    let log = Log::of(&mut gw);
    log.wait_for("isrgate serving");
    let url = format!("http://127.0.0.1:{port}/p");
    let (stop, answered) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let traffic = load(url.clone(), 4, Arc::clone(&stop), Arc::clone(&answered));
    let client = Client::default();

    // Invalid: a bad value beside a new replica; nothing of it is applied.
    let bad = gateway_file(port, admin, &b.url(), "[health]\ninterval = \"soon\"\n");
    std::fs::write(cfg.path(), bad).expect("rewrite");
    signal(&gw, "HUP");
    let line = log.wait_for("configuration not reloaded");
    assert!(line.contains("health.interval"), "{line}");
    assert_eq!(
        &client.get(&url, &[]).await.body[..],
        b"A",
        "the running config stays"
    );

    // Valid: the new replica is used; a listener setting is reported, not applied.
    let good = gateway_file(port, admin, &b.url(), "").replace(
        "accept_grace = \"0s\"",
        "accept_grace = \"0s\"\nworkers = 1",
    );
    std::fs::write(cfg.path(), good).expect("rewrite");
    signal(&gw, "HUP");
    let line = log.wait_for("configuration reloaded");
    assert!(line.contains("upstream.replicas"), "{line}");
    assert!(line.contains("listen.workers"), "{line}");
    crate::eventually!(
        20,
        &client.get(&url, &[]).await.body[..] == b"B",
        "traffic moved to B"
    );
    let a_before = a.count("/p");

    // The same through the admin API, from the command line: nothing new to apply, the
    // restart still pending; then an invalid file: exit 1 with the problem, nothing changed.
    let admin_url = format!("http://127.0.0.1:{admin}");
    let cli = |file: &std::path::Path| {
        Command::new(BIN)
            .args(["reload", "--gateway", &admin_url, "--config"])
            .arg(file)
            .env("ISRGATE_ADMIN_TOKEN", TOKEN)
            .output()
            .expect("isrgate reload")
    };
    let out = cli(cfg.path());
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("applied: nothing"), "{said}");
    assert!(
        said.contains("needs a restart (kept as running): listen.workers"),
        "{said}"
    );
    std::fs::write(cfg.path(), "[cache]\nmax_ttl = \"forever\"\n").expect("rewrite");
    let out = cli(std::path::Path::new("/dev/null"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("cache.max_ttl"), "{err}");
    assert_eq!(&client.get(&url, &[]).await.body[..], b"B");

    // Traffic through all of it and a hundred answers past it, none failed.
    let past = answered.load(Relaxed) + 100;
    crate::eventually!(
        30,
        answered.load(Relaxed) >= past,
        "traffic goes on after the reloads: {} answered",
        answered.load(Relaxed)
    );
    stop.store(true, Relaxed);
    let (ok, failed) = traffic.await.expect("load");
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 100, "{ok} answered");
    assert_eq!(
        a.count("/p"),
        a_before,
        "nothing sent to the removed replica"
    );
    signal(&gw, "TERM");
    log.wait_for("stopped");
}

/// A reload of the cache policy: fills after it use the new `[[routes]]` lifetime (entries
/// filled before keep theirs); an invalid file is refused with every problem, the routes as
/// they were. Freshness is driven by the gateway's clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_the_route_policy_of_the_next_fill() {
    let page = |body: &str| Route::html(body).header("cache-control", "s-maxage=3600");
    let origin = FakeNext::start(|o| {
        o.route("/blog/a", page("a"));
        o.route("/blog/b", page("b"));
    })
    .await;
    let mut file = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("temp");
    let text = |routes: &str| {
        format!(
            "[upstream]\nreplicas = [\"{}\"]\n[listen]\naccept_grace = \"0s\"\n\
             [cache]\nl1_governor = false\n{routes}",
            origin.url()
        )
    };
    file.write_all(text("").as_bytes()).expect("write");
    let path = file.path().to_path_buf();
    let loader: isrgate::reload::Loader = Arc::new(move || {
        isrgate::config::load(Some(&path), &isrgate::config::MapEnv::default(), &[])
            .map(|(c, _)| (c, "test file".to_owned()))
    });
    let options = Options {
        reload: Some(loader),
        ..Options::default()
    };
    let gw = Gateway::start_with(config(&[origin.url()], "", ""), options).await;
    let c = Client::default();
    assert_eq!(
        c.get(&gw.url("/blog/a"), &[]).await.header("x-cache"),
        "MISS"
    );

    let routes = "[[routes]]\npath = \"/blog/*\"\nttl = \"60s\"\n";
    std::fs::write(file.path(), text(routes)).expect("rewrite");
    let report = gw.state.reloads.reload().await.expect("reloaded");
    assert_eq!(report.applied, ["routes"], "{report:?}");
    // The listeners of the file (its defaults) differ from the test's: kept, reported.
    assert!(
        report
            .restart
            .iter()
            .all(|k| k.starts_with("listen.") || k.starts_with("admin.")),
        "{report:?}"
    );
    assert_eq!(
        c.get(&gw.url("/blog/b"), &[]).await.header("x-cache"),
        "MISS"
    );
    gw.state
        .cache
        .as_ref()
        .expect("cache")
        .clock
        .advance(Duration::from_secs(61));
    assert_ne!(
        c.get(&gw.url("/blog/b"), &[]).await.header("x-cache"),
        "HIT",
        "past the route's 60 s"
    );
    assert_eq!(
        c.get(&gw.url("/blog/a"), &[]).await.header("x-cache"),
        "HIT",
        "filled before: 3600 s"
    );

    // Invalid: every problem, the routes as they were.
    std::fs::write(
        file.path(),
        "[cache]\nmax_ttl = \"x\"\n[upstream]\nreplicas = [\"nope\"]\n",
    )
    .expect("rewrite");
    let refused = gw.state.reloads.reload().await.expect_err("invalid");
    let said = refused.to_string();
    assert!(
        said.contains("cache.max_ttl") && said.contains("upstream.replicas"),
        "{said}"
    );
    assert_eq!(
        gw.state
            .config()
            .cache
            .as_ref()
            .expect("cache")
            .routes
            .len(),
        1
    );
    assert_eq!(gw.state.upstream.replicas().authorities().len(), 1);
}
