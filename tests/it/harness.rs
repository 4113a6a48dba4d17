//! The harness itself works: a real `redis-server` starts, dies and comes back on its port; a
//! server whose port was taken starts again on another.

use crate::support::redis::RedisProcess;

#[test]
fn redis_process_starts_kills_and_restarts_on_the_same_port() {
    let mut r = RedisProcess::start();
    let port = r.port;
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    r.kill();
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "killed"
    );
    r.restart();
    assert_eq!(r.port, port);
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        "back: {}",
        r.log()
    );
}

/// A server that loses its port to another process before binding it is started again on
/// another port, and only a port the child itself listens on counts.
#[test]
fn a_server_whose_port_was_taken_is_started_again_on_another() {
    use crate::support::process::{listens, on_free_ports};
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_port = taken.local_addr().expect("addr").port();
    let mut starts = 0;
    let (child, ports) = on_free_ports(1, |ports| {
        starts += 1;
        // The first start finds its port taken, as when another process bound it first.
        let port = if starts == 1 { taken_port } else { ports[0] };
        std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server")
    });
    assert_eq!(starts, 2);
    assert!(listens(child.id(), ports[0]));
    assert!(
        listens(std::process::id(), taken_port),
        "the test holds its own"
    );
}
