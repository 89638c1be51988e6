//! Arrays of plain numbers held in memory or mapped read-only from a file, so
//! that a built index can be cached and shared by every process that reads it
//! (the page cache holds one copy) without parsing or copying.
//!
//! "Plain" is [`bytemuck::Pod`]: every bit pattern a valid value, no padding,
//! so the bytes of a file can be viewed in place as values and back.

use std::{ops::Deref, sync::Arc};

use bytemuck::Pod;

/// A read-only array: owned, or a range of a mapped file.
pub enum Slab<T: Pod> {
    Owned(Vec<T>),
    Mapped {
        map: Arc<memmap2::Mmap>,
        offset: usize,
        len: usize,
    },
}

impl<T: Pod> Slab<T> {
    /// `len` values at byte `offset` of `map`; `None` unless the range lies
    /// inside the map and is aligned for `T`.
    pub fn mapped(map: &Arc<memmap2::Mmap>, offset: usize, len: usize) -> Option<Self> {
        let bytes = len.checked_mul(std::mem::size_of::<T>())?;
        let end = offset.checked_add(bytes)?;
        let range = map.get(offset..end)?;
        bytemuck::try_cast_slice::<u8, T>(range).ok()?;
        Some(Slab::Mapped {
            map: map.clone(),
            offset,
            len,
        })
    }

    /// The values as bytes, in this machine's byte order (what [`Slab::mapped`] reads back).
    pub fn as_bytes(&self) -> &[u8] {
        bytemuck::cast_slice(self)
    }
}

impl<T: Pod> Deref for Slab<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match self {
            Slab::Owned(v) => v,
            // `mapped` checked that the range lies inside the map and is aligned.
            Slab::Mapped { map, offset, len } => {
                bytemuck::cast_slice(&map[*offset..*offset + *len * std::mem::size_of::<T>()])
            }
        }
    }
}

impl<T: Pod> From<Vec<T>> for Slab<T> {
    fn from(v: Vec<T>) -> Self {
        Slab::Owned(v)
    }
}
