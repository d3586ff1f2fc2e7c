#![deny(unsafe_code)]

fn main() -> std::process::ExitCode {
    tune_malloc();
    return_freed_memory();
    raise_open_file_limit();
    shoal::cli::main()
}

/// glibc's malloc, tuned for a long-running node:
///
/// - It gives a thread that finds the arenas in use one of its own, up to 8 per core,
///   and memory freed in one arena is neither used by the others nor, mostly, returned:
///   a node's blocking-pool threads each kept the high-water mark of whatever ran on them
///   (a receiver of a 100,000-name directory held 851 MiB in 15 arenas with about 55 MiB
///   live; docs/BENCHMARKS.md, "Memory per node"). Two arenas keep its two busy threads
///   from contending.
/// - It serves a block of 128 KiB or more by `mmap`, but raises that threshold to the
///   size of each such block freed: RocksDB's memtable blocks (256 KiB,
///   `store::MEMTABLE_BLOCK_BYTES`) then came from the arenas, where the holes they
///   leave between live blocks stay resident, so a node's peak grew with the number of
///   memtables it had filled (a receiver of `million` at 0.3: 65-70 MiB, against 57-62
///   MiB with the threshold fixed; docs/BENCHMARKS.md, "glibc's mmap threshold fixed at
///   256 KiB"). Fixed at their size, it maps those blocks and leaves received chunks
///   (smaller, but for the largest) to the arenas; the run buffers a node sends chunks
///   from, just larger, are kept and reused (`sync::server::chunks`).
///
/// Set here rather than in the image's environment so that every way of running `shoal`
/// gets it; an operator's own `MALLOC_ARENA_MAX`, `MALLOC_MMAP_THRESHOLD_` or
/// `GLIBC_TUNABLES` wins.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn tune_malloc() {
    if std::env::var_os("GLIBC_TUNABLES").is_some() {
        return;
    }
    // SAFETY: `mallopt` only sets a parameter of the allocator (thread-safe in glibc),
    // and nothing has been allocated by another thread yet: none exists.
    unsafe {
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
            let threshold = i32::try_from(shoal::store::MEMTABLE_BLOCK_BYTES).unwrap_or(i32::MAX);
            libc::mallopt(libc::M_MMAP_THRESHOLD, threshold);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}

/// How often freed heap memory is handed back to the kernel.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// glibc returns freed memory to the kernel only from the top of an arena: the free
/// chunks between live ones stay resident. A node allocates in waves (a batch of 512
/// files, a RocksDB flush or compaction), and each wave frees its memory around the few
/// things it keeps (a block in the cache, a memtable entry): after a pull of `million`,
/// about 10 MB of a receiving node's arenas was free but resident, and its peak was 66-67
/// MiB (docs/BENCHMARKS.md, "Free heap memory handed back"). A thread of its own gives
/// the whole pages of free chunks back every [`TRIM_INTERVAL`] (`malloc_trim`, which walks
/// the free lists of each arena under its lock: about half a millisecond a call on a
/// pulling node's heap, 0.05% of a core).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn return_freed_memory() {
    let trimmer = std::thread::Builder::new()
        .name("shoal-trim".into())
        .spawn(|| {
            loop {
                std::thread::sleep(TRIM_INTERVAL);
                // SAFETY: `malloc_trim` only releases pages of free chunks; it takes each
                // arena's lock and is safe to call from any thread at any time.
                unsafe {
                    libc::malloc_trim(0);
                }
            }
        });
    // Without the thread the node runs as before, with more memory resident.
    drop(trimmer);
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn return_freed_memory() {}

/// A pull keeps up to three batches of staging files open: with RocksDB's tables, packs
/// and sockets, up to 1,315 descriptors in all on 50,000 small files, more than the
/// soft limit of 1,024 many shells and service managers still start a process with,
/// while the hard limit they allow is far higher. The soft limit is raised to the hard
/// one, as a server that needs descriptors does; a failure leaves the limit as it was
/// (running out later is reported as the error of whatever ran out).
fn raise_open_file_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    // The soft limit is never above the hard one (`None` is unlimited).
    if limit.current != limit.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            },
        );
    }
}
