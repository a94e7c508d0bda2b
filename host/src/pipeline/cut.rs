//! Cutting a request only where its stages hold nothing against it
//! ([`CutWhenIdle`]).
//!
//! A request's stages run as one future. Its caller drops that future
//! when the client goes away, and the deadline drops it when the
//! request's time runs out. Dropped while a stage waits for a store
//! operation, or after a stage changed a store but before it returned,
//! the stage would never act on what it did, though the store (Redis)
//! keeps it: a `ratelimit` reservation made but never noted, so never
//! given back. The instances hold the request's [`Holds`] for exactly
//! those spans. A drop while something is held does not drop the stages
//! there: they are handed to a task of their own that runs them on until
//! nothing is held. The stage then has its answer and has returned, and
//! the next stage does not start (see `run_stages`): the request ends as
//! cut, and its finish calls get it as that stage left it. The client's
//! answer (none, or the 504) is not delayed: only the request's own
//! wind-down is, by at most the store's timeout and the stage's. Only the
//! routes with a stage granted a store pay for this (an allocation per
//! request); on the others nothing can hold a request, and it is dropped
//! where it is.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::store::Holds;

/// The future of a request's stages, which a drop cuts only where
/// nothing holds the request (see the module docs).
pub(super) struct CutWhenIdle<F: Future + Send + 'static> {
    stages: Option<Pin<Box<F>>>,
    holds: Holds,
}

impl<F: Future + Send + 'static> CutWhenIdle<F> {
    /// The stages `start` makes, on the heap (made there, not moved
    /// there: an unstarted future is as large as its largest state).
    pub(super) fn new(start: impl FnOnce() -> F, holds: Holds) -> Self {
        let stages = Box::write(Box::new_uninit(), start());
        CutWhenIdle {
            stages: Some(Box::into_pin(stages)),
            holds,
        }
    }
}

impl<F: Future + Send + 'static> Future for CutWhenIdle<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        let Some(stages) = this.stages.as_mut() else {
            unreachable!("polled after it resolved");
        };
        let output = std::task::ready!(stages.as_mut().poll(cx));
        this.stages = None;
        Poll::Ready(output)
    }
}

impl<F: Future + Send + 'static> Drop for CutWhenIdle<F> {
    fn drop(&mut self) {
        let Some(stages) = self.stages.take() else {
            return;
        };
        if self.holds.idle() {
            return;
        }
        self.holds.abandon();
        // Without a runtime (the runtime itself is shutting down) there is
        // nothing to run them on: they are dropped here.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(WindDown {
                stages,
                holds: self.holds.clone(),
            });
        }
    }
}

/// Stages whose caller stopped waiting, run until nothing holds the
/// request, then dropped.
struct WindDown<F: Future> {
    stages: Pin<Box<F>>,
    holds: Holds,
}

impl<F: Future> Future for WindDown<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        match this.stages.as_mut().poll(cx) {
            // Done (or nothing left to finish): dropped with this task.
            Poll::Ready(_) => Poll::Ready(()),
            Poll::Pending if this.holds.idle() => Poll::Ready(()),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use tokio::sync::oneshot;

    use super::CutWhenIdle;
    use crate::store::Holds;

    /// Dropped while held, the stages run on until the hold ends and stop
    /// at the next point where they wait.
    #[tokio::test]
    async fn a_drop_while_held_runs_on_until_the_hold_ends() {
        let holds = Holds::default();
        let (answer, answered) = oneshot::channel::<()>();
        let (reached, reached_rx) = oneshot::channel::<()>();
        let noted = Arc::new(AtomicBool::new(false));
        let after = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicBool::new(false));
        let stages = {
            let (holds, noted, after) = (holds.clone(), noted.clone(), after.clone());
            let guard = Flag(dropped.clone());
            async move {
                let _guard = guard;
                let held = holds.hold();
                let _ = reached.send(());
                let _ = answered.await;
                drop(held);
                noted.store(true, Ordering::Release);
                if holds.abandoned() {
                    std::future::pending::<()>().await;
                }
                after.store(true, Ordering::Release);
            }
        };
        let mut cut = Box::pin(CutWhenIdle::new(|| stages, holds.clone()));
        tokio::select! {
            _ = &mut cut => unreachable!("it waits for its answer"),
            _ = reached_rx => {}
        }
        drop(cut);
        assert!(holds.abandoned());
        let _ = answer.send(());
        // The wound-down task drops the stages once they wait again.
        while !dropped.load(Ordering::Acquire) {
            tokio::task::yield_now().await;
        }
        assert!(noted.load(Ordering::Acquire));
        assert!(!after.load(Ordering::Acquire));
        assert!(holds.idle());
    }

    /// Sets its flag when dropped.
    struct Flag(Arc<AtomicBool>);

    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }

    /// Dropped with nothing in flight, the stages are dropped at once.
    #[tokio::test]
    async fn a_drop_with_nothing_holds_is_immediate() {
        let holds = Holds::default();
        let cut = CutWhenIdle::new(std::future::pending::<()>, holds.clone());
        drop(cut);
        assert!(!holds.abandoned());
    }
}
