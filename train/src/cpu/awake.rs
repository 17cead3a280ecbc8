//! Keeps the thread pool's other workers polling for work while one training step runs, instead
//! of letting them fall asleep between its parallel loops.
//!
//! Why: a step is a few hundred parallel loops (each convolution, norm and transform splits over
//! samples or planes), with a little serial work between them. An idle rayon worker yields about
//! 32 times (tens of microseconds) and then sleeps on a futex, so nearly every loop starts by
//! waking it, and on a VM a wake costs tens of microseconds more before it takes its share. With
//! two threads a ResNet-20 step left the second worker idle ~4-5% of the time (`perf`, 2026-12-08,
//! AMD EPYC with AVX-512, 2 cores: 1.89 CPUs busy; 100 context switches a step). rayon has no
//! setting for how long its workers spin, so this uses its public API instead: a job broadcast to
//! the other workers at the start of the step polls for the step's work with `rayon::yield_now`
//! (which runs whatever it finds, as the worker's own idle loop would) until the step is over, or
//! until it has found nothing for [`IDLE_LIMIT`], when the worker goes back to rayon's own idle
//! loop (so a long serial stretch, or a caller that never ends its step, costs at most that much
//! spinning).
//!
//! Which worker runs which loop's pieces changes, never what they compute: every kernel's bits
//! are fixed by its own split of the work, whatever the threads (the tests compare 1 and 2
//! threads bit for bit).
//!
//! Deadlock-free by construction: a worker only runs the broadcast job when it looks for work,
//! and [`with_workers_awake`] posts it before the step makes any, when the other workers are
//! idle at the top of their loops; a worker that took it while waiting inside some other job
//! would hold that job up for at most [`IDLE_LIMIT`] after the pool runs dry, since the polling
//! then stops.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long a worker keeps polling without finding work before it returns to rayon's idle loop:
/// longer than the serial stretches between a step's parallel loops (tens to hundreds of
/// microseconds), short enough not to matter after the step.
const IDLE_LIMIT: Duration = Duration::from_millis(1);

/// Runs `f` on the current rayon pool (on one of its workers, as `rayon::scope` does when called
/// from outside) while the pool's other workers poll for the work it makes; returns what `f`
/// returns. With one thread it just runs `f`.
///
/// Meant for a step called from serial code (the training loops, `lmc bench`), as every caller
/// is. Called from inside a parallel loop it stays correct, but a worker busy with that loop's
/// pieces takes the polling job only when it next looks for work, and the call returns only
/// once every worker has taken it.
pub fn with_workers_awake<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_num_threads() < 2 {
        return f();
    }
    let done = AtomicBool::new(false);
    rayon::scope(|s| {
        // `scope` runs this on a worker of the pool, which then runs `f` itself.
        let me = rayon::current_thread_index();
        let done = &done;
        s.spawn_broadcast(move |_, ctx| {
            if Some(ctx.index()) != me {
                poll_until(done);
            }
        });
        // Set on the way out, panic or not, so the polling stops with the step.
        struct Done<'a>(&'a AtomicBool);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }
        let _done = Done(done);
        f()
    })
}

/// Runs the pool's pending work as it appears until `done` is set or nothing has turned up for
/// [`IDLE_LIMIT`].
fn poll_until(done: &AtomicBool) {
    let mut last = Instant::now();
    while !done.load(Ordering::Acquire) {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => last = Instant::now(),
            _ if last.elapsed() > IDLE_LIMIT => return,
            // A short pause between polls, so the owner of the deque being polled is not slowed
            // by a stream of steal attempts on its cache line.
            _ => (0..16).for_each(|_| std::hint::spin_loop()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::with_workers_awake;
    use rayon::prelude::*;

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap()
    }

    /// A step's parallel loops inside: the sum of 0..n, in parallel pieces, nested joins and all.
    fn step(n: u64) -> u64 {
        (0..n as usize).into_par_iter().with_min_len(1 << 10).map(|i| i as u64 * 3 % 7).sum()
    }

    #[test]
    fn runs_the_step_on_any_pool_and_returns_what_it_returns() {
        // The serial sum of i * 3 % 7 over 0..n, by hand: 0+3+6+2+5+1+4 = 21 a period of 7.
        let n = 7 * 100_000;
        for threads in 1..=4 {
            let got: Vec<u64> =
                pool(threads).install(|| (0..50).map(|_| with_workers_awake(|| step(n))).collect());
            assert!(got.iter().all(|&s| s == 21 * 100_000), "{threads} threads: {got:?}");
        }
        // From outside any pool (the global one), as `lmc train` calls it.
        assert_eq!(with_workers_awake(|| step(n)), 21 * 100_000);
    }

    #[test]
    fn the_step_runs_on_a_worker_of_the_pool() {
        for threads in [1, 2, 3] {
            let idx = pool(threads).install(|| with_workers_awake(rayon::current_thread_index));
            assert!(idx.is_some_and(|i| i < threads), "{threads} threads: {idx:?}");
        }
        // Called from outside (the test's own thread), a step moves onto the global pool's
        // workers, where its loops' pieces are handed out without waking this thread each time.
        assert_eq!(rayon::current_thread_index(), None);
        if rayon::current_num_threads() >= 2 {
            assert!(with_workers_awake(rayon::current_thread_index).is_some());
        }
    }

    #[test]
    fn a_panicking_step_panics_and_the_pool_goes_on() {
        let p = pool(2);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            p.install(|| with_workers_awake(|| -> u64 { panic!("in the step") }))
        }));
        assert!(r.is_err());
        assert_eq!(p.install(|| with_workers_awake(|| step(7 * 1000))), 21 * 1000);
    }
}
