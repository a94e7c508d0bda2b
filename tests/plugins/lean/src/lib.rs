//! The `touch` guest's bare call without Rust's `std`: a `request-stage`
//! component that imports no WASI interface at all (only what the world
//! names), for the benchmarks' fresh-instance cost. A bump allocator over
//! `memory.grow` is all it needs.

#![no_std]

extern crate alloc;

use core::alloc::{GlobalAlloc, Layout};
use core::cell::Cell;

wit_bindgen::generate!({ world: "request-stage", path: "../../../wit", generate_all });

/// Allocates by growing memory one page at a time and never frees: an
/// instance of this guest serves a handful of calls in the benchmarks.
struct Bump {
    next: Cell<usize>,
    end: Cell<usize>,
}

// Single-threaded wasm.
unsafe impl Sync for Bump {}

unsafe impl GlobalAlloc for Bump {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let start = (self.next.get() + layout.align() - 1) & !(layout.align() - 1);
        let end = start + layout.size();
        if end > self.end.get() {
            let pages = (end - self.end.get()).div_ceil(65536).max(1);
            let previous = core::arch::wasm32::memory_grow(0, pages);
            if previous == usize::MAX {
                return core::ptr::null_mut();
            }
            if self.end.get() == 0 {
                // First growth: start at the new pages.
                self.next.set(previous * 65536);
                self.end.set((previous + pages) * 65536);
                return unsafe { self.alloc(layout) };
            }
            self.end.set(self.end.get() + pages * 65536);
        }
        self.next.set(end);
        start as *mut u8
    }

    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: Layout) {}
}

#[global_allocator]
static ALLOCATOR: Bump = Bump {
    next: Cell::new(0),
    end: Cell::new(0),
};

/// The canonical ABI's allocation entry point (with `std`, wit-bindgen
/// links one in).
///
/// # Safety
/// Called by the host with the canonical ABI's arguments.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cabi_realloc(
    old: *mut u8,
    old_len: usize,
    align: usize,
    new_len: usize,
) -> *mut u8 {
    if new_len == 0 {
        return align as *mut u8;
    }
    let new = unsafe { ALLOCATOR.alloc(Layout::from_size_align_unchecked(new_len, align)) };
    if !old.is_null() && !new.is_null() {
        unsafe { core::ptr::copy_nonoverlapping(old, new, old_len.min(new_len)) };
    }
    new
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    core::arch::wasm32::unreachable()
}

struct Component;

impl Guest for Component {
    fn init(
        _config: alloc::vec::Vec<(alloc::string::String, alloc::string::String)>,
    ) -> Result<(), alloc::string::String> {
        Ok(())
    }

    fn process(_request: &Request) -> Result<(), StageError> {
        Ok(())
    }
}

export!(Component);
