//! The holds on one request against a cut ([`Holds`]).
//!
//! A request is cut when its client goes away or its time runs out: the
//! pipeline drops the future running its stages. Dropped in the middle of
//! a store operation, a stage would lose the operation's answer while the
//! store (Redis) still applies it; dropped after a write but before the
//! stage noted it, the stage would never act on it: a `ratelimit`
//! reservation made but never noted, so never given back. So the
//! instances serving a request hold it while a store operation runs, and from a write that changed a store (or may have:
//! its answer was an error) until the call that made it returns. The
//! pipeline cuts the request only where nothing is held.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// What one request's stage calls hold against a cut, and whether its
/// caller stopped waiting for it (see the module docs). Cloning shares it.
#[derive(Clone, Debug, Default)]
pub struct Holds(Arc<State>);

#[derive(Debug, Default)]
struct State {
    holds: AtomicU32,
    abandoned: AtomicBool,
}

impl Holds {
    /// Hold the request against a cut until the returned guard is
    /// dropped.
    pub fn hold(&self) -> Held {
        self.0.holds.fetch_add(1, Ordering::AcqRel);
        Held(self.0.clone())
    }

    /// Nothing is held: the request may be cut here.
    pub fn idle(&self) -> bool {
        self.0.holds.load(Ordering::Acquire) == 0
    }

    /// The request's caller stopped waiting: the request runs on only
    /// until nothing is held.
    pub fn abandon(&self) {
        self.0.abandoned.store(true, Ordering::Release);
    }

    /// Whether [`abandon`](Self::abandon) was called.
    pub fn abandoned(&self) -> bool {
        self.0.abandoned.load(Ordering::Acquire)
    }
}

/// A hold on a request (see [`Holds::hold`]).
#[derive(Debug)]
pub struct Held(Arc<State>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.holds.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::Holds;

    #[test]
    fn idle_only_once_every_hold_is_dropped() {
        let holds = Holds::default();
        assert!(holds.idle());
        let one = holds.hold();
        let two = holds.clone().hold();
        drop(one);
        assert!(!holds.idle());
        drop(two);
        assert!(holds.idle());
        assert!(!holds.abandoned());
        holds.clone().abandon();
        assert!(holds.abandoned());
    }
}
