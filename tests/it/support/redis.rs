//! `RedisProcess`: a real `redis-server` on a free loopback port, owned by the test: it can be
//! killed and restarted (outage tests) and is killed on drop. Its log is kept so a failing test
//! can show it. A port another process takes before the server binds it is no failure: the
//! server starts again on another one.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::free_port;
use super::process::{PORT_TRIES, listens, until};

/// A `redis-server` child process.
pub struct RedisProcess {
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    tls: Option<Tls>,
}

/// Certificates of a TLS server (made with the `openssl` command line).
#[derive(Clone)]
pub struct Tls {
    /// The CA that signed the server's and the client's certificates.
    pub ca: PathBuf,
    /// A client certificate and its key, signed by the CA.
    pub client_cert: PathBuf,
    /// The client's key.
    pub client_key: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    /// Whether the server demands a client certificate.
    pub auth_clients: bool,
}

impl RedisProcess {
    /// Starts one on a free port and waits until it answers PING.
    pub fn start() -> RedisProcess {
        RedisProcess::launch(false, false)
    }

    /// Starts one that speaks TLS only, with a fresh CA; `auth_clients` makes it demand a
    /// client certificate (Redis's default).
    pub fn start_tls(auth_clients: bool) -> RedisProcess {
        RedisProcess::launch(true, auth_clients)
    }

    fn launch(tls: bool, auth_clients: bool) -> RedisProcess {
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("isrgate-redis-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("redis dir");
        let tls = tls.then(|| Tls::make(&dir, auth_clients));
        let mut r = RedisProcess {
            port: 0,
            dir,
            child: None,
            tls,
        };
        let mut lost = Vec::new();
        for _ in 0..PORT_TRIES {
            r.port = free_port();
            match r.spawn() {
                Ok(()) => return r,
                Err(why) => lost.push(why),
            }
        }
        panic!(
            "redis-server never kept a port ({PORT_TRIES} tries):\n{}",
            lost.join("\n")
        );
    }

    /// The TLS certificates, for a server started with [`RedisProcess::start_tls`].
    pub fn tls(&self) -> &Tls {
        self.tls.as_ref().expect("a TLS server")
    }

    /// `rediss://localhost:PORT` (the server certificate names localhost).
    pub fn tls_url(&self) -> String {
        format!("rediss://localhost:{}", self.port)
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server on `self.port` and waits until it answers; `Err` (with its log) when
    /// it exited first (another process holds the port).
    fn spawn(&mut self) -> Result<(), String> {
        // A restart must not read the previous run's "ready" line.
        let _ = std::fs::remove_file(self.dir.join("redis.log"));
        let port = self.port.to_string();
        let mut args: Vec<String> = match &self.tls {
            None => vec!["--port".into(), port],
            Some(t) => {
                let path = |p: &PathBuf| p.to_str().expect("utf-8 path").to_owned();
                vec![
                    "--port".into(),
                    "0".into(),
                    "--tls-port".into(),
                    port,
                    "--tls-cert-file".into(),
                    path(&t.server_cert),
                    "--tls-key-file".into(),
                    path(&t.server_key),
                    "--tls-ca-cert-file".into(),
                    path(&t.ca),
                    "--tls-auth-clients".into(),
                    (if t.auth_clients { "yes" } else { "no" }).into(),
                ]
            }
        };
        args.extend(["--bind", "127.0.0.1"].map(String::from));
        let child = Command::new("redis-server")
            .args(args)
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir.to_str().expect("utf-8 dir"),
                "--logfile",
                "redis.log",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (.ci/run installs it)");
        self.child = Some(child);
        let mut exited = None;
        let this = &mut *self;
        let up = until(Duration::from_secs(30), || {
            exited = this
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            exited.is_some() || this.ready()
        });
        if let Some(status) = exited {
            self.child = None;
            return Err(format!(
                "port {}: {status}; log:\n{}",
                self.port,
                self.log()
            ));
        }
        assert!(up, "redis-server did not start; log:\n{}", self.log());
        Ok(())
    }

    /// Whether this server (not another process on its port) listens and answers.
    fn ready(&self) -> bool {
        use std::io::{Read, Write};
        let Some(pid) = self.child.as_ref().map(Child::id) else {
            return false;
        };
        if !listens(pid, self.port) {
            return false;
        }
        if self.tls.is_some() {
            return self.log().contains("Ready to accept connections");
        }
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    /// A connected fred client of this (plain) server, for looking at what is stored.
    pub async fn client(&self) -> fred::prelude::Client {
        use fred::prelude::*;
        let c = Builder::from_config(Config::from_url(&self.url()).expect("url"))
            .build()
            .expect("client");
        c.init().await.expect("connect");
        c
    }

    /// Kills the server (an outage).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open and nothing answers, as with a
    /// network black hole.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        if let Err(why) = self.spawn() {
            panic!("redis-server could not start again on its port: {why}");
        }
    }

    /// Runs `redis-cli` against this server (plain TCP servers only) and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli comes with redis-server");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// How many times `command` (lowercase, e.g. `hget`) ran since the start or the last
    /// `CONFIG RESETSTAT`, from `INFO commandstats`.
    pub fn calls(&self, command: &str) -> u64 {
        let stats = self.cli(&["INFO", "commandstats"]);
        let prefix = format!("cmdstat_{command}:calls=");
        stats
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        self.resume();
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Tls {
    /// A CA, a server certificate for localhost and a client certificate, in `dir`.
    fn make(dir: &std::path::Path, auth_clients: bool) -> Tls {
        let p = |name: &str| dir.join(name);
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("the openssl command line must be installed (.ci/run installs it)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=isrgate test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ]);
        std::fs::write(
            p("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .expect("ext");
        // Extensions make them X.509 v3: webpki refuses v1 certificates.
        std::fs::write(p("client.ext"), "extendedKeyUsage=clientAuth\n").expect("ext");
        for (name, ext) in [("server", "server.ext"), ("client", "client.ext")] {
            let (key, csr, pem) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
            );
            run(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                &key,
                "-out",
                &csr,
            ]);
            run(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &pem,
                "-extfile",
                ext,
            ]);
        }
        Tls {
            ca: p("ca.pem"),
            client_cert: p("client.pem"),
            client_key: p("client.key"),
            server_cert: p("server.pem"),
            server_key: p("server.key"),
            auth_clients,
        }
    }
}
