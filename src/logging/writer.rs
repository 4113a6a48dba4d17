//! The log output: lines are appended to a buffer in memory and written to stderr by a thread
//! of their own, so a request never waits on a write (a slow pipe, a full disk, a log shipper
//! that stalls), and lines leave in batches: one `write` per [`FLUSH_EVERY`] or per
//! [`HIGH_WATER_BYTES`] of lines, whichever comes first (nginx's `access_log … buffer= flush=`).
//!
//! Receives each formatted line from the subscriber (one `write` per line, from any thread).
//! Appending a line is a short lock and a copy into a buffer that keeps its capacity: no
//! allocation, no system call, no wake-up per line. The thread takes the whole buffer at once
//! (two buffers swapped, so appending never waits for the output) and writes it. Waking the
//! thread for each line, as a channel does, was measured at about 10 µs of CPU per line (a
//! futex wake, two context switches and a `write`): as much as serving the hit itself.
//!
//! A line reaches the output within [`FLUSH_EVERY`]; an idle process has a thread asleep
//! until the next line. Bounded: past [`MAX_PENDING_BYTES`] waiting, lines are dropped,
//! counted, and the count is logged once the output catches up (a request is never slowed by
//! the log). [`Flusher`] writes what is left when the process ends. tracing-appender's
//! `non_blocking` allocates, sends and writes per line; this is the batching it lacks, without
//! its dependencies.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// Bytes of lines waiting for the output beyond which new lines are dropped (counted).
pub const MAX_PENDING_BYTES: usize = 8 << 20;

/// The longest a line waits in memory before it is written.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// Bytes of lines waiting that get them written at once rather than at [`FLUSH_EVERY`].
pub const HIGH_WATER_BYTES: usize = 256 << 10;

/// Hands lines to the writer thread (a [`MakeWriter`] for the subscriber).
#[derive(Debug, Clone)]
pub struct NonBlocking {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    dropped: AtomicU64,
}

#[derive(Debug)]
struct State {
    /// Lines not yet taken by the thread.
    lines: Vec<u8>,
    /// What the thread waits for.
    sleep: Sleep,
    /// The process ends: write what is left and stop.
    closed: bool,
}

/// What the writer thread waits for, so a line wakes it only when it must.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sleep {
    /// It is writing, or about to.
    Awake,
    /// Nothing was waiting: the next line wakes it.
    Idle,
    /// Lines wait: [`FLUSH_EVERY`] passing, or [`HIGH_WATER_BYTES`] of them, wakes it.
    Batching,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        crate::sync::lock(&self.state)
    }
}

/// Writes what is left and stops the writer thread when dropped: hold it until exit.
#[derive(Debug)]
#[must_use = "dropping the flusher stops the log output"]
pub struct Flusher {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl NonBlocking {
    /// Lines to `out`, written by a thread of their own (named `isrgate-log`); an error when
    /// the system refuses the thread.
    pub fn new<W: Write + Send + 'static>(mut out: W) -> io::Result<(NonBlocking, Flusher)> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                lines: Vec::with_capacity(64 << 10),
                sleep: Sleep::Awake,
                closed: false,
            }),
            wake: Condvar::new(),
            dropped: AtomicU64::new(0),
        });
        let thread = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("isrgate-log".into())
                .spawn(move || run(&shared, &mut out))?
        };
        let flusher = Flusher {
            shared: Arc::clone(&shared),
            thread: Some(thread),
        };
        Ok((NonBlocking { shared }, flusher))
    }

    /// Lines dropped so far because the output did not keep up (and not yet reported).
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Relaxed)
    }
}

/// The writer thread: waits for a line, lets lines gather for [`FLUSH_EVERY`] (or up to
/// [`HIGH_WATER_BYTES`]), takes them all at once and writes them; until closed and empty.
fn run<W: Write>(shared: &Shared, out: &mut W) {
    let mut batch = Vec::with_capacity(64 << 10);
    let mut state = shared.lock();
    let mut due = false;
    loop {
        if state.lines.is_empty() {
            if state.closed {
                return;
            }
            state.sleep = Sleep::Idle;
            state = shared
                .wake
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
            continue;
        }
        if !due && !state.closed && state.lines.len() < HIGH_WATER_BYTES {
            state.sleep = Sleep::Batching;
            state = shared
                .wake
                .wait_timeout(state, FLUSH_EVERY)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            due = true;
            continue;
        }
        state.sleep = Sleep::Awake;
        due = false;
        std::mem::swap(&mut state.lines, &mut batch);
        drop(state);
        // Nowhere left to report a failed write to: the lines are lost, as with stderr itself.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        let dropped = shared.dropped.swap(0, Relaxed);
        if dropped > 0 {
            tracing::warn!(dropped, "log lines dropped: the log output did not keep up");
        }
        state = shared.lock();
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One line's writer.
#[derive(Debug)]
pub struct Line<'a>(&'a Shared);

impl Write for Line<'_> {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let mut state = self.0.lock();
        if state.lines.len() + line.len() > MAX_PENDING_BYTES && !state.lines.is_empty() {
            drop(state);
            self.0.dropped.fetch_add(1, Relaxed);
            return Ok(line.len());
        }
        state.lines.extend_from_slice(line);
        let wake = match state.sleep {
            Sleep::Awake => false,
            Sleep::Idle => true,
            Sleep::Batching => state.lines.len() >= HIGH_WATER_BYTES,
        };
        if wake {
            state.sleep = Sleep::Awake;
            drop(state);
            self.0.wake.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for NonBlocking {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line(&self.shared)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An output the test reads.
    #[derive(Clone, Default)]
    struct Out(Arc<Mutex<Vec<u8>>>);

    impl Write for Out {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("test").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_line_reaches_the_output_within_the_flush_interval_without_closing() {
        let out = Out::default();
        let (writer, _flusher) = NonBlocking::new(out.clone()).expect("test");
        for round in 0..3 {
            let line = format!("round {round}\n");
            writer
                .make_writer()
                .write_all(line.as_bytes())
                .expect("test");
            let deadline = std::time::Instant::now() + 50 * FLUSH_EVERY;
            while !String::from_utf8_lossy(&out.0.lock().expect("test")).contains(&line) {
                assert!(std::time::Instant::now() < deadline, "{line} not written");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    #[test]
    fn every_line_reaches_the_output_in_order_by_the_time_the_flusher_is_dropped() {
        let out = Out::default();
        let (writer, flusher) = NonBlocking::new(out.clone()).expect("test");
        let expected: String = (0..10_000).map(|i| format!("line {i}\n")).collect();
        for line in expected.lines() {
            writer
                .make_writer()
                .write_all(format!("{line}\n").as_bytes())
                .expect("test");
        }
        drop(flusher);
        assert_eq!(
            String::from_utf8(out.0.lock().expect("test").clone()).expect("test"),
            expected
        );
        assert_eq!(writer.dropped(), 0);
    }
}
