//! Identity bodies sealed in memory files, so the hit lane can `sendfile(2)` them.
//!
//! Once a hit's head is prepared, its body is most of what it costs: `writev` copies the body
//! from the entry into the socket. For a 50 KB page that copy is a third of the lane's CPU per
//! hit, and more once the hot entries outgrow the CPU's caches (a hundred pages are 5 MB, past
//! a core's L2), where a server answering one fixed buffer never goes. A body in a memory file
//! (`memfd_create`) is handed to the kernel instead: `sendfile` makes the socket reference the
//! file's pages, as nginx sends static files, and only the receiver copies.
//!
//! **Sealing** is what makes that sound. The file is written once and then sealed against
//! writes, shrinking and growing (`F_SEAL_*`), so the pages a socket still references can never
//! change under it; they outlive the file (the kernel holds them) when the entry is evicted in
//! the middle of a send. The file *is* the body: no heap copy is kept (the L1 and the strict
//! memo charge an entry's identity body once, and that stays true). An answer that needs the
//! bytes themselves reads them back ([`Held::bytes`], one copy, as the heap body's own write
//! would make): what the lane does not answer (a stale hit while its refresh runs, HTTP/2, a
//! 304 needs none), and a fill's own identity client.
//!
//! What is sealed: identity bodies of at least [`MIN_BYTES`] (below that the copy costs less
//! than the extra system call), on gateways whose hit lane runs: when the lane first inflates
//! one, and when a fill stores one the L1 keeps. Each sealed body holds a file descriptor, so
//! at most a quarter of the process's descriptor limit goes to them: past it, and wherever the
//! kernel refuses, a body stays on the heap and is written with `writev`. Sealed bodies never
//! starve `accept`. Linux only; elsewhere nothing is sealed.
//!
//! Memory files are shared memory: the container's memory limit counts them, the process's
//! RSS does not (they are not mapped). [`Sealed::live_bytes`] counts them for the memory
//! governor (`cache::governor`).

use bytes::Bytes;

/// The smallest identity body worth sealing, bytes.
pub const MIN_BYTES: usize = 16 * 1024;

/// A body as an entry holds it: on the heap, or sealed in a memory file.
#[derive(Debug, Clone)]
pub enum Held {
    /// In memory.
    Heap(Bytes),
    /// In a sealed memory file.
    Sealed(Sealed),
}

impl Held {
    /// Holds `body`: sealed when `seal` asks for it and the body is worth it (and the
    /// descriptor budget and the kernel allow), on the heap otherwise.
    pub fn new(body: Bytes, seal: bool) -> Held {
        if seal && body.len() >= MIN_BYTES {
            if let Some(s) = Sealed::new(&body) {
                return Held::Sealed(s);
            }
        }
        Held::Heap(body)
    }

    /// Length, bytes.
    pub fn len(&self) -> usize {
        match self {
            Held::Heap(b) => b.len(),
            Held::Sealed(s) => s.len(),
        }
    }

    /// Whether the body is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes: the heap's, or read back from the file.
    pub fn bytes(&self) -> std::io::Result<Bytes> {
        match self {
            Held::Heap(b) => Ok(b.clone()),
            Held::Sealed(s) => s.read(),
        }
    }
}

pub use imp::Sealed;

#[cfg(target_os = "linux")]
mod imp {
    use std::fs::File;
    use std::io::{self, Write};
    use std::os::fd::{AsFd, BorrowedFd};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, OnceLock};

    use bytes::Bytes;
    use rustix::buffer::spare_capacity;
    use rustix::fs::{MemfdFlags, SealFlags};
    use rustix::process::{Resource, getrlimit};

    /// Sealed bodies alive in the process.
    static LIVE: AtomicUsize = AtomicUsize::new(0);

    /// Bytes of memory those bodies' files hold (whole pages): what `cache::governor` adds to
    /// the RSS, which does not show them.
    static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);

    /// The memory a file of `len` bytes holds: whole pages.
    fn pages(len: usize) -> usize {
        let page = rustix::param::page_size();
        len.div_ceil(page) * page
    }

    /// How many may be alive at once: a quarter of the descriptor limit, read on first use
    /// (after `main` raised it).
    fn budget() -> usize {
        static BUDGET: OnceLock<usize> = OnceLock::new();
        *BUDGET.get_or_init(|| {
            getrlimit(Resource::Nofile)
                .current
                .map_or(usize::MAX, |n| usize::try_from(n / 4).unwrap_or(usize::MAX))
        })
    }

    /// A body in a sealed memory file; `Clone` shares it.
    #[derive(Debug, Clone)]
    pub struct Sealed(Arc<Inner>);

    #[derive(Debug)]
    struct Inner {
        file: File,
        len: usize,
    }

    impl Drop for Inner {
        fn drop(&mut self) {
            LIVE.fetch_sub(1, Ordering::Relaxed);
            LIVE_BYTES.fetch_sub(pages(self.len), Ordering::Relaxed);
        }
    }

    impl Sealed {
        /// `body` in a new sealed memory file; `None` when the budget is spent or the kernel
        /// refuses (the caller keeps the body on the heap).
        pub fn new(body: &[u8]) -> Option<Sealed> {
            if LIVE.fetch_add(1, Ordering::Relaxed) >= budget() {
                LIVE.fetch_sub(1, Ordering::Relaxed);
                return None;
            }
            match make(body) {
                Ok(file) => {
                    LIVE_BYTES.fetch_add(pages(body.len()), Ordering::Relaxed);
                    Some(Sealed(Arc::new(Inner {
                        file,
                        len: body.len(),
                    })))
                }
                Err(e) => {
                    LIVE.fetch_sub(1, Ordering::Relaxed);
                    tracing::debug!(error = %e, "body not sealed; kept on the heap");
                    None
                }
            }
        }

        /// Length, bytes.
        pub fn len(&self) -> usize {
            self.0.len
        }

        /// Whether the body is empty.
        pub fn is_empty(&self) -> bool {
            self.0.len == 0
        }

        /// The file, for `sendfile`.
        pub fn fd(&self) -> BorrowedFd<'_> {
            self.0.file.as_fd()
        }

        /// The bytes, read back (into memory not zeroed first).
        pub fn read(&self) -> io::Result<Bytes> {
            let len = self.0.len;
            let mut buf = Vec::with_capacity(len);
            while buf.len() < len {
                let at = buf.len() as u64;
                let n = rustix::io::pread(&self.0.file, spare_capacity(&mut buf), at)?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
            Ok(Bytes::from(buf))
        }

        /// Sealed bodies alive in the process.
        pub fn live() -> usize {
            LIVE.load(Ordering::Relaxed)
        }

        /// Memory the sealed bodies alive in the process hold, bytes (whole pages).
        pub fn live_bytes() -> usize {
            LIVE_BYTES.load(Ordering::Relaxed)
        }
    }

    fn make(body: &[u8]) -> io::Result<File> {
        // Not executable, and sealed so (kernels from 6.3 warn about a memory file that does
        // not say, and refuse one with `vm.memfd_noexec = 2`); older kernels refuse the flag.
        let flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
        let fd = match rustix::fs::memfd_create("isrgate-body", flags | MemfdFlags::NOEXEC_SEAL) {
            Err(rustix::io::Errno::INVAL) => rustix::fs::memfd_create("isrgate-body", flags)?,
            r => r?,
        };
        let mut file = File::from(fd);
        file.write_all(body)?;
        rustix::fs::fcntl_add_seals(
            &file,
            SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL,
        )?;
        Ok(file)
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use std::convert::Infallible;
    use std::io;

    use bytes::Bytes;

    /// Never made off Linux.
    #[derive(Debug, Clone)]
    pub struct Sealed(Infallible);

    impl Sealed {
        /// Always `None` off Linux.
        pub fn new(_body: &[u8]) -> Option<Sealed> {
            None
        }

        /// Length, bytes.
        pub fn len(&self) -> usize {
            match self.0 {}
        }

        /// Whether the body is empty.
        pub fn is_empty(&self) -> bool {
            match self.0 {}
        }

        /// The bytes, read back.
        pub fn read(&self) -> io::Result<Bytes> {
            match self.0 {}
        }

        /// Sealed bodies alive in the process.
        pub fn live() -> usize {
            0
        }

        /// Memory the sealed bodies alive in the process hold: none off Linux.
        pub fn live_bytes() -> usize {
            0
        }

        /// A sealed body is never at hand here.
        pub fn never(&self) -> ! {
            match self.0 {}
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::io::Write;
    use std::os::fd::AsRawFd;

    use super::*;

    fn page(n: usize) -> Bytes {
        (0..n).map(|i| (i % 251) as u8).collect::<Vec<_>>().into()
    }

    #[test]
    fn large_bodies_are_sealed_and_read_back_byte_for_byte() {
        let body = page(MIN_BYTES + 17);
        let held = Held::new(body.clone(), true);
        let Held::Sealed(s) = &held else {
            panic!("not sealed: {held:?}")
        };
        assert_eq!(s.len(), body.len());
        assert_eq!(held.bytes().expect("read"), body);
        assert!(Sealed::live() >= 1);
        assert!(Sealed::live_bytes() >= body.len(), "counted in whole pages");
    }

    #[test]
    fn small_bodies_and_unsealed_gateways_stay_on_the_heap() {
        assert!(matches!(
            Held::new(page(MIN_BYTES - 1), true),
            Held::Heap(b) if b.len() == MIN_BYTES - 1
        ));
        assert!(matches!(
            Held::new(page(MIN_BYTES * 4), false),
            Held::Heap(_)
        ));
    }

    #[test]
    fn a_sealed_body_cannot_be_changed() {
        let held = Held::new(page(MIN_BYTES), true);
        let Held::Sealed(s) = &held else {
            panic!("not sealed")
        };
        // Another descriptor of the same file, opened for writing, as anything else in the
        // process could: the seals refuse every change of contents or size.
        let dup = rustix::io::fcntl_dupfd_cloexec(s.fd(), 0).expect("dup");
        let path = format!("/proc/self/fd/{}", dup.as_raw_fd());
        let mut w = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open for writing");
        assert!(w.write_all(b"x").is_err(), "write after seal");
        assert!(rustix::fs::ftruncate(&dup, 0).is_err(), "shrink after seal");
        assert!(
            rustix::fs::ftruncate(&dup, (MIN_BYTES * 2) as u64).is_err(),
            "grow after seal"
        );
        assert_eq!(held.bytes().expect("read"), page(MIN_BYTES));
    }
}
