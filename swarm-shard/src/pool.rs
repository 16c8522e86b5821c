//! The worker threads of the engine's own kernels: they spin while a step
//! computes, nap between the steps of a session, and sleep when the
//! machine is idle.
//!
//! A decode step is a few hundred short products with microseconds
//! between them, so while a step runs its workers spin (waking a sleeping
//! thread costs more than many of the products). A computation marks
//! itself [`busy`] (each block, each local generation step, each job here)
//! and workers spin while any is, then for a short grace.
//!
//! Between steps they must not spin: a server waits for the network, and
//! a core it keeps busy is one its neighbours (other servers, the client,
//! anything else on the machine) do not get. candle's barrier pool, which
//! these kernels used before, spins after every product for a fixed count
//! and wakes its workers on every call. Waking a sleeping thread is also
//! the caller's cost: on the 2-core VM this was measured on, one wake-up
//! (`unpark`) took 1-5 ms, which made a hop across an emulated 2 ms link
//! take 4-5 ms instead of 2.6. So an idle worker here naps for growing
//! spells (50 µs up to 1 ms) for a second, finding the next job within a
//! nap without anyone waking it, and only then sleeps until woken. And a
//! caller never waits for a worker that has not started: whoever, worker
//! or caller, first takes a job's generation decides whether the worker
//! is in it, so a late worker is simply left out.

use std::any::Any;
use std::cell::{Cell, UnsafeCell};
use std::hint::spin_loop;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// Spins of an idle worker while a computation is under way: about 100 ms,
/// a bound in case a marked computation waits on something slow.
const BUSY_SPINS: u32 = 2_000_000;
/// Spins of an idle worker once no computation is (tens of microseconds):
/// enough to bridge the gap between one block and the next.
const GRACE_SPINS: u32 = 2_000;
/// The first and the longest nap of an idle worker.
const FIRST_NAP: Duration = Duration::from_micros(50);
const LAST_NAP: Duration = Duration::from_millis(1);
/// How long an idle worker naps before it sleeps until woken.
const NAPPING: Duration = Duration::from_secs(1);
/// Spins of a caller waiting for its workers before it also yields its
/// core (a worker may be waiting for one).
const WAIT_SPINS_BEFORE_YIELD: u32 = 20_000;

/// Computations under way in this process.
static BUSY: AtomicUsize = AtomicUsize::new(0);

/// Marks a computation under way until dropped.
#[must_use = "the computation is marked only while the guard lives"]
pub(crate) struct Busy(());

/// Marks a computation as under way: the workers keep spinning between its
/// products.
pub(crate) fn busy() -> Busy {
    BUSY.fetch_add(1, Ordering::SeqCst);
    Busy(())
}

impl Drop for Busy {
    fn drop(&mut self) {
        BUSY.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One worker's signals, on a cache line of its own.
#[repr(C, align(64))]
struct Slot {
    /// The generation of the job to run (set by the caller).
    go: AtomicU64,
    /// The last generation it finished (set by the worker).
    done: AtomicU64,
    /// The newest generation taken, by the worker (to run it) or by the
    /// caller (which finished its share and the cursor before the worker
    /// woke, and so goes on without it). Generations only grow, and whoever
    /// raises it to a generation first decides; a worker that slept through
    /// a generation and wakes holding an old one finds a newer one here and
    /// leaves it alone.
    taken: AtomicU64,
    /// Whether it is parked (so the caller must unpark it).
    parked: AtomicBool,
}

/// The job of the current generation: a closure behind a type-erased call.
struct Job {
    call: unsafe fn(*const (), usize),
    data: *const (),
}

struct Pool {
    slots: Box<[Slot]>,
    job: UnsafeCell<Job>,
    threads: OnceLock<Box<[Thread]>>,
    /// Serializes callers; holds the last generation.
    call: Mutex<u64>,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

// SAFETY: `job` is written only by the caller holding `call`, before it
// publishes the generation (Release) that workers read (Acquire) before
// reading `job`, and the caller waits for every worker to finish before it
// releases `call`. Everything else is atomics and mutexes.
unsafe impl Sync for Pool {}
// SAFETY: as above; the raw pointer in `job` is only used under that protocol.
unsafe impl Send for Pool {}

thread_local! {
    static IN_POOL: Cell<bool> = const { Cell::new(false) };
}

/// # Safety
/// `data` must point at a live `F`.
unsafe fn call<F: Fn(usize)>(data: *const (), tid: usize) {
    // SAFETY: the caller guarantees data is a live F.
    unsafe { (*(data as *const F))(tid) }
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<&'static Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        // candle's thread count (RAYON_NUM_THREADS, CANDLE_NUM_THREADS or
        // the physical cores), looked up once.
        let workers = candle_core::utils::get_num_threads().saturating_sub(1);
        let pool: &'static Pool = Box::leak(Box::new(Pool {
            slots: (0..workers)
                .map(|_| Slot {
                    go: AtomicU64::new(0),
                    done: AtomicU64::new(0),
                    taken: AtomicU64::new(0),
                    parked: AtomicBool::new(false),
                })
                .collect(),
            job: UnsafeCell::new(Job {
                call: |_, _| {},
                data: std::ptr::null(),
            }),
            threads: OnceLock::new(),
            call: Mutex::new(0),
            panic: Mutex::new(None),
        }));
        let mut threads = Vec::with_capacity(workers);
        for tid in 0..workers {
            let spawned = std::thread::Builder::new()
                .name(format!("sherpa-kernel-{tid}"))
                .spawn(move || work(pool, tid));
            match spawned {
                Ok(handle) => threads.push(handle.thread().clone()),
                // Fewer threads than cores still computes everything: the
                // slots without a thread are never signalled (see `execute`).
                Err(e) => {
                    tracing::warn!("kernel thread {tid} did not start: {e}");
                    break;
                }
            }
        }
        let _ = pool.threads.set(threads.into_boxed_slice());
        pool
    })
}

/// A worker's life: wait for a generation, run the job, say it is done.
fn work(pool: &'static Pool, tid: usize) {
    IN_POOL.with(|f| f.set(true));
    let slot = &pool.slots[tid];
    let mut gen = 0u64;
    loop {
        let mut spins = 0u32;
        let mut nap = FIRST_NAP;
        let mut idle_since: Option<Instant> = None;
        loop {
            let g = slot.go.load(Ordering::Acquire);
            if g != gen {
                gen = g;
                break;
            }
            let limit = if BUSY.load(Ordering::Relaxed) > 0 {
                BUSY_SPINS
            } else {
                GRACE_SPINS
            };
            if spins < limit {
                spins += 1;
                spin_loop();
                continue;
            }
            // Naps, growing, while the machine may soon need this thread
            // again (a server between two steps of a session): the next
            // job finds it within a nap, and its caller never waits to
            // wake it (see `run`).
            if idle_since.get_or_insert_with(Instant::now).elapsed() < NAPPING {
                std::thread::sleep(nap);
                nap = (nap * 2).min(LAST_NAP);
                continue;
            }
            slot.parked.store(true, Ordering::SeqCst);
            // A generation published before `parked` was seen is caught
            // here; one published after finds `parked` and unparks (an
            // unpark before the park makes the park return at once).
            if slot.go.load(Ordering::SeqCst) == gen {
                std::thread::park();
            }
            slot.parked.store(false, Ordering::SeqCst);
            spins = 0;
            nap = FIRST_NAP;
            idle_since = None;
        }
        if slot.taken.fetch_max(gen, Ordering::AcqRel) >= gen {
            // The caller finished without this worker: the job is gone.
            continue;
        }
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // SAFETY: the generation was published (Acquire above) after
            // the caller wrote `job`, and since this worker took the
            // generation, the caller keeps the closure alive until this
            // worker stores `done`.
            unsafe {
                let job = &*pool.job.get();
                (job.call)(job.data, tid);
            }
        }));
        if let Err(payload) = outcome {
            if let Ok(mut p) = pool.panic.lock() {
                p.get_or_insert(payload);
            }
        }
        slot.done.store(gen, Ordering::Release);
    }
}

/// Calls `f` on ranges covering `0..n_items`, on the calling thread and
/// the workers at once; returns when all are done.
pub(crate) fn execute_chunked(n_items: usize, f: impl Fn(Range<usize>) + Sync) {
    if n_items == 0 {
        return;
    }
    let pool = pool();
    let workers = pool.threads.get().map_or(0, |t| t.len());
    // A job inside a job runs where it is (the call lock is held).
    if workers == 0 || IN_POOL.with(|f| f.get()) {
        f(0..n_items);
        return;
    }
    let _busy = busy();
    // About eight grabs per thread: few atomics, little left for the last.
    let chunk = n_items.div_ceil((workers + 1) * 8).max(1);
    let cursor = AtomicUsize::new(0);
    let job = |_tid: usize| loop {
        let start = cursor.fetch_add(chunk, Ordering::Relaxed);
        if start >= n_items {
            break;
        }
        f(start..n_items.min(start + chunk));
    };
    run(pool, workers, &job);
}

fn run<F: Fn(usize) + Sync>(pool: &Pool, workers: usize, job: &F) {
    let mut last = pool.call.lock().unwrap_or_else(|e| e.into_inner());
    // Generations count up from 1 and never wrap (2^64 jobs).
    let gen = *last + 1;
    *last = gen;
    // SAFETY: we hold the call lock and no worker reads `job` until it sees
    // the generation stored below.
    unsafe {
        *pool.job.get() = Job {
            call: call::<F>,
            data: job as *const F as *const (),
        };
    }
    let threads = pool.threads.get().map_or(&[][..], |t| &t[..]);
    for (slot, thread) in pool.slots.iter().zip(threads).take(workers) {
        slot.go.store(gen, Ordering::SeqCst);
        if slot.parked.load(Ordering::SeqCst) {
            thread.unpark();
        }
    }
    IN_POOL.with(|f| f.set(true));
    let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(workers)));
    IN_POOL.with(|f| f.set(false));
    // Every worker that took the job finishes before `job` (on this stack)
    // goes away, even when this thread's share panicked. A worker that has
    // not woken yet is not waited for: the cursor is spent, so it would
    // find nothing to do. (Waiting for it cost a millisecond and more when
    // its core was asleep or busy with another program.)
    for slot in pool.slots.iter().take(workers) {
        if slot.taken.fetch_max(gen, Ordering::AcqRel) < gen {
            continue;
        }
        let mut spins = 0u32;
        while slot.done.load(Ordering::Acquire) != gen {
            spins += 1;
            if spins.is_multiple_of(WAIT_SPINS_BEFORE_YIELD) {
                std::thread::yield_now();
            } else {
                spin_loop();
            }
        }
    }
    let theirs = pool.panic.lock().ok().and_then(|mut p| p.take());
    drop(last);
    if let Err(payload) = mine {
        std::panic::resume_unwind(payload);
    }
    if let Some(payload) = theirs {
        std::panic::resume_unwind(payload);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_is_computed_once_whatever_the_threads() {
        for n in [0usize, 1, 7, 64, 1000, 100_003] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            execute_chunked(n, |range| {
                for i in range {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                }
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "{n}");
        }
    }

    #[test]
    fn callers_on_many_threads_and_nested_calls_all_finish() {
        std::thread::scope(|s| {
            for t in 0..4 {
                s.spawn(move || {
                    for round in 0..200 {
                        let total = AtomicUsize::new(0);
                        execute_chunked(50 + t + round % 7, |range| {
                            // A nested call runs inline.
                            execute_chunked(range.len(), |inner| {
                                total.fetch_add(inner.len(), Ordering::Relaxed);
                            });
                        });
                        assert_eq!(total.load(Ordering::Relaxed), 50 + t + round % 7);
                    }
                });
            }
        });
    }

    #[test]
    fn a_late_worker_never_touches_a_finished_job() {
        // Tiny jobs from several threads: callers often finish before a
        // worker wakes, and the worker then holds a generation that is
        // over. Each job writes into a buffer that dies when its call
        // returns; a late worker running an old or a foreign job would
        // write into freed memory or leave a buffer unfinished.
        std::thread::scope(|s| {
            for t in 0..3u32 {
                s.spawn(move || {
                    for round in 0..3000u32 {
                        let n = 1 + (round as usize + t as usize) % 5;
                        let out: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                        execute_chunked(n, |range| {
                            for i in range {
                                out[i].fetch_add(round as usize + 1, Ordering::Relaxed);
                            }
                        });
                        assert!(out
                            .iter()
                            .all(|v| v.load(Ordering::Relaxed) == round as usize + 1));
                        if round % 500 == 0 {
                            // Let the workers fall asleep now and then.
                            std::thread::sleep(std::time::Duration::from_millis(3));
                        }
                    }
                });
            }
        });
    }

    #[test]
    fn workers_that_slept_wake_for_the_next_job() {
        let total = AtomicUsize::new(0);
        execute_chunked(100, |r| {
            total.fetch_add(r.len(), Ordering::Relaxed);
        });
        // Long enough for every worker to park.
        std::thread::sleep(std::time::Duration::from_millis(50));
        execute_chunked(100, |r| {
            total.fetch_add(r.len(), Ordering::Relaxed);
        });
        assert_eq!(total.load(Ordering::Relaxed), 200);
    }

    #[test]
    fn a_panic_in_a_job_reaches_the_caller_and_the_pool_still_works() {
        let caught = std::panic::catch_unwind(|| {
            execute_chunked(1000, |r| {
                if r.contains(&999) {
                    panic!("item 999");
                }
            })
        });
        assert!(caught.is_err());
        let total = AtomicUsize::new(0);
        execute_chunked(10, |r| {
            total.fetch_add(r.len(), Ordering::Relaxed);
        });
        assert_eq!(total.load(Ordering::Relaxed), 10);
    }
}
