//! The journal's durable point and the tasks waiting for it: each waiter is
//! filed under the sequence number it waits for and woken once, by the commit
//! that makes that number durable, not by every commit (as one broadcast
//! channel would: with thousands of sessions each waiting for its answers'
//! outcome records, every commit woke them all to look again).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

/// The highest durable sequence number (all below it are durable too), whether
/// the journal failed, and who waits for what.
pub(crate) struct DurablePoint {
    durable: AtomicU64,
    failed: AtomicBool,
    /// Waiters by the sequence number they wait for, lowest first. A pending
    /// [`Wait`] files one entry (another only if polled with another waker);
    /// every entry is taken by the commit that reaches its number or by the
    /// failure, so the heap holds about one entry per waiting task.
    waiters: Mutex<BinaryHeap<Waiting>>,
}

struct Waiting {
    seq: Reverse<u64>,
    waker: Waker,
}

impl PartialEq for Waiting {
    fn eq(&self, other: &Self) -> bool {
        self.seq == other.seq
    }
}

impl Eq for Waiting {}

impl PartialOrd for Waiting {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Waiting {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.seq.cmp(&other.seq)
    }
}

impl DurablePoint {
    /// Everything up to `seq` durable already.
    pub(crate) fn new(seq: u64) -> DurablePoint {
        DurablePoint {
            durable: AtomicU64::new(seq),
            failed: AtomicBool::new(false),
            waiters: Mutex::new(BinaryHeap::new()),
        }
    }

    /// The highest durable sequence number.
    pub(crate) fn get(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }

    /// Whether the journal failed (nothing more becomes durable).
    pub(crate) fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Everything up to `seq` is durable: wakes those waiting for it, once each.
    /// `woken` is the caller's scratch space (kept to avoid an allocation per
    /// commit); the wakers are called outside the lock.
    pub(crate) fn publish(&self, seq: u64, woken: &mut Vec<Waker>) {
        self.durable.store(seq, Ordering::Release);
        {
            let mut waiters = crate::sync::lock(&self.waiters);
            while waiters.peek().is_some_and(|w| w.seq.0 <= seq) {
                if let Some(w) = waiters.pop() {
                    woken.push(w.waker);
                }
            }
        }
        for waker in woken.drain(..) {
            waker.wake();
        }
    }

    /// The journal failed: every waiter is woken to see it.
    pub(crate) fn fail(&self) {
        self.failed.store(true, Ordering::Release);
        let waiters = std::mem::take(&mut *crate::sync::lock(&self.waiters));
        for w in waiters {
            w.waker.wake();
        }
    }

    /// Waits until `seq` is durable: true then, false if the journal failed.
    pub(crate) fn wait(&self, seq: u64) -> Wait<'_> {
        Wait {
            point: self,
            seq,
            filed: None,
        }
    }
}

/// [`DurablePoint::wait`]'s future.
pub(crate) struct Wait<'a> {
    point: &'a DurablePoint,
    seq: u64,
    /// The waker filed for it, still in the heap until the wait is over.
    filed: Option<Waker>,
}

impl Future for Wait<'_> {
    type Output = bool;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<bool> {
        let p = self.point;
        let ready = || {
            if p.has_failed() {
                Some(false)
            } else if p.get() >= self.seq {
                Some(true)
            } else {
                None
            }
        };
        if let Some(done) = ready() {
            return Poll::Ready(done);
        }
        if self.filed.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            return Poll::Pending;
        }
        let mut waiters = crate::sync::lock(&p.waiters);
        // Looked at again under the lock: a commit or failure publishes before it
        // takes the lock, so either this sees it or it sees this waiter.
        if let Some(done) = ready() {
            return Poll::Ready(done);
        }
        let waker = cx.waker().clone();
        waiters.push(Waiting {
            seq: Reverse(self.seq),
            waker: waker.clone(),
        });
        drop(waiters);
        self.get_mut().filed = Some(waker);
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use std::task::Wake;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn poll(w: &mut Wait<'_>, waker: &Waker) -> Poll<bool> {
        Pin::new(w).poll(&mut Context::from_waker(waker))
    }

    #[test]
    fn each_waiter_is_woken_once_by_the_commit_that_reaches_it() {
        let point = DurablePoint::new(10);
        let counts: Vec<Arc<Count>> = (0..3)
            .map(|_| Arc::new(Count(AtomicUsize::new(0))))
            .collect();
        let wakers: Vec<Waker> = counts.iter().map(|c| Waker::from(c.clone())).collect();
        assert_eq!(poll(&mut point.wait(10), &wakers[0]), Poll::Ready(true));
        let mut waits: Vec<Wait<'_>> = [11, 12, 20].iter().map(|&s| point.wait(s)).collect();
        for (w, waker) in waits.iter_mut().zip(&wakers) {
            assert_eq!(poll(w, waker), Poll::Pending);
        }
        let mut scratch = Vec::new();
        point.publish(12, &mut scratch);
        let woken = |i: usize| counts[i].0.load(Ordering::SeqCst);
        assert_eq!((woken(0), woken(1), woken(2)), (1, 1, 0), "20 not yet");
        point.publish(15, &mut scratch);
        assert_eq!(woken(2), 0, "not woken by a commit that does not reach it");
        assert_eq!(poll(&mut waits[0], &wakers[0]), Poll::Ready(true));
        assert_eq!(poll(&mut waits[2], &wakers[2]), Poll::Pending);
        assert_eq!(crate::sync::lock(&point.waiters).len(), 1, "filed once");
        point.fail();
        assert_eq!(woken(2), 1, "failure wakes everyone left");
        assert_eq!(poll(&mut waits[2], &wakers[2]), Poll::Ready(false));
        assert!(crate::sync::lock(&point.waiters).is_empty());
    }
}
