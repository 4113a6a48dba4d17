//! The log output: lines are appended to a buffer in memory and written to stderr by a thread
//! of their own, so a request never waits on a write (a slow pipe, a full disk, a log shipper
//! that stalls) and many lines leave in one `write` under load.
//!
//! Receives each formatted line from the subscriber (one `write` per line, from any thread);
//! the thread takes the whole buffer at once (the two buffers are swapped, so appending never
//! waits for the output) and writes it. Appending a line is a short lock and a copy into a
//! buffer that keeps its capacity: no allocation per line once warm. The thread is woken only
//! when it sleeps, not per line.
//!
//! Bounded: past [`MAX_PENDING_BYTES`] waiting, lines are dropped, counted, and the count is
//! logged once the output catches up (a request is never slowed by the log, nginx's choice
//! too with `buffer=`). [`Flusher`] writes what is left when the process ends.
//! tracing-appender's `non_blocking` does the same with a channel and one allocation and one
//! `write` per line; this is that, without those, and without its dependencies.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use tracing_subscriber::fmt::MakeWriter;

/// Bytes of lines waiting for the output beyond which new lines are dropped (counted).
pub const MAX_PENDING_BYTES: usize = 8 << 20;

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
    /// The thread sleeps: the next line wakes it.
    asleep: bool,
    /// The process ends: write what is left and stop.
    closed: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
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
                asleep: false,
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

/// The writer thread: takes every waiting line at once, writes them, sleeps when none wait.
fn run<W: Write>(shared: &Shared, out: &mut W) {
    let mut batch = Vec::with_capacity(64 << 10);
    loop {
        {
            let mut state = shared.lock();
            while state.lines.is_empty() && !state.closed {
                state.asleep = true;
                state = shared
                    .wake
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            state.asleep = false;
            if state.lines.is_empty() {
                return;
            }
            std::mem::swap(&mut state.lines, &mut batch);
        }
        // Nowhere left to report a failed write to: the lines are lost, as with stderr itself.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        let dropped = shared.dropped.swap(0, Relaxed);
        if dropped > 0 {
            tracing::warn!(dropped, "log lines dropped: the log output did not keep up");
        }
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
        if state.asleep {
            state.asleep = false;
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
