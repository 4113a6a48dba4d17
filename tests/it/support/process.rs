//! Child processes a test starts: [`KillOnDrop`] kills and reaps them however the test ends,
//! and [`on_free_ports`] starts a server process on loopback ports that are free now, again on
//! other ports when another process took one first (a port is only known free until someone
//! binds it, and the child binds it later).

use std::ops::{Deref, DerefMut};
use std::process::Child;
use std::time::{Duration, Instant};

/// How many sets of ports a start tries before giving up.
pub const PORT_TRIES: usize = 5;

/// A child process, killed and reaped when dropped: a failing assertion leaves nothing running.
pub struct KillOnDrop(Child);

impl KillOnDrop {
    /// Owns `child` from now on.
    pub fn new(child: Child) -> KillOnDrop {
        KillOnDrop(child)
    }
}

impl Deref for KillOnDrop {
    type Target = Child;

    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `cond` every 20 ms until it is true (`true`) or `within` passes (`false`): the
/// blocking twin of [`crate::eventually!`], for tests without a runtime.
pub fn until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `spawn(ports)` with `n` loopback ports free now and waits (up to 30 s) until the
/// process listens on all of them. A process that exits first lost a port to another process
/// between the check and its bind: it is started again on new ports, up to [`PORT_TRIES`] times.
/// Blocks the thread while the process starts.
pub fn on_free_ports(n: usize, mut spawn: impl FnMut(&[u16]) -> Child) -> (KillOnDrop, Vec<u16>) {
    let mut exits = Vec::new();
    for _ in 0..PORT_TRIES {
        let ports: Vec<u16> = (0..n).map(|_| super::free_port()).collect();
        let mut child = KillOnDrop::new(spawn(&ports));
        let mut exited = None;
        let up = until(Duration::from_secs(30), || {
            exited = child.try_wait().ok().flatten();
            exited.is_some() || ports.iter().all(|p| listens(child.id(), *p))
        });
        match exited {
            None if up => return (child, ports),
            None => panic!("the process did not listen on {ports:?} within 30 s"),
            Some(status) => exits.push(format!("{ports:?}: {status}")),
        }
    }
    panic!("the process exited before listening, {PORT_TRIES} times: {exits:?}");
}

/// Whether process `pid` has a socket listening on 127.0.0.1:`port` (Linux `/proc`: the
/// listening socket's inode among the process's descriptors). Connecting is no proof: another
/// process may hold the port.
pub fn listens(pid: u32, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    // `local_address rem_address st … inode`: 0100007F is 127.0.0.1, 0A is LISTEN.
    let local = format!("0100007F:{port:04X}");
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(1) == Some(&local.as_str()) && f.get(3) == Some(&"0A"))
                .then(|| f.get(9).map(|i| format!("socket:[{i}]")))
                .flatten()
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(Result::ok)
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .any(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
}
