//! Admission of search requests: a bounded wait queue, a byte budget for buffered uploads,
//! and the decode + extract slots. A request first takes a place in the queue (503 when it is
//! full), then reserves its upload's bytes before reading the body, then waits for a slot.

use super::errors::ApiError;
use super::limits::ServeLimits;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Longest a request waits in the queue before it is answered 503.
pub const QUEUE_TIMEOUT: Duration = Duration::from_secs(60);

/// The queue, the upload budget and the slots.
pub struct Admission {
    waiting: AtomicUsize,
    queue: usize,
    body_kib: Arc<Semaphore>,
    body_kib_total: u32,
    slots: Arc<Semaphore>,
    slot_count: usize,
}

/// A place in the queue; leaving it (drop) frees the place.
pub struct Ticket<'a> {
    admission: &'a Admission,
    waiting: bool,
}

/// What a request holds while its CPU work runs: its slot and its upload's bytes.
pub struct Slot {
    _slot: OwnedSemaphorePermit,
    _body: OwnedSemaphorePermit,
}

impl Admission {
    /// Admission for a memory plan.
    pub fn new(limits: &ServeLimits) -> Admission {
        let body_kib_total = kib(limits.body_buffer).max(1);
        Admission {
            waiting: AtomicUsize::new(0),
            queue: limits.queue,
            body_kib: Arc::new(Semaphore::new(body_kib_total as usize)),
            body_kib_total,
            slots: Arc::new(Semaphore::new(limits.slots)),
            slot_count: limits.slots,
        }
    }

    /// Takes a place in the queue, or refuses with 503 when it is full.
    pub fn enter(&self) -> Result<Ticket<'_>, ApiError> {
        let before = self.waiting.fetch_add(1, Ordering::AcqRel);
        if before >= self.queue {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(ApiError::Busy(format!(
                "{} requests are already waiting for a decode slot; retry shortly",
                self.queue
            )));
        }
        Ok(Ticket {
            admission: self,
            waiting: true,
        })
    }

    /// Requests waiting (queued, reading their upload, or waiting for a slot).
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Slots in use.
    pub fn busy_slots(&self) -> usize {
        self.slot_count
            .saturating_sub(self.slots.available_permits())
    }
}

fn kib(bytes: u64) -> u32 {
    bytes.div_ceil(1024).min(u32::MAX as u64) as u32
}

fn busy() -> ApiError {
    ApiError::Busy(format!(
        "no decode slot became free within {} s; retry shortly",
        QUEUE_TIMEOUT.as_secs()
    ))
}

impl Ticket<'_> {
    /// Reserves `bytes` of the upload budget (waits while other uploads hold it).
    pub async fn reserve_body(&self, bytes: u64) -> Result<OwnedSemaphorePermit, ApiError> {
        let want = kib(bytes).clamp(1, self.admission.body_kib_total);
        let sem = self.admission.body_kib.clone();
        tokio::time::timeout(QUEUE_TIMEOUT, sem.acquire_many_owned(want))
            .await
            .map_err(|_| busy())?
            .map_err(|_| ApiError::Internal("admission closed".into()))
    }

    /// Waits for a slot; leaves the queue when it has one.
    pub async fn slot(mut self, body: OwnedSemaphorePermit) -> Result<Slot, ApiError> {
        let sem = self.admission.slots.clone();
        let slot = tokio::time::timeout(QUEUE_TIMEOUT, sem.acquire_owned())
            .await
            .map_err(|_| busy())?
            .map_err(|_| ApiError::Internal("admission closed".into()))?;
        self.leave();
        Ok(Slot {
            _slot: slot,
            _body: body,
        })
    }

    fn leave(&mut self) {
        if self.waiting {
            self.waiting = false;
            self.admission.waiting.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.leave();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(slots: usize, queue: usize) -> ServeLimits {
        ServeLimits {
            limit: 1 << 30,
            base: 0,
            slots,
            slot_bytes: 1 << 20,
            body_buffer: 4 << 20,
            max_body: 2 << 20,
            queue,
            rebuild_budget: 0,
        }
    }

    #[tokio::test]
    async fn the_queue_is_bounded_and_places_are_freed() {
        let a = Admission::new(&limits(1, 2));
        let t1 = a.enter().unwrap();
        let _t2 = a.enter().unwrap();
        assert!(matches!(a.enter(), Err(ApiError::Busy(_))));
        assert_eq!(a.waiting(), 2);
        let body = t1.reserve_body(1000).await.unwrap();
        let slot = t1.slot(body).await.unwrap();
        assert_eq!(a.waiting(), 1);
        assert_eq!(a.busy_slots(), 1);
        let _t3 = a.enter().unwrap();
        drop(slot);
        assert_eq!(a.busy_slots(), 0);
    }

    #[tokio::test]
    async fn uploads_wait_for_the_byte_budget() {
        let a = Admission::new(&limits(4, 8));
        let t1 = a.enter().unwrap();
        let big = t1.reserve_body(3 << 20).await.unwrap();
        let t2 = a.enter().unwrap();
        let second = tokio::time::timeout(Duration::from_millis(50), t2.reserve_body(2 << 20));
        assert!(
            second.await.is_err(),
            "the budget is held by the first upload"
        );
        drop(big);
        assert!(t2.reserve_body(2 << 20).await.is_ok());
    }
}
