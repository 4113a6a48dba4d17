//! The harness itself works: a real `redis-server` starts, dies and comes back on its port.

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
