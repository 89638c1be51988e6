//! Arrays of plain numbers held in memory or mapped read-only from a file, so
//! that a built index can be cached and shared by every process that reads it
//! (the page cache holds one copy) without parsing or copying.

use std::{ops::Deref, sync::Arc};

/// Types every bit pattern of which is a valid value, with no padding: they can
/// be viewed in place in a mapped file.
///
/// # Safety
/// Implement only for such types (integers, floats, arrays and `repr(C)`
/// structs of them without padding).
pub unsafe trait Plain: Copy + 'static {}

// SAFETY: integers, floats and arrays of them accept any bit pattern and have no padding.
unsafe impl Plain for u32 {}
unsafe impl Plain for f64 {}
unsafe impl Plain for [f64; 3] {}
unsafe impl Plain for [u8; 8] {}
// SAFETY: `LatLon` is `repr(C)` of two f64.
unsafe impl Plain for crate::geo::LatLon {}

/// A read-only array: owned, or a range of a mapped file.
pub enum Slab<T: Plain> {
    Owned(Vec<T>),
    Mapped {
        map: Arc<memmap2::Mmap>,
        offset: usize,
        len: usize,
    },
}

impl<T: Plain> Slab<T> {
    /// `len` values at byte `offset` of `map`; `None` unless the range lies
    /// inside the map and is aligned for `T`.
    pub fn mapped(map: &Arc<memmap2::Mmap>, offset: usize, len: usize) -> Option<Self> {
        let bytes = len.checked_mul(std::mem::size_of::<T>())?;
        let end = offset.checked_add(bytes)?;
        let aligned = (map.as_ptr() as usize + offset).is_multiple_of(std::mem::align_of::<T>());
        (end <= map.len() && aligned).then(|| Slab::Mapped {
            map: map.clone(),
            offset,
            len,
        })
    }

    /// The values as bytes, in this machine's byte order (what [`Slab::mapped`] reads back).
    pub fn as_bytes(&self) -> &[u8] {
        let s: &[T] = self;
        // SAFETY: `T: Plain` has no padding, so every byte of the slice is initialised.
        unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
    }
}

impl<T: Plain> Deref for Slab<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match self {
            Slab::Owned(v) => v,
            // SAFETY: `mapped` checked bounds and alignment; the map is read-only
            // and lives as long as `self`; `T: Plain` accepts any bytes.
            Slab::Mapped { map, offset, len } => unsafe {
                std::slice::from_raw_parts(map.as_ptr().add(*offset).cast::<T>(), *len)
            },
        }
    }
}

impl<T: Plain> From<Vec<T>> for Slab<T> {
    fn from(v: Vec<T>) -> Self {
        Slab::Owned(v)
    }
}
