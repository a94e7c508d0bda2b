//! A stage's bounded work queue: a deque behind a mutex, and a condition
//! variable its idle workers sleep on.
//!
//! Why not a lock-free channel: a crossbeam channel's receiver, finding
//! the queue empty, backs off by spinning and then calling `sched_yield`
//! several times before it parks. Under load, with queues often briefly
//! empty, that was ~12 % of the host's CPU in `sched_yield` (and more than
//! one call per request). Here a worker that finds the queue empty parks at
//! once (a futex wait), and a producer wakes one only if one is waiting
//! (a waiter count kept under the lock, so no wake-up is lost and a push to
//! a busy stage makes no system call). With a few workers per stage the
//! lock is rarely contended.
//!
//! The bound: [`WorkQueue::try_push`] refuses an item beyond `capacity`
//! (admission reservations keep the queue from ever getting there), while
//! [`WorkQueue::push_stop`] always fits, so shutdown can stop every worker.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::stage::Work;

/// Items allocated up front; the deque grows (amortised) beyond it, up to
/// the capacity.
const INITIAL_SLOTS: usize = 64;

struct State {
    items: VecDeque<Work>,
    /// Workers waiting on `ready`.
    waiting: usize,
}

/// A stage's queue (see the module docs).
pub(super) struct WorkQueue {
    state: Mutex<State>,
    ready: Condvar,
    capacity: usize,
}

impl WorkQueue {
    /// An empty queue of at most `capacity` items.
    pub(super) fn new(capacity: usize) -> WorkQueue {
        WorkQueue {
            state: Mutex::new(State {
                items: VecDeque::with_capacity(capacity.min(INITIAL_SLOTS)),
                waiting: 0,
            }),
            ready: Condvar::new(),
            capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queue `work`, or give it back if the queue is full. (The item is
    /// large, but the error path is cold, and moving it back is the point.)
    #[allow(clippy::result_large_err)]
    pub(super) fn try_push(&self, work: Work) -> Result<(), Work> {
        let mut state = self.lock();
        if state.items.len() >= self.capacity {
            return Err(work);
        }
        state.items.push_back(work);
        let wake = state.waiting > 0;
        drop(state);
        if wake {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Queue a stop for one worker, whatever the bound.
    pub(super) fn push_stop(&self) {
        let mut state = self.lock();
        state.items.push_back(Work::Stop);
        let wake = state.waiting > 0;
        drop(state);
        if wake {
            self.ready.notify_one();
        }
    }

    /// The next item, waiting up to `timeout` for one.
    pub(super) fn pop_timeout(&self, timeout: Duration) -> Option<Work> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if let Some(work) = state.items.pop_front() {
                return Some(work);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            state.waiting += 1;
            state = self
                .ready
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            state.waiting -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn bounded_fifo_with_stops_beyond_the_bound() {
        let queue = WorkQueue::new(2);
        assert!(queue.try_push(Work::Stop).is_ok());
        assert!(queue.try_push(Work::Stop).is_ok());
        assert!(queue.try_push(Work::Stop).is_err(), "full");
        queue.push_stop();
        for _ in 0..3 {
            assert!(matches!(
                queue.pop_timeout(Duration::ZERO),
                Some(Work::Stop)
            ));
        }
        assert!(queue.pop_timeout(Duration::from_millis(1)).is_none());
    }

    #[test]
    fn a_waiting_worker_is_woken_by_a_push() {
        let queue = Arc::new(WorkQueue::new(4));
        let worker = {
            let queue = queue.clone();
            std::thread::spawn(move || queue.pop_timeout(Duration::from_secs(30)))
        };
        // Push once the worker waits (or has not started: then it finds
        // the item without waiting); either way it gets it, long before
        // its 30 s timeout.
        while queue.lock().waiting == 0 && !worker.is_finished() {
            std::thread::yield_now();
        }
        queue.push_stop();
        assert!(matches!(worker.join().unwrap(), Some(Work::Stop)));
    }
}
