//! The global allocator of every binary that links this crate: the system allocator, plus a
//! per-thread record of the largest single request. A buffer sized from a corrupt header shows
//! up here as one huge request; recording it lets the harness fail the property (and shrink the
//! input) for requests that still succeed, instead of learning of them only when one is so large
//! that the allocation fails and the process aborts.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

pub struct Guard;

#[global_allocator]
static GUARD: Guard = Guard;

thread_local! {
    // `const` with a type without `Drop`: no lazy initialisation and no destructor registration,
    // so the allocator can touch it without allocating.
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|c| {
        if size > c.get() {
            c.set(size);
        }
    });
}

/// The largest request made on this thread since the last call, and resets it.
pub fn take_largest() -> usize {
    LARGEST.try_with(|c| c.replace(0)).unwrap_or(0)
}

// SAFETY: every call is forwarded unchanged to `System`; `note` neither allocates nor unwinds.
unsafe impl GlobalAlloc for Guard {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn records_the_largest_request_per_thread() {
        super::take_largest();
        let v: Vec<u8> = Vec::with_capacity(3 << 20);
        drop(v);
        assert!(super::take_largest() >= 3 << 20);
        assert!(super::take_largest() < 3 << 20, "reset after taking");
        let other = std::thread::spawn(|| {
            let _v: Vec<u8> = Vec::with_capacity(5 << 20);
        });
        other.join().unwrap();
        assert!(super::take_largest() < 5 << 20, "another thread's request");
    }
}
