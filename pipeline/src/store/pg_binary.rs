//! PostgreSQL's binary `COPY` format, read (`COPY … TO STDOUT (FORMAT
//! binary)`, the export) and written (`COPY … FROM STDIN (FORMAT binary)`,
//! the reader's points and the offline enricher's lookups). Source: the
//! PostgreSQL manual, `COPY`, "Binary Format": a 19-byte header (signature,
//! 32-bit flags, 32-bit extension length) and the extension; then tuples,
//! each a 16-bit count of values and for each a 32-bit length (−1: NULL) and
//! the value's bytes in the type's binary form (`int8`, `int4`, `int2`: big
//! endian; `float8`: IEEE 754 big endian; `text`: UTF-8); then a count of −1.
//!
//! Why binary (issue 17): in text the server parses every `float8` with
//! `strtod` and every value through the type's input function, and the client
//! formats them; at 1M rows that was about a tenth of the server's time in
//! `local`, and on output `float8`'s shortest round-trip text cost more than
//! the export's join.

/// Tuples of the binary format being written, with its header first; [`Self::finish`] adds the end.
pub(super) struct Tuples {
    pub buf: Vec<u8>,
}

impl Tuples {
    /// The header, with room for `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        let mut buf = Vec::with_capacity(capacity);
        buf.extend_from_slice(SIGNATURE);
        buf.extend_from_slice(&0u32.to_be_bytes()); // flags: no OIDs
        buf.extend_from_slice(&0u32.to_be_bytes()); // no extension
        Tuples { buf }
    }

    /// Starts a tuple of `values` values.
    pub fn tuple(&mut self, values: i16) {
        self.buf.extend_from_slice(&values.to_be_bytes());
    }

    fn value(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
        self.buf.extend_from_slice(bytes);
    }

    /// A NULL.
    pub fn null(&mut self) {
        self.buf.extend_from_slice(&(-1i32).to_be_bytes());
    }

    /// An `int8`.
    pub fn int8(&mut self, v: i64) {
        self.value(&v.to_be_bytes());
    }

    /// An `int4`.
    pub fn int4(&mut self, v: i32) {
        self.value(&v.to_be_bytes());
    }

    /// An `int2`.
    pub fn int2(&mut self, v: i16) {
        self.value(&v.to_be_bytes());
    }

    /// A `float8`, or NULL.
    pub fn float8(&mut self, v: Option<f64>) {
        match v {
            Some(v) => self.value(&v.to_be_bytes()),
            None => self.null(),
        }
    }

    /// A `text`, or NULL. (A value over 2 GiB cannot be stored in any case.)
    pub fn text(&mut self, v: Option<&str>) {
        match v {
            Some(v) => self.value(v.as_bytes()),
            None => self.null(),
        }
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// The bytes so far, leaving an empty buffer of the same capacity (no
    /// header: a copy's header comes once, at its start).
    pub fn take(&mut self) -> Vec<u8> {
        let capacity = self.buf.capacity();
        std::mem::replace(&mut self.buf, Vec::with_capacity(capacity))
    }

    /// Adds the end marker and returns the bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
        self.buf
    }
}

/// Calls `tuple` with the values of each tuple of `piece` (`columns` of
/// them, `None` for NULL): tuples of the binary `COPY` format, each a 16-bit
/// count of values and for each a 32-bit length (−1: NULL) and the bytes.
/// Source: the PostgreSQL manual, `COPY`, "Binary Format". Errors: `tuple`'s,
/// a tuple of another width, or a piece that ends within a tuple.
pub(super) fn each_tuple(
    piece: &[u8],
    columns: usize,
    mut tuple: impl FnMut(&[Option<&[u8]>]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut values: Vec<Option<&[u8]>> = Vec::with_capacity(columns);
    let mut at = 0;
    while at < piece.len() {
        let count = piece
            .get(at..at + 2)
            .map(|b| i16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| anyhow::anyhow!("COPY output ended within a tuple"))?;
        anyhow::ensure!(
            count as usize == columns,
            "a COPY tuple of {count} values where {columns} were asked"
        );
        at = split_tuple(piece, at + 2, columns, &mut values)
            .ok_or_else(|| anyhow::anyhow!("COPY output ended within a tuple"))?;
        tuple(&values)?;
    }
    Ok(())
}

/// The binary `COPY` signature.
pub(super) const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// The `columns` values of the tuple starting at `at` (after its count) into
/// `values`; the tuple's end, or `None` when `data` ends within it.
fn split_tuple<'a>(
    data: &'a [u8],
    mut at: usize,
    columns: usize,
    values: &mut Vec<Option<&'a [u8]>>,
) -> Option<usize> {
    values.clear();
    for _ in 0..columns {
        let length = i32::from_be_bytes(data.get(at..at + 4)?.try_into().ok()?);
        at += 4;
        if length < 0 {
            values.push(None);
            continue;
        }
        let end = at + length as usize;
        values.push(Some(data.get(at..end)?));
        at = end;
    }
    Some(at)
}

/// A `float8` value. Errors: NULL, or not 8 bytes.
pub(super) fn float(v: Option<&[u8]>) -> anyhow::Result<f64> {
    let v = v.ok_or_else(|| anyhow::anyhow!("a NULL where a number belongs"))?;
    Ok(f64::from_be_bytes(v.try_into()?))
}

/// An `int8` value. Errors: NULL, or not 8 bytes.
pub(super) fn integer(v: Option<&[u8]>) -> anyhow::Result<i64> {
    let v = v.ok_or_else(|| anyhow::anyhow!("a NULL where a number belongs"))?;
    Ok(i64::from_be_bytes(v.try_into()?))
}

/// A `text` value (`None`: NULL). Errors: bytes that are not UTF-8.
pub(super) fn text(v: Option<&[u8]>) -> anyhow::Result<Option<&str>> {
    Ok(v.map(std::str::from_utf8).transpose()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Binary `COPY` tuples of `tuples` as text values, without header or end.
    fn encoded(tuples: &[Vec<Option<&[u8]>>]) -> Vec<u8> {
        let mut out = Tuples::new(0);
        out.take();
        for t in tuples {
            out.tuple(t.len() as i16);
            for v in t {
                match v {
                    None => out.null(),
                    Some(b) => out.value(b),
                }
            }
        }
        out.buf
    }

    /// The tuples of a piece.
    fn decoded(piece: &[u8], columns: usize) -> anyhow::Result<Vec<Vec<Option<Vec<u8>>>>> {
        let mut out = Vec::new();
        each_tuple(piece, columns, |t| {
            out.push(t.iter().map(|v| v.map(<[u8]>::to_vec)).collect());
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn a_piece_gives_its_tuples() {
        let long = vec![b'x'; 70_000];
        let one = 7i64.to_be_bytes();
        let lat = 51.5f64.to_be_bytes();
        let tuples: Vec<Vec<Option<&[u8]>>> = vec![
            vec![Some(&one), Some(b"a\tb\nc\\d"), None],
            vec![Some(&lat), Some(b""), Some(&long)],
            vec![None, None, None],
        ];
        let want: Vec<Vec<Option<Vec<u8>>>> = tuples
            .iter()
            .map(|t| t.iter().map(|v| v.map(<[u8]>::to_vec)).collect())
            .collect();
        assert_eq!(decoded(&encoded(&tuples), 3).unwrap(), want);
        assert_eq!(decoded(&[], 3).unwrap(), Vec::<Vec<Option<Vec<u8>>>>::new());
        assert_eq!(float(Some(&lat)).unwrap(), 51.5);
        assert_eq!(integer(Some(&one)).unwrap(), 7);
    }

    #[test]
    fn written_values_read_back() {
        let mut w = Tuples::new(64);
        assert_eq!(&w.buf[..11], SIGNATURE);
        assert_eq!(w.len(), 19);
        w.take();
        w.tuple(7);
        w.int8(-3);
        w.int4(5);
        w.int2(-1);
        w.float8(Some(-0.25));
        w.float8(None);
        w.text(Some("é\t"));
        w.text(None);
        let bytes = w.finish();
        let (tuple, end) = bytes.split_at(bytes.len() - 2);
        assert_eq!(end, (-1i16).to_be_bytes());
        let got = decoded(tuple, 7).unwrap();
        assert_eq!(integer(got[0][0].as_deref()).unwrap(), -3);
        assert_eq!(got[0][1].as_deref(), Some(5i32.to_be_bytes().as_slice()));
        assert_eq!(got[0][2].as_deref(), Some((-1i16).to_be_bytes().as_slice()));
        assert_eq!(float(got[0][3].as_deref()).unwrap(), -0.25);
        assert_eq!(got[0][4], None);
        assert_eq!(text(got[0][5].as_deref()).unwrap(), Some("é\t"));
        assert_eq!(got[0][6], None);
    }

    #[test]
    fn what_is_not_the_format_is_an_error() {
        let piece = encoded(&[vec![Some(b"ab".as_slice()), None]]);
        assert!(decoded(&piece, 3).is_err(), "a tuple of another width");
        for cut in 1..piece.len() {
            assert!(decoded(&piece[..cut], 2).is_err(), "cut after {cut} bytes");
        }
        assert!(float(None).is_err() && float(Some(b"1234")).is_err());
        assert!(integer(None).is_err() && integer(Some(b"1")).is_err());
        assert!(text(Some(b"\xff")).is_err());
    }
}
