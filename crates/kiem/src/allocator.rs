//! The process's allocator: mimalloc (tokenization allocates many small buffers on many
//! threads, which glibc's allocator serializes), with large buffers mapped straight from the
//! system. A zeroed mapping costs nothing until written: a model's parameter buffer, most of
//! which a quantized model never writes, must not be touched by the allocator (mimalloc zeroes
//! a large `alloc_zeroed` by hand, which made decoding a 4-bit GGUF peak at its fp32 size).
//! Freeing a mapping also returns its memory at once.

use std::alloc::{GlobalAlloc, Layout};

use mimalloc::MiMalloc;

pub struct Allocator;

/// Buffers of at least this many bytes get pages of their own.
const OWN_PAGES: usize = 32 << 20;

/// Whether `layout` is served by its own mapping (page-aligned, so any alignment up to a page).
fn own_pages(layout: Layout) -> bool {
    cfg!(unix) && layout.size() >= OWN_PAGES && layout.align() <= 4096
}

#[cfg(unix)]
unsafe fn map(size: usize) -> *mut u8 {
    // SAFETY: an anonymous private mapping touches no existing memory.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        std::ptr::null_mut()
    } else {
        p.cast()
    }
}

#[cfg(not(unix))]
unsafe fn map(_size: usize) -> *mut u8 {
    unreachable!("own pages are for unix only")
}

#[cfg(unix)]
unsafe fn unmap(ptr: *mut u8, size: usize) {
    // SAFETY: `ptr` is a mapping of `size` bytes made by `map`, no longer used.
    unsafe { libc::munmap(ptr.cast(), size) };
}

#[cfg(not(unix))]
unsafe fn unmap(_ptr: *mut u8, _size: usize) {
    unreachable!("own pages are for unix only")
}

// SAFETY: every block comes from mimalloc or from a mapping of its own, decided by its layout,
// and goes back to where it came from (dealloc and realloc receive the layout it was made with).
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if own_pages(layout) {
            // SAFETY: a fresh mapping of the layout's size.
            unsafe { map(layout.size()) }
        } else {
            // SAFETY: the caller's contract, passed on.
            unsafe { MiMalloc.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if own_pages(layout) {
            // SAFETY: as above; a fresh anonymous mapping reads zero.
            unsafe { map(layout.size()) }
        } else {
            // SAFETY: the caller's contract, passed on.
            unsafe { MiMalloc.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if own_pages(layout) {
            // SAFETY: made by `map` with this size (same layout).
            unsafe { unmap(ptr, layout.size()) }
        } else {
            // SAFETY: made by mimalloc with this layout.
            unsafe { MiMalloc.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees a valid size for this alignment.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        if !own_pages(layout) && !own_pages(new_layout) {
            // SAFETY: the caller's contract, passed on.
            return unsafe { MiMalloc.realloc(ptr, layout, new_size) };
        }
        // SAFETY: a new block from the right place, the old contents copied, the old block
        // returned to where it came from.
        unsafe {
            let new = self.alloc(new_layout);
            if !new.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            new
        }
    }
}
