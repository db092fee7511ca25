//! The largest single allocation a piece of code makes.
//!
//! A test binary installs [`Tracking`] as its global allocator:
//!
//! ```text
//! #[global_allocator]
//! static ALLOC: swarm_testkit::alloc::Tracking = swarm_testkit::alloc::Tracking;
//! ```
//!
//! and [`largest_allocation`] then reports what a closure allocated at most at once, on
//! the current thread (other threads' allocations are not counted).

// The one exception to the workspace's `unsafe_code = "deny"`: a global allocator is an
// unsafe trait. Every call forwards to `System`.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The system allocator, noting each allocation's size while a thread tracks.
pub struct Tracking;

thread_local! {
    /// The largest single allocation on this thread while tracking is on.
    static LARGEST: Cell<Option<usize>> = const { Cell::new(None) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|l| {
        if let Some(m) = l.get() {
            l.set(Some(m.max(size)));
        }
    });
}

// SAFETY: every call is passed on to `System` unchanged; noting a size touches only a
// `const`-initialised thread-local cell, which never allocates.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

/// Runs `f` and returns its result with the largest single allocation it made on this
/// thread (0 unless [`Tracking`] is the global allocator).
pub fn largest_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.with(|l| l.set(Some(0)));
    let r = f();
    let largest = LARGEST.with(|l| l.replace(None)).unwrap_or(0);
    (r, largest)
}
