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

use kpsc_common::proxy_kernel::{ConnSlot, RESUME_NONE};

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

impl Slot<'_> {
    fn u64_at(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: an aligned u64 field of a live slot (offsets from offset_of!), only ever
        // accessed atomically here; the verdict's plain stores of aligned u64s are single
        // instructions.
        unsafe { AtomicU64::from_ptr(self.ptr.cast::<u8>().add(offset).cast()) }
    }

    fn u32_at(&self, offset: usize) -> &AtomicU32 {
        // SAFETY: as `u64_at`, for an aligned u32 field.
        unsafe { AtomicU32::from_ptr(self.ptr.cast::<u8>().add(offset).cast()) }
    }

    /// A fresh slot for a new connection, before its sockets enter the maps.
    pub fn reset(&self, generation: u32) {
        for offset in [
            offset_of!(ConnSlot, seen),
            offset_of!(ConnSlot, redirected_bytes),
            offset_of!(ConnSlot, redirected_frames),
            offset_of!(ConnSlot, pass_from),
            offset_of!(ConnSlot, frames_before_pass),
            offset_of!(ConnSlot, passed_bytes),
        ] {
            self.u64_at(offset).store(0, Ordering::Relaxed);
        }
        for offset in [
            offset_of!(ConnSlot, frame_left),
            offset_of!(ConnSlot, mode),
            offset_of!(ConnSlot, pass_epoch),
            offset_of!(ConnSlot, pass_tail),
        ] {
            self.u32_at(offset).store(0, Ordering::Relaxed);
        }
        self.u32_at(offset_of!(ConnSlot, generation))
            .store(generation, Ordering::Relaxed);
        self.u64_at(offset_of!(ConnSlot, resume_at))
            .store(RESUME_NONE, Ordering::Release);
    }

    /// Where the latest stretch passed to kpscd began: (epoch, offset, tail bytes of a
    /// redirected frame, frames reported before it).
    pub fn pass(&self) -> Pass {
        // Acquire on the epoch: the verdict wrote the other fields before it, and before
        // the bytes kpscd has just read were queued.
        let epoch = self
            .u32_at(offset_of!(ConnSlot, pass_epoch))
            .load(Ordering::Acquire);
        Pass {
            epoch,
            from: self
                .u64_at(offset_of!(ConnSlot, pass_from))
                .load(Ordering::Acquire),
            tail: self
                .u32_at(offset_of!(ConnSlot, pass_tail))
                .load(Ordering::Acquire),
            frames_before: self
                .u64_at(offset_of!(ConnSlot, frames_before_pass))
                .load(Ordering::Acquire),
        }
    }

    /// Bytes the verdict redirected to the broker socket so far.
    pub fn redirected_bytes(&self) -> u64 {
        self.u64_at(offset_of!(ConnSlot, redirected_bytes))
            .load(Ordering::Acquire)
    }

    /// Frames the verdict has reported so far.
    pub fn redirected_frames(&self) -> u64 {
        self.u64_at(offset_of!(ConnSlot, redirected_frames))
            .load(Ordering::Acquire)
    }

    /// Bytes of the frame being redirected that have not arrived yet.
    pub fn frame_left(&self) -> u32 {
        self.u32_at(offset_of!(ConnSlot, frame_left))
            .load(Ordering::Acquire)
    }

    /// Gives the stream back to the kernel from `offset`, a frame boundary up to which
    /// kpscd has written every passed byte to the broker.
    pub fn resume_at(&self, offset: u64) {
        self.u64_at(offset_of!(ConnSlot, resume_at))
            .store(offset, Ordering::Release);
    }
}

/// See `Slot::pass`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pass {
    pub epoch: u32,
    pub from: u64,
    pub tail: u32,
    pub frames_before: u64,
}
