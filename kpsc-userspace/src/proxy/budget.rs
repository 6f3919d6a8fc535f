//! The memory budget shared by every connection's rewrites. Rewriting a response holds the
//! frame, the decoded message and the re-encoded frame at once (about
//! `REWRITE_MEMORY_PER_FRAME_BYTE` times the frame); a per-connection allowance would let
//! a few clients asking for huge Metadata responses at once take gigabytes. Each rewrite
//! reserves its share first: when the budget is spent it waits for others to finish, and
//! a response that could never fit closes its connection instead of growing the process.

use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};

use crate::config::proxy::REWRITE_MEMORY_PER_FRAME_BYTE;

/// Reservations are counted in units of this many bytes.
const UNIT: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    #[error(
        "rewriting a {frame} byte response needs about {needed} bytes, more than the whole --rewrite-memory-budget ({budget})"
    )]
    NeverFits {
        frame: u32,
        needed: u64,
        budget: u64,
    },
    #[error("no room in --rewrite-memory-budget for a {frame} byte response within {waited:?}")]
    Timeout { frame: u32, waited: Duration },
}

pub struct RewriteBudget {
    units: Semaphore,
    total: u64,
}

/// Memory reserved for one rewrite, returned when dropped.
pub struct Reservation<'a> {
    permit: SemaphorePermit<'a>,
}

impl Reservation<'_> {
    /// Keeps only what `bytes` still need, e.g. the encoded response while it is written
    /// to a client that may read slowly: the rest goes back to the budget at once.
    pub fn shrink_to(&mut self, bytes: usize) {
        let keep = (bytes as u64).div_ceil(UNIT).max(1) as usize;
        let excess = self.permit.num_permits().saturating_sub(keep);
        drop(self.permit.split(excess));
    }
}

impl RewriteBudget {
    pub fn new(bytes: u64) -> Self {
        let units = (bytes / UNIT).clamp(1, Semaphore::MAX_PERMITS as u64);
        Self {
            units: Semaphore::new(units as usize),
            total: units * UNIT,
        }
    }

    /// Reserves what rewriting a `frame`-byte response may take, waiting up to `wait`.
    /// `waited` is set when the reservation had to wait for others.
    pub async fn reserve(
        &self,
        frame: u32,
        wait: Duration,
        waited: &mut bool,
    ) -> Result<Reservation<'_>, BudgetError> {
        let needed = u64::from(frame) * REWRITE_MEMORY_PER_FRAME_BYTE;
        if needed > self.total {
            return Err(BudgetError::NeverFits {
                frame,
                needed,
                budget: self.total,
            });
        }
        let units = needed.div_ceil(UNIT).max(1) as u32;
        if let Ok(permit) = self.units.try_acquire_many(units) {
            return Ok(Reservation { permit });
        }
        *waited = true;
        match tokio::time::timeout(wait, self.units.acquire_many(units)).await {
            Ok(Ok(permit)) => Ok(Reservation { permit }),
            // The semaphore is never closed; a timeout is the only way to get here.
            _ => Err(BudgetError::Timeout {
                frame,
                waited: wait,
            }),
        }
    }
}

/// Gives memory freed by a large rewrite back to the system: glibc keeps freed heap pages
/// (the decoded message is many small allocations) unless asked.
pub fn release_after_large_rewrite() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks glibc's own free lists; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rewrites_share_one_budget() {
        let budget = RewriteBudget::new(100 << 20);
        let mut waited = false;
        // 8 MiB frames take 80 MiB each: one fits, the second waits until it is released.
        let first = budget
            .reserve(8 << 20, Duration::from_secs(1), &mut waited)
            .await
            .unwrap();
        assert!(!waited);
        let err = budget
            .reserve(8 << 20, Duration::from_millis(50), &mut waited)
            .await
            .err()
            .unwrap();
        assert!(waited);
        assert!(matches!(err, BudgetError::Timeout { .. }), "{err}");
        // Once encoded, a rewrite keeps only what its output needs while it is written.
        let mut first = first;
        first.shrink_to(1 << 20);
        let mut waited = false;
        let second = budget
            .reserve(8 << 20, Duration::from_millis(50), &mut waited)
            .await
            .unwrap();
        assert!(!waited);
        drop((first, second));
        let mut waited = false;
        budget
            .reserve(8 << 20, Duration::from_millis(50), &mut waited)
            .await
            .unwrap();
        assert!(!waited);
        // A frame whose rewrite could never fit fails at once, naming the flag.
        let err = budget
            .reserve(11 << 20, Duration::from_secs(60), &mut waited)
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("--rewrite-memory-budget"), "{err}");
    }
}
