//! The verdict's per-connection slots (`PROXY_SLOTS`), mapped into kpscd's memory: kpscd
//! reads what the verdict wrote and writes `resume_at` without a syscall. Every access is
//! atomic, since the verdict writes the same memory from softirq context.

use std::{
    io,
    mem::offset_of,
    os::fd::{AsRawFd, BorrowedFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
};

use kpsc_common::proxy_kernel::{ConnSlot, MODE_KERNEL, RESUME_NONE, StreamState};

pub struct Slots {
    base: NonNull<ConnSlot>,
    len: usize,
    count: u32,
}

// SAFETY: the mapping lives as long as Slots, and every access through it is atomic.
unsafe impl Send for Slots {}
// SAFETY: as above.
unsafe impl Sync for Slots {}

impl Slots {
    /// Maps `count` slots of an mmap-able BPF array (BPF_F_MMAPABLE).
    pub fn map(fd: BorrowedFd<'_>, count: u32) -> io::Result<Self> {
        // Array values are laid out at 8-byte strides; ConnSlot is a multiple of 8.
        const _: () = assert!(size_of::<ConnSlot>().is_multiple_of(8));
        let len = size_of::<ConnSlot>() * count as usize;
        // SAFETY: a fresh shared mapping of the map's fd; the kernel checks the length.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        Ok(Self { base, len, count })
    }

    pub fn get(&self, index: u32) -> Slot<'_> {
        assert!(index < self.count, "slot {index} out of range");
        // SAFETY: in bounds of the mapping (checked above).
        Slot {
            ptr: unsafe { self.base.as_ptr().add(index as usize) },
            _slots: self,
        }
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// One connection's slot.
pub struct Slot<'a> {
    ptr: *mut ConnSlot,
    _slots: &'a Slots,
}

// SAFETY: a view into the mapping `Slots` owns (Send and Sync), borrowed for its life;
// every access through it is atomic.
unsafe impl Send for Slot<'_> {}
// SAFETY: as above.
unsafe impl Sync for Slot<'_> {}

impl Slot<'_> {
    fn u64_at(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: an aligned u64 field of a live slot (offsets from offset_of!), only ever
        // accessed atomically here; the verdicts' plain stores of aligned u64s are single
        // instructions.
        unsafe { AtomicU64::from_ptr(self.ptr.cast::<u8>().add(offset).cast()) }
    }

    fn u32_at(&self, offset: usize) -> &AtomicU32 {
        // SAFETY: as `u64_at`, for an aligned u32 field.
        unsafe { AtomicU32::from_ptr(self.ptr.cast::<u8>().add(offset).cast()) }
    }

    /// A fresh slot for a new connection, before its sockets enter the maps.
    pub fn reset(&self, generation: u32) {
        for direction in [self.requests(), self.responses()] {
            direction.reset();
        }
        for offset in [
            offset_of!(ConnSlot, expect_tail),
            offset_of!(ConnSlot, expect_head),
            offset_of!(ConnSlot, pass_marker),
        ] {
            self.u64_at(offset).store(0, Ordering::Relaxed);
        }
        self.u32_at(offset_of!(ConnSlot, stopped))
            .store(0, Ordering::Relaxed);
        self.u32_at(offset_of!(ConnSlot, generation))
            .store(generation, Ordering::Release);
    }

    /// Tells the request verdict to carry nothing more.
    pub fn stop(&self) {
        self.u32_at(offset_of!(ConnSlot, stopped))
            .store(1, Ordering::Release);
    }

    /// The client's requests.
    pub fn requests(&self) -> Direction<'_> {
        Direction {
            slot: self,
            base: offset_of!(ConnSlot, requests),
        }
    }

    /// The broker's responses.
    pub fn responses(&self) -> Direction<'_> {
        Direction {
            slot: self,
            base: offset_of!(ConnSlot, responses),
        }
    }

    /// Ring position of the marker the request verdict pushed for its latest stretch.
    pub fn pass_marker(&self) -> u64 {
        self.u64_at(offset_of!(ConnSlot, pass_marker))
            .load(Ordering::Acquire)
    }

    /// Expectations whose response has been dealt with (the ring's head).
    pub fn expect_head(&self) -> u64 {
        self.u64_at(offset_of!(ConnSlot, expect_head))
            .load(Ordering::Acquire)
    }

    /// Moves the ring's head: only while the response verdict does not have the stream.
    pub fn set_expect_head(&self, head: u64) {
        self.u64_at(offset_of!(ConnSlot, expect_head))
            .store(head, Ordering::Release);
    }

    /// Moves the ring's head forward to `head` (never back): while kpscd delivers, the
    /// response verdict does not move it, and the request verdict sees the room.
    pub fn advance_expect_head(&self, head: u64) {
        self.u64_at(offset_of!(ConnSlot, expect_head))
            .fetch_max(head, Ordering::AcqRel);
    }

    /// Moves the ring's head past the entry at `at` if it is there (the verdict, while it
    /// has the stream, only ever stores a larger head).
    pub fn pass_over_expectation(&self, at: u64) {
        let _ = self
            .u64_at(offset_of!(ConnSlot, expect_head))
            .compare_exchange(at, at + 1, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// One direction's `StreamState` in a slot.
pub struct Direction<'a> {
    slot: &'a Slot<'a>,
    base: usize,
}

impl Direction<'_> {
    fn u64_field(&self, offset: usize) -> &AtomicU64 {
        self.slot.u64_at(self.base + offset)
    }

    fn u32_field(&self, offset: usize) -> &AtomicU32 {
        self.slot.u32_at(self.base + offset)
    }

    fn reset(&self) {
        for offset in [
            offset_of!(StreamState, seen),
            offset_of!(StreamState, redirected_bytes),
            offset_of!(StreamState, redirected_frames),
            offset_of!(StreamState, pass_from),
            offset_of!(StreamState, frames_before_pass),
            offset_of!(StreamState, passed_bytes),
        ] {
            self.u64_field(offset).store(0, Ordering::Relaxed);
        }
        for offset in [
            offset_of!(StreamState, frame_left),
            offset_of!(StreamState, mode),
            offset_of!(StreamState, pass_epoch),
            offset_of!(StreamState, pass_tail),
            offset_of!(StreamState, hold),
        ] {
            self.u32_field(offset).store(0, Ordering::Relaxed);
        }
        self.u64_field(offset_of!(StreamState, resume_at))
            .store(RESUME_NONE, Ordering::Release);
    }

    /// Where the latest stretch passed to kpscd began: (epoch, offset, tail bytes of a
    /// redirected frame, frames redirected before it).
    pub fn pass(&self) -> Pass {
        // Acquire on the epoch: the verdict wrote the other fields before it, and before
        // the bytes kpscd has just read were queued.
        let epoch = self
            .u32_field(offset_of!(StreamState, pass_epoch))
            .load(Ordering::Acquire);
        Pass {
            epoch,
            from: self
                .u64_field(offset_of!(StreamState, pass_from))
                .load(Ordering::Acquire),
            tail: self
                .u32_field(offset_of!(StreamState, pass_tail))
                .load(Ordering::Acquire),
            frames_before: self
                .u64_field(offset_of!(StreamState, frames_before_pass))
                .load(Ordering::Acquire),
        }
    }

    /// Bytes the verdict passed to kpscd so far.
    pub fn passed_bytes(&self) -> u64 {
        self.u64_field(offset_of!(StreamState, passed_bytes))
            .load(Ordering::Acquire)
    }

    /// Bytes the verdict redirected to the peer socket so far.
    pub fn redirected_bytes(&self) -> u64 {
        self.u64_field(offset_of!(StreamState, redirected_bytes))
            .load(Ordering::Acquire)
    }

    /// Frames whose head the verdict redirected so far.
    pub fn redirected_frames(&self) -> u64 {
        self.u64_field(offset_of!(StreamState, redirected_frames))
            .load(Ordering::Acquire)
    }

    /// Bytes of the frame being redirected that have not arrived yet.
    pub fn frame_left(&self) -> u32 {
        self.u32_field(offset_of!(StreamState, frame_left))
            .load(Ordering::Acquire)
    }

    /// True while the verdict has the stream.
    pub fn in_kernel(&self) -> bool {
        self.u32_field(offset_of!(StreamState, mode))
            .load(Ordering::Acquire)
            == MODE_KERNEL
    }

    /// Asks the verdict for the stream (or lets it take it back): see `StreamState::hold`.
    pub fn hold(&self, hold: bool) {
        self.u32_field(offset_of!(StreamState, hold))
            .store(u32::from(hold), Ordering::Release);
    }

    /// Whether kpscd holds the stream.
    pub fn held(&self) -> bool {
        self.u32_field(offset_of!(StreamState, hold))
            .load(Ordering::Acquire)
            != 0
    }

    /// Gives the stream back to the kernel from `offset`, a frame boundary up to which
    /// kpscd has written every passed byte to the peer.
    pub fn resume_at(&self, offset: u64) {
        self.u64_field(offset_of!(StreamState, resume_at))
            .store(offset, Ordering::Release);
    }
}

/// See `Direction::pass`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pass {
    pub epoch: u32,
    pub from: u64,
    pub tail: u32,
    pub frames_before: u64,
}
