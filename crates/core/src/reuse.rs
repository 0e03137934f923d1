//! What the device backends' buffer pools share: the size classes requests are rounded to, and
//! locking that survives a panic elsewhere.
use std::sync::{Mutex, MutexGuard};

/// The length a request for `n` elements is served with: powers of two up to 4,096, then steps
/// of a sixteenth of the next power of two (under 12.5% over), so nearby sizes share buffers.
pub fn size_class(n: usize) -> usize {
    let n = n.max(1);
    if n <= 4096 {
        return n.next_power_of_two();
    }
    let step = n.next_power_of_two() / 16;
    n.div_ceil(step) * step
}

/// `m`'s guard even if a thread panicked while holding it: for pools whose every update is one
/// push, pop, insert or removal, so the data stays consistent.
pub fn lock_unpoisoned<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_cover_the_request_with_bounded_waste() {
        for n in (0..20_000).chain([151_936, 1 << 20, 3 * 1024 * 1024 + 5]) {
            let c = size_class(n);
            assert!(c >= n.max(1), "{n} -> {c}");
            if n > 64 {
                assert!(
                    (c - n) as f64 <= 0.126 * n as f64 || n <= 4096,
                    "{n} -> {c}"
                );
            }
            assert_eq!(size_class(c), c, "classes are fixed points");
        }
    }
}
