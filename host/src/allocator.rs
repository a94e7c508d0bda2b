//! The `orchestrator` binary's global allocator: mimalloc for the many small
//! blocks a request allocates and frees, the system allocator for large
//! ones.
//!
//! # Why two allocators
//!
//! Under load the host allocates and frees per request on every runtime
//! thread (HTTP heads and bodies, the envelope's strings, SSE events,
//! metric labels). With glibc's allocator, `malloc` and `free` were ~13 %
//! of the host's CPU in a profile of the plain upstream path;
//! mimalloc's thread-local free lists do the same work for
//! less. But mimalloc keeps freed memory in its segments and returns it to
//! the operating system only later, on some later allocation: a host that
//! refused a 100 MiB plugin output kept ~110 MiB resident with mimalloc
//! alone (`tests/sandbox.rs` caught it), where glibc unmaps a block that
//! large the moment it is freed.
//!
//! So a block of [`LARGE`] bytes or more goes to the system allocator,
//! which maps it on its own and unmaps it on `free`; everything smaller
//! goes to mimalloc. Nothing the host allocates per request comes near
//! [`LARGE`]; blocks that size are a plugin's oversized output or a long
//! prompt, where the cost of a `mmap` is small beside the copy.
//!
//! # Correctness
//!
//! [`GlobalAlloc`] passes `dealloc` and `realloc` the same layout the block
//! was allocated with, so the size alone says which allocator owns a
//! block. A `realloc` that crosses [`LARGE`] moves the block between the
//! two (allocate, copy, free), which is what either would do for a block
//! that size anyway.

use std::alloc::{GlobalAlloc, Layout, System};

use mimalloc::MiMalloc;

/// The size from which a block goes to the system allocator: 1 MiB, far
/// above glibc's initial mmap threshold (128 KiB), so such blocks are
/// mapped on their own and returned on `free`.
pub const LARGE: usize = 1 << 20;

/// mimalloc below [`LARGE`] bytes, the system allocator from there on
/// (see the module docs).
///
/// ```ignore
/// #[global_allocator]
/// static ALLOCATOR: orchestrator::allocator::Allocator = orchestrator::allocator::Allocator;
/// ```
pub struct Allocator;

impl Allocator {
    fn is_large(size: usize) -> bool {
        size >= LARGE
    }
}

// SAFETY: every block is freed (or reallocated) by the allocator that
// allocated it, chosen by its size, which the caller must pass unchanged
// (the `GlobalAlloc` contract); both allocators uphold `GlobalAlloc`'s
// contract themselves.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's `layout` has a non-zero size.
        unsafe {
            if Self::is_large(layout.size()) {
                System.alloc(layout)
            } else {
                MiMalloc.alloc(layout)
            }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        unsafe {
            if Self::is_large(layout.size()) {
                System.alloc_zeroed(layout)
            } else {
                MiMalloc.alloc_zeroed(layout)
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated with `layout`, so by the allocator
        // its size selects.
        unsafe {
            if Self::is_large(layout.size()) {
                System.dealloc(ptr, layout)
            } else {
                MiMalloc.dealloc(ptr, layout)
            }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let was_large = Self::is_large(layout.size());
        // SAFETY: `ptr` was allocated with `layout` by the allocator its
        // size selects; a block that stays on one side is reallocated by
        // that allocator, one that crosses `LARGE` is moved.
        unsafe {
            match (was_large, Self::is_large(new_size)) {
                (true, true) => System.realloc(ptr, layout, new_size),
                (false, false) => MiMalloc.realloc(ptr, layout, new_size),
                _ => {
                    let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
                    let new = self.alloc(new_layout);
                    if !new.is_null() {
                        std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    new
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks grow and shrink across [`LARGE`] with their contents intact.
    #[test]
    fn realloc_across_the_threshold_keeps_the_contents() {
        let allocator = Allocator;
        let layout = Layout::from_size_align(LARGE - 8, 16).unwrap();
        // SAFETY: non-zero sizes; each block is freed with its layout.
        unsafe {
            let small = allocator.alloc(layout);
            assert!(!small.is_null());
            for i in 0..layout.size() {
                *small.add(i) = (i % 251) as u8;
            }
            let large = allocator.realloc(small, layout, 2 * LARGE);
            assert!(!large.is_null());
            assert_eq!(large as usize % 16, 0);
            for i in 0..layout.size() {
                assert_eq!(*large.add(i), (i % 251) as u8);
            }
            let large_layout = Layout::from_size_align(2 * LARGE, 16).unwrap();
            let back = allocator.realloc(large, large_layout, 64);
            assert!(!back.is_null());
            for i in 0..64 {
                assert_eq!(*back.add(i), (i % 251) as u8);
            }
            allocator.dealloc(back, Layout::from_size_align(64, 16).unwrap());
            let zeroed = allocator.alloc_zeroed(large_layout);
            assert!(!zeroed.is_null());
            assert!((0..large_layout.size()).all(|i| *zeroed.add(i) == 0));
            allocator.dealloc(zeroed, large_layout);
        }
    }
}
