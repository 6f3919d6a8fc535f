//! The memory budget shared by every connection's rewrites. Rewriting a response holds the
//! frame and the rewritten frame at once (`REWRITE_MEMORY_PER_FRAME_BYTE` times the frame,
//! plus what longer advertised hosts add); a per-connection allowance would let a few
//! clients asking for huge Metadata responses at once take gigabytes. Each rewrite
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
        frame: u64,
        needed: u64,
        budget: u64,
    },
    #[error("no room in --rewrite-memory-budget for a {frame} byte response within {waited:?}")]
    Timeout { frame: u64, waited: Duration },
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
                frame: u64::from(frame),
                needed,
                budget: self.total,
            });
        }
        let permit = self.acquire(needed, u64::from(frame), wait, waited).await?;
        Ok(Reservation { permit })
    }

    /// Grows `reservation` to cover `bytes` in all, e.g. once a rewrite knows its output is
    /// longer than the frame (advertised hosts longer than the real ones).
    pub async fn grow<'b>(
        &'b self,
        reservation: &mut Reservation<'b>,
        frame: u32,
        bytes: u64,
        wait: Duration,
        waited: &mut bool,
    ) -> Result<(), BudgetError> {
        let held = reservation.permit.num_permits() as u64 * UNIT;
        if bytes <= held {
            return Ok(());
        }
        if bytes > self.total {
            return Err(BudgetError::NeverFits {
                frame: u64::from(frame),
                needed: bytes,
                budget: self.total,
            });
        }
        let more = self
            .acquire(bytes - held, u64::from(frame), wait, waited)
            .await?;
        // Both permits come from this budget's semaphore.
        reservation.permit.merge(more);
        Ok(())
    }

    async fn acquire(
        &self,
        bytes: u64,
        frame: u64,
        wait: Duration,
        waited: &mut bool,
    ) -> Result<SemaphorePermit<'_>, BudgetError> {
        let units = bytes.div_ceil(UNIT).max(1) as u32;
        if let Ok(permit) = self.units.try_acquire_many(units) {
            return Ok(permit);
        }
        *waited = true;
        match tokio::time::timeout(wait, self.units.acquire_many(units)).await {
            Ok(Ok(permit)) => Ok(permit),
            // The semaphore is never closed; a timeout is the only way to get here.
            _ => Err(BudgetError::Timeout {
                frame,
                waited: wait,
            }),
        }
    }
}

/// Gives memory freed by a large rewrite back to the system: glibc may keep freed heap
/// pages (the frame and output buffers, the endpoint index) unless asked.
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

    const MIB: u32 = 1 << 20;

    #[tokio::test]
    async fn rewrites_share_one_budget() {
        // Room for one 8 MiB frame's rewrite and a bit.
        let budget = RewriteBudget::new(u64::from(9 * MIB) * REWRITE_MEMORY_PER_FRAME_BYTE);
        let mut waited = false;
        let first = budget
            .reserve(8 * MIB, Duration::from_secs(1), &mut waited)
            .await
            .unwrap();
        assert!(!waited);
        let err = budget
            .reserve(8 * MIB, Duration::from_millis(50), &mut waited)
            .await
            .err()
            .unwrap();
        assert!(waited);
        assert!(matches!(err, BudgetError::Timeout { .. }), "{err}");
        // Once encoded, a rewrite keeps only what its output needs while it is written.
        let mut first = first;
        first.shrink_to(MIB as usize);
        let mut waited = false;
        let second = budget
            .reserve(8 * MIB, Duration::from_millis(50), &mut waited)
            .await
            .unwrap();
        assert!(!waited);
        drop((first, second));
        let mut waited = false;
        budget
            .reserve(8 * MIB, Duration::from_millis(50), &mut waited)
            .await
            .unwrap();
        assert!(!waited);
        // A frame whose rewrite could never fit fails at once, naming the flag.
        let err = budget
            .reserve(10 * MIB, Duration::from_secs(60), &mut waited)
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("--rewrite-memory-budget"), "{err}");
    }

    #[tokio::test]
    async fn a_rewrite_that_grows_reserves_the_difference() {
        let total = u64::from(10 * MIB) * REWRITE_MEMORY_PER_FRAME_BYTE;
        let budget = RewriteBudget::new(total);
        let mut waited = false;
        let frame = 4 * MIB;
        let mut first = budget
            .reserve(frame, Duration::from_secs(1), &mut waited)
            .await
            .unwrap();
        let held = u64::from(frame) * REWRITE_MEMORY_PER_FRAME_BYTE;
        // Already covered: nothing more is taken.
        budget
            .grow(&mut first, frame, held, Duration::ZERO, &mut waited)
            .await
            .unwrap();
        assert_eq!(
            budget.units.available_permits() as u64,
            (total - held) / UNIT
        );
        budget
            .grow(
                &mut first,
                frame,
                held + u64::from(MIB),
                Duration::ZERO,
                &mut waited,
            )
            .await
            .unwrap();
        assert!(!waited);
        assert_eq!(
            budget.units.available_permits() as u64,
            (total - held - u64::from(MIB)) / UNIT
        );
        // More than the whole budget never fits; more than what is left waits, then fails.
        let err = budget
            .grow(
                &mut first,
                frame,
                total + 1,
                Duration::from_secs(60),
                &mut waited,
            )
            .await
            .unwrap_err();
        assert!(matches!(err, BudgetError::NeverFits { .. }), "{err}");
        let other = budget
            .reserve(frame, Duration::ZERO, &mut waited)
            .await
            .unwrap();
        let err = budget
            .grow(
                &mut first,
                frame,
                total,
                Duration::from_millis(20),
                &mut waited,
            )
            .await
            .unwrap_err();
        assert!(matches!(err, BudgetError::Timeout { .. }), "{err}");
        assert!(waited);
        drop((first, other));
        assert_eq!(budget.units.available_permits() as u64, total / UNIT);
    }
}
