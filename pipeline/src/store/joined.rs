//! The output's join held in memory, for both dialects' exports: an import's
//! lookups as a hash table from coordinate to answer, against which the points
//! are read in row order (`sqlite/export.rs`, `postgres_export.rs`).
//!
//! An answer is kept as two packed parts, each stored once and shared: its own
//! columns (status, postcode, outcode, incode, error), shared by the
//! coordinates with the same answer, and its 16 area columns, shared by every
//! postcode in the same areas (an LSOA's postcodes: tens of thousands of
//! distinct sets where there are hundreds of thousands of postcodes).

use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
};

use foldhash::fast::RandomState;
use indexmap::{Equivalent, IndexSet};

use crate::{lookup::Area, model::RowStatus, store::records::ResultRef};

/// Memory an in-memory join may hold (hash tables and packed answers), bytes.
/// Each table is a power of two of 33-byte slots within it. 160 MiB since
/// answers carry the area codes (19 packed columns): at 128 MiB the 1M-row
/// benchmark file (375 k distinct answers) no longer fitted on SQLite and fell
/// back to the view's join, 9–10 s end to end instead of 6.4 s, for the same
/// peak RSS of `local` (about 247 MiB, the enrichers' postcode index). The
/// areas are kept apart from the answers (issue 17): answers from
/// postcodes.io carry all 16 area columns, which the postcodes of one LSOA
/// share.
pub const JOIN_BUDGET_BYTES: usize = 160 << 20;

/// The packed columns of an answer ([`super::columns::PACKED`]): status,
/// postcode, [`Area::COLUMNS`], error.
pub(crate) const PACKED: usize = 2 + Area::COLUMNS.len() + 1;
/// Of those, the answer's own: status, postcode, outcode, incode, error. The
/// other 16 (country … msoa_code) are the postcode's areas, which tens of
/// thousands of postcodes share: kept once per distinct set of areas.
pub(crate) const OWN: [usize; 5] = [0, 1, 2, 3, PACKED - 1];
pub(crate) const AREAS: usize = PACKED - OWN.len();
const _: () = assert!(
    OWN[2] == 2 && OWN[3] == 3 && OWN[3] + 1 + AREAS == PACKED - 1,
    "the areas lie between incode and error"
);

/// The indexes in [`PACKED`] of an answer's own columns.
pub(crate) fn own_columns() -> impl Iterator<Item = usize> {
    OWN.into_iter()
}

/// The indexes in [`PACKED`] of an answer's area columns.
pub(crate) fn area_columns() -> std::ops::Range<usize> {
    OWN[3] + 1..PACKED - 1
}

/// Text columns in one allocation: `ends[i]` is where column i ends in `text`;
/// bit i of `nulls` marks a NULL.
#[derive(PartialEq, Eq)]
pub(crate) struct Packed<const N: usize> {
    text: Box<str>,
    ends: [u32; N],
    nulls: u32,
}

/// Columns being read, before they are known to be new.
struct PackedRef<'a, const N: usize> {
    text: &'a str,
    ends: [u32; N],
    nulls: u32,
}

impl<const N: usize> Hash for Packed<N> {
    fn hash<H: Hasher>(&self, h: &mut H) {
        PackedRef {
            text: &self.text,
            ends: self.ends,
            nulls: self.nulls,
        }
        .hash(h)
    }
}

impl<const N: usize> Hash for PackedRef<'_, N> {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.text.hash(h);
        self.ends.hash(h);
        self.nulls.hash(h);
    }
}

impl<const N: usize> Equivalent<Packed<N>> for PackedRef<'_, N> {
    fn equivalent(&self, a: &Packed<N>) -> bool {
        self.text == &*a.text && self.ends == a.ends && self.nulls == a.nulls
    }
}

impl<const N: usize> Packed<N> {
    fn column(&self, i: usize) -> Option<&str> {
        if self.nulls & (1 << i) != 0 {
            return None;
        }
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        Some(&self.text[start..self.ends[i] as usize])
    }
}

/// Columns packed into a text: where each ends in it, and the NULLs.
pub(crate) type Packing<const N: usize> = ([u32; N], u32);

/// Packs `values` (`None`: NULL; at most `N`) into `text` (cleared first).
/// Errors: `values`' (a value that is not text), or columns over 4 GiB.
pub(crate) fn pack<'v, const N: usize>(
    values: impl Iterator<Item = anyhow::Result<Option<&'v str>>>,
    text: &mut String,
) -> anyhow::Result<Packing<N>> {
    text.clear();
    let (mut ends, mut nulls) = ([0u32; N], 0u32);
    for ((i, end), value) in ends.iter_mut().enumerate().zip(values) {
        match value? {
            None => nulls |= 1 << i,
            Some(v) => text.push_str(v),
        }
        *end = u32::try_from(text.len())?;
    }
    Ok((ends, nulls))
}

/// Distinct packed values, each kept once, by index.
pub(crate) struct Distinct<const N: usize>(IndexSet<Packed<N>, RandomState>);

impl<const N: usize> Default for Distinct<N> {
    fn default() -> Self {
        Distinct(IndexSet::default())
    }
}

impl<const N: usize> Distinct<N> {
    /// The index of `text` packed as `packing`, added when new (its bytes
    /// counted in `bytes`, twice for the growth of the set); `None` once
    /// `bytes` would pass `budget`.
    pub(crate) fn index(
        &mut self,
        text: &str,
        (ends, nulls): Packing<N>,
        bytes: &mut usize,
        budget: usize,
    ) -> Option<u32> {
        let found = PackedRef { text, ends, nulls };
        if let Some(i) = self.0.get_index_of(&found) {
            return Some(i as u32);
        }
        *bytes += text.len() + 2 * (std::mem::size_of::<Packed<N>>() + 8 + 8);
        if *bytes > budget {
            return None;
        }
        Some(
            self.0
                .insert_full(Packed {
                    text: text.into(),
                    ends,
                    nulls,
                })
                .0 as u32,
        )
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    fn get(&self, i: u32) -> &Packed<N> {
        &self.0[i as usize]
    }
}

/// An answer: its own columns and its areas, each shared with every coordinate
/// (own) or postcode (areas) that has the same.
pub(crate) struct Answer<'a> {
    own: &'a Packed<{ OWN.len() }>,
    areas: &'a Packed<AREAS>,
}

impl Answer<'_> {
    /// Column `i` in [`PACKED`] order.
    fn column(&self, i: usize) -> Option<&str> {
        match OWN.iter().position(|&o| o == i) {
            Some(k) => self.own.column(k),
            None => self.areas.column(i - OWN[3] - 1),
        }
    }
}

/// A coordinate as the join key: the bit patterns, with −0.0 made +0.0 (SQL
/// compares them equal).
pub(crate) fn key(lat: f64, lon: f64) -> (u64, u64) {
    ((lat + 0.0).to_bits(), (lon + 0.0).to_bits())
}

/// Bytes a hash table of `n` entries of `entry` bytes allocates (hashbrown: a
/// power-of-two bucket count at most 7/8 full, one control byte a bucket).
pub(crate) fn table_bytes(n: usize, entry: usize) -> usize {
    (n.max(1) * 8 / 7 + 1).next_power_of_two() * (entry + 1)
}

/// Bytes of a coordinate table of `n` entries ([`Answers::with_capacity`]).
pub(crate) fn coordinate_table_bytes(n: usize) -> usize {
    table_bytes(n, 32)
}

/// Answers and the coordinates that have them, within a byte budget.
#[derive(Default)]
pub(crate) struct Answers {
    /// Coordinate ([`key`]) → (own columns, areas, distance in metres or NaN).
    coordinates: HashMap<(u64, u64), (u32, u32, f64), RandomState>,
    own: Distinct<{ OWN.len() }>,
    areas: Distinct<AREAS>,
    bytes: usize,
    budget: usize,
    text: String,
}

impl Answers {
    /// Room for `n` coordinates within `budget` bytes; `None` when the table
    /// alone would pass it.
    pub(crate) fn with_capacity(n: usize, budget: usize) -> Option<Self> {
        let bytes = coordinate_table_bytes(n);
        (bytes <= budget).then(|| Answers {
            coordinates: HashMap::with_capacity_and_hasher(n, RandomState::default()),
            bytes,
            budget,
            ..Answers::default()
        })
    }

    /// Adds the answer of a coordinate: its [`PACKED`] columns, by index, from
    /// `column`, and its distance. `Ok(false)` once the budget is passed (the
    /// table is then of no use). Errors: `column`'s.
    pub(crate) fn insert<'v>(
        &mut self,
        (lat, lon): (f64, f64),
        distance_m: Option<f64>,
        mut column: impl FnMut(usize) -> anyhow::Result<Option<&'v str>>,
    ) -> anyhow::Result<bool> {
        let packing = pack(own_columns().map(&mut column), &mut self.text)?;
        let Some(o) = self.own.index(&self.text, packing, &mut self.bytes, self.budget) else {
            return Ok(false);
        };
        let packing = pack(area_columns().map(&mut column), &mut self.text)?;
        let Some(a) = self
            .areas
            .index(&self.text, packing, &mut self.bytes, self.budget)
        else {
            return Ok(false);
        };
        if self.coordinates.len() == self.coordinates.capacity() {
            // More coordinates than room was made for: the table doubles,
            // the old one held until the new is filled.
            self.bytes += coordinate_table_bytes(self.coordinates.len() + 1);
            if self.bytes > self.budget {
                return Ok(false);
            }
        }
        self.coordinates
            .insert(key(lat, lon), (o, a, distance_m.unwrap_or(f64::NAN)));
        Ok(true)
    }

    /// The answer and distance (NaN for none) of a coordinate.
    pub(crate) fn get(&self, lat: f64, lon: f64) -> Option<(Answer<'_>, f64)> {
        self.coordinates.get(&key(lat, lon)).map(|&(own, areas, d)| {
            let answer = Answer {
                own: self.own.get(own),
                areas: self.areas.get(areas),
            };
            (answer, d)
        })
    }

    /// (coordinates, distinct answers, distinct sets of areas).
    pub(crate) fn sizes(&self) -> (usize, usize, usize) {
        (self.coordinates.len(), self.own.len(), self.areas.len())
    }
}

/// Answers of a list of coordinates looked up in turn (a chunk of rows):
/// each answer's parts shared, as in [`Answers`], without a budget (the
/// list bounds them).
#[derive(Default)]
pub(crate) struct ListedAnswers {
    own: Distinct<{ OWN.len() }>,
    areas: Distinct<AREAS>,
    /// (own, areas, distance in metres or NaN) of each answer found.
    answers: Vec<(u32, u32, f64)>,
    text: String,
}

impl ListedAnswers {
    /// Adds an answer as [`Answers::insert`] does; returns its index.
    pub(crate) fn push<'v>(
        &mut self,
        distance_m: Option<f64>,
        mut column: impl FnMut(usize) -> anyhow::Result<Option<&'v str>>,
    ) -> anyhow::Result<u32> {
        let packing = pack(own_columns().map(&mut column), &mut self.text)?;
        let o = self
            .own
            .index(&self.text, packing, &mut 0, usize::MAX)
            .unwrap_or_default();
        let packing = pack(area_columns().map(&mut column), &mut self.text)?;
        let a = self
            .areas
            .index(&self.text, packing, &mut 0, usize::MAX)
            .unwrap_or_default();
        self.answers.push((o, a, distance_m.unwrap_or(f64::NAN)));
        Ok(self.answers.len() as u32 - 1)
    }

    /// The answer and distance (NaN for none) at `index` ([`u32::MAX`]: none).
    pub(crate) fn get(&self, index: u32) -> Option<(Answer<'_>, f64)> {
        let &(own, areas, d) = self.answers.get(index as usize)?;
        let answer = Answer {
            own: self.own.get(own),
            areas: self.areas.get(areas),
        };
        Some((answer, d))
    }
}

/// A row of the output, as `point_results` gives it, from its point's columns
/// (`invalid`: the point's status is `invalid`; `error`: the point's) and
/// its coordinate's answer and distance (NaN for none), if found.
/// Errors: a stored status that is not one.
pub(crate) fn result_row<'a>(
    row_number: i64,
    fields: &'a str,
    invalid: bool,
    error: Option<&'a str>,
    found: Option<&'a (Answer<'a>, f64)>,
) -> anyhow::Result<ResultRef<'a>> {
    let column = |i: usize| found.and_then(|(a, _)| a.column(i));
    let mut area = [None; Area::COLUMNS.len()];
    for (i, v) in area.iter_mut().enumerate() {
        *v = column(2 + i);
    }
    Ok(ResultRef {
        row_number,
        fields,
        status: if invalid {
            RowStatus::Invalid
        } else {
            status(column(0))?
        },
        postcode: column(1),
        distance_m: found.map(|(_, d)| *d).filter(|d| !d.is_nan()),
        area,
        error: error.or(column(PACKED - 1)),
    })
}

/// A stored status (`None`, a row without a lookup, is pending).
pub(crate) fn status(text: Option<&str>) -> anyhow::Result<RowStatus> {
    Ok(text.map(str::parse).transpose()?.unwrap_or(RowStatus::Pending))
}
