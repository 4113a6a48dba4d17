//! The `isrgate` binary as operators run it: `check-config` exits like `nginx -t`, `serve`
//! refuses a bad configuration naming every wrong key, and a served gateway drains on SIGTERM.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::process::{KillOnDrop, on_free_ports, until};

const BIN: &str = env!("CARGO_BIN_EXE_isrgate");

fn file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("temp file");
    f.write_all(text.as_bytes()).expect("write");
    f
}

fn check(path: &std::path::Path, env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(path)
        .envs(env.iter().copied())
        .output()
        .expect("run isrgate");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn shipped_config_file_is_valid() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/isrgate.toml");
    let (ok, out, err) = check(&path, &[]);
    assert!(ok, "{err}");
    assert!(out.contains("configuration ok"), "{out}");
}

/// `isrgate debug-token` prints what the gateway accepts in `x-isrgate-debug-token`: derived
/// from the admin token (trimmed, as the gateway reads it), never the token itself.
#[test]
fn debug_token_is_derived_from_the_admin_token() {
    let run = |token: Option<&str>| {
        let mut cmd = Command::new(BIN);
        cmd.arg("debug-token").env_remove("ISRGATE_ADMIN_TOKEN");
        if let Some(t) = token {
            cmd.env("ISRGATE_ADMIN_TOKEN", t);
        }
        let out = cmd.output().expect("run isrgate");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, out) = run(Some("s3cret\n"));
    assert!(ok);
    assert_eq!(out.trim(), isrgate::admin::debug_token("s3cret"));
    assert!(!out.contains("s3cret"));
    assert_eq!(
        run(None),
        (false, String::new()),
        "no admin token, no debug token"
    );
}

#[test]
fn invalid_files_fail_naming_every_key() {
    let f = file(
        "[listen]\naddr = \"nowhere\"\nheader_read_timeout = 5\n[upstream]\nreplicas = [\"https://a:1\"]\nretries = 2\n[healthz]\n",
    );
    let (ok, _, err) = check(f.path(), &[]);
    assert!(!ok);
    for needle in [
        ":2:1: listen.addr:",
        ":3:23: listen.header_read_timeout:",
        "upstream.replicas:",
        "upstream.retries: unknown key",
        "healthz: unknown section (did you mean `health`?)",
        "invalid configuration (5 problems)",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
}

#[test]
fn syntax_error_is_reported_with_position() {
    let f = file("[listen\naddr = 1\n");
    let (ok, _, err) = check(f.path(), &[]);
    assert!(!ok);
    assert!(err.contains(":1:"), "{err}");
}

#[test]
fn environment_overrides_are_checked_too() {
    let f = file("");
    let (ok, _, err) = check(f.path(), &[("ISRGATE__UPSTREAM__CONNECT_TIMEOUT", "fast")]);
    assert!(!ok);
    assert!(
        err.contains("env ISRGATE__UPSTREAM__CONNECT_TIMEOUT: upstream.connect_timeout:"),
        "{err}"
    );
    let (ok, _, err) = check(f.path(), &[("ISRGATE__UPSTREAM__CONNECT_TIMEOUT", "750ms")]);
    assert!(ok, "{err}");
}

#[test]
fn preview_mode_id_comes_from_the_prerender_manifest_and_is_never_printed() {
    const ID: &str = "0123456789abcdef0123456789abcdef";
    let mut manifest = tempfile::Builder::new()
        .suffix(".json")
        .tempfile()
        .expect("temp file");
    let json = format!(r#"{{"version":4,"routes":{{}},"preview":{{"previewModeId":"{ID}"}}}}"#);
    manifest.write_all(json.as_bytes()).expect("write");
    let path = toml::Value::String(manifest.path().display().to_string());
    let f = file(&format!("[upstream]\nprerender_manifest = {path}\n"));
    let (ok, out, err) = check(f.path(), &[]);
    assert!(ok, "{err}");
    assert!(out.contains("configuration ok"), "{out}");
    assert!(!out.contains(ID) && !err.contains(ID), "{out}{err}");

    let var = "ISRGATE__UPSTREAM__PRERENDER_MANIFEST";
    let (ok, _, err) = check(
        f.path(),
        &[(var, "/nonexistent/.next/prerender-manifest.json")],
    );
    assert!(!ok);
    for needle in [
        "env ISRGATE__UPSTREAM__PRERENDER_MANIFEST: upstream.prerender_manifest:",
        "/nonexistent/.next/prerender-manifest.json",
        "point upstream.prerender_manifest at <build>/.next/prerender-manifest.json",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
}

#[test]
fn missing_file_is_an_error() {
    let (ok, _, err) = check(std::path::Path::new("/nonexistent/isrgate.toml"), &[]);
    assert!(!ok);
    assert!(
        err.contains("cannot read config file /nonexistent/isrgate.toml"),
        "{err}"
    );
}

#[test]
fn serve_refuses_a_bad_flag_and_names_it() {
    let out = Command::new(BIN)
        .args([
            "serve",
            "--config",
            "/dev/null",
            "--listen",
            "nope",
            "--upstream",
            "ftp://x",
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("flag --listen: listen.addr:"), "{err}");
    assert!(err.contains("flag --upstream: upstream.replicas:"), "{err}");
}

#[test]
fn serve_drains_and_exits_zero_on_sigterm() {
    let (mut child, _) = on_free_ports(1, |ports| {
        Command::new(BIN)
            .args([
                "serve",
                "--config",
                "/dev/null",
                "--listen",
                &format!("127.0.0.1:{}", ports[0]),
                "--admin-listen",
                "",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn")
    });
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let mut exit = None;
    assert!(
        until(Duration::from_secs(30), || {
            exit = child.try_wait().expect("wait");
            exit.is_some()
        }),
        "no exit after SIGTERM"
    );
    let exit = exit.expect("exited");
    assert!(exit.success(), "{exit:?}");
}

/// A gateway with 48 descriptors, silent connections uncut for a minute, and an upstream that
/// refuses (every request answers 502 at once); started, and a first connection to it.
fn short_of_descriptors() -> (KillOnDrop, u16, std::net::TcpStream) {
    let (child, ports) = on_free_ports(1, |ports| {
        let script = format!(
            "ulimit -n 48 && exec {BIN} serve --config /dev/null --listen 127.0.0.1:{} \
             --admin-listen '' --upstream http://127.0.0.1:9",
            ports[0]
        );
        Command::new("sh")
            .args(["-c", &script])
            .env("ISRGATE__LISTEN__HEADER_READ_TIMEOUT", "60s")
            .env("ISRGATE__LISTEN__WORKERS", "1")
            .env("ISRGATE__HEALTH__INTERVAL", "0s")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn")
    });
    let port = ports[0];
    let first = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    (child, port, first)
}

/// What became of a request sent on `s`: answered, or its connection closed; `None`: it hangs.
fn ask(s: &std::net::TcpStream) -> Option<&'static str> {
    use std::io::{Read, Write};
    let mut s: &std::net::TcpStream = s;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    if s.write_all(b"GET /p HTTP/1.1\r\nHost: a\r\n\r\n").is_err() {
        return Some("closed");
    }
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Ok(0) => Some("closed"),
        Ok(_) if buf.starts_with(b"HTTP/1.1 ") => Some("answered"),
        Ok(_) => Some("garbage"),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Some("closed"),
        Err(_) => None,
    }
}

/// Stops the gateway (SIGTERM) and returns its log.
fn stop(mut child: KillOnDrop) -> String {
    use std::io::Read;
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let mut log = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut log);
    }
    let _ = child.wait();
    log
}

/// Out of descriptors, with every connection busy (silent ones count: they may still send), a
/// new client is never left hanging in the kernel's queue: it is served (idle connections were
/// closed for it) or refused at once, and the warning is not repeated for every attempt.
#[test]
fn out_of_descriptors_new_clients_are_refused_not_left_hanging() {
    let (child, port, first) = short_of_descriptors();
    let mut held = vec![first];
    // Far more connections than descriptors; each is held open and silent.
    for _ in 0..120 {
        held.push(std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect"));
    }
    let outcomes: Vec<_> = held.iter().rev().take(10).map(ask).collect();
    let log = stop(child);
    assert!(
        outcomes.iter().all(Option::is_some),
        "every late client was answered or closed, none hung: {outcomes:?}\n{log}"
    );
    let warnings = log.matches("accept failed").count();
    assert!((0..=3).contains(&warnings), "{warnings} warnings:\n{log}");
}

/// Out of descriptors, idle keep-alive connections (a request answered, nothing since) are
/// closed so that new clients are served instead of refused, as nginx reuses its idle
/// keep-alive connections when it runs short.
#[test]
fn out_of_descriptors_idle_keep_alive_connections_make_room() {
    let (child, port, first) = short_of_descriptors();
    assert_eq!(ask(&first), Some("answered"));
    let mut held = vec![first];
    let mut answered = 0;
    for _ in 0..100 {
        let s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        if ask(&s) == Some("answered") {
            answered += 1;
        }
        held.push(s);
    }
    let log = stop(child);
    assert_eq!(
        answered, 100,
        "every client was served, past the descriptor limit\n{log}"
    );
    assert!(log.contains("idle client connections closed"), "{log}");
}
