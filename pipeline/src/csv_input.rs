//! CSV input rules (DESIGN.md "CSV input rules"): delimiter, header and column
//! detection, and the validation that gives every data row a status.
//!
//! The reader streams: [`detect`] looks at the first [`SAMPLE_BYTES`] only, and
//! [`RowReader`] yields one [`Row`] at a time, so memory stays flat whatever the
//! file size. Blank lines are not data rows (as in every CSV tool); every other
//! record becomes exactly one row, `pending` with a coordinate or `invalid` with a
//! reason that names its line.

use std::{
    collections::VecDeque,
    io::{BufRead, BufReader, Chain, Cursor, Read},
    sync::{Arc, Mutex},
};

/// How much of the file detection looks at.
pub const SAMPLE_BYTES: usize = 64 * 1024;

/// Delimiters tried by detection, in order of preference on a tie.
pub const DELIMITERS: [u8; 4] = [b',', b';', b'\t', b'|'];

/// Header names recognised for latitude, compared after lower-casing and removing
/// everything but letters and digits (`Latitude (WGS84)` → `latitudewgs84`).
const LAT_NAMES: &[&str] = &[
    "lat",
    "latitude",
    "latwgs84",
    "latitudewgs84",
    "wgs84lat",
    "wgs84latitude",
    "latdeg",
    "latitudedeg",
    "y",
];
/// Header names recognised for longitude, compared like [`LAT_NAMES`].
const LON_NAMES: &[&str] = &[
    "lon",
    "lng",
    "long",
    "longitude",
    "lonwgs84",
    "longwgs84",
    "longitudewgs84",
    "wgs84lon",
    "wgs84long",
    "wgs84longitude",
    "londeg",
    "longitudedeg",
    "x",
];

/// What the user told us about the file; `None` means detect.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CsvOptions {
    /// Latitude column: a header name (any case) or a 1-based column number.
    pub lat_column: Option<String>,
    /// Longitude column: a header name (any case) or a 1-based column number.
    pub lon_column: Option<String>,
    /// Field delimiter; one of `,` `;` tab `|` when detected.
    pub delimiter: Option<u8>,
    /// Whether `"` quotes fields; detected when absent (see [`detect_quoting`]).
    pub quote: Option<Quote>,
}

/// How fields are quoted (`--quote`, `spec.csv.quote`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quote {
    /// `"` is an ordinary character.
    None,
    /// RFC 4180: a field in `"…"` may hold delimiters and line ends, `""` is a quote.
    Double,
}

impl std::str::FromStr for Quote {
    type Err = InputError;

    /// `none` or `double`.
    fn from_str(s: &str) -> Result<Quote, InputError> {
        match s {
            "none" => Ok(Quote::None),
            "double" => Ok(Quote::Double),
            other => Err(InputError::QuoteMode(other.to_string())),
        }
    }
}

/// The shape of a file, decided from its first bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub delimiter: u8,
    /// Whether `"` quotes fields.
    pub quote: Quote,
    /// The user's column names; `None` for a headerless file.
    pub header: Option<Vec<String>>,
    /// The number of the user's columns every output row has: the header's,
    /// or a headerless file's first row's (at least up to its coordinate
    /// columns). Shorter rows are padded, longer ones keep their surplus in
    /// the `extra_fields` column ([`RowReader::next_row`]).
    pub width: usize,
    /// 0-based index of the latitude column.
    pub lat_index: usize,
    /// 0-based index of the longitude column.
    pub lon_index: usize,
}

impl Layout {
    /// Column names for the enriched CSV: the user's header, or `lat,lon` (and
    /// `column_3…`) for a headerless file.
    pub fn output_columns(&self) -> Vec<String> {
        match &self.header {
            Some(h) => h.clone(),
            None => (0..self.width)
                .map(|i| match i {
                    _ if i == self.lat_index => "lat".to_string(),
                    _ if i == self.lon_index => "lon".to_string(),
                    _ => format!("column_{}", i + 1),
                })
                .collect(),
        }
    }
}

/// Characters of the input a message may quote ([`excerpt`]).
pub const EXCERPT_CHARS: usize = 80;

/// At most [`EXCERPT_CHARS`] characters of `s` for a message, control
/// characters escaped (`\n`, `\u{1b}`…) and `…` when cut. Issue 18: a status
/// message or event is readable by whoever can read the resource, so it quotes
/// no more of the user's file than this (and nothing of a file that failed the
/// text checks: [`InputError::Binary`] quotes no content).
pub fn excerpt(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    for c in chars.by_ref().take(EXCERPT_CHARS) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if chars.next().is_some() {
        out.push('…');
    }
    out
}

/// Why a file cannot be read at all; the import fails with this message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InputError {
    #[error("the file is empty: expected a CSV with latitude and longitude columns")]
    Empty,
    #[error("the file looks binary (NUL byte at offset {0}), not CSV text; is it compressed or a spreadsheet? Export it as CSV")]
    Binary(usize),
    #[error("no latitude/longitude columns found in header [{}]; name them lat/latitude and lon/lng/long/longitude, or pass the columns explicitly (--lat-column/--lon-column, spec.csv.latColumn/lonColumn)", excerpt(&.0.join(", ")))]
    NoCoordinateColumns(Vec<String>),
    #[error("column \"{opt}\" not found in header [{cols}]", opt = excerpt(.0), cols = excerpt(&.1.join(", ")))]
    ColumnNotFound(String, Vec<String>),
    #[error("headerless file with {0} columns: say which hold latitude and longitude as 1-based numbers (--lat-column 1 --lon-column 2)")]
    AmbiguousHeaderless(usize),
    #[error("only one column found (delimiters tried: , ; tab |): expected latitude and longitude columns")]
    OneColumn,
    #[error("latitude and longitude cannot be the same column ({0})")]
    SameColumn(usize),
    #[error("unsupported delimiter \"{}\": use one of , ; tab |", excerpt(.0))]
    Delimiter(String),
    #[error("unsupported quote mode \"{}\": use none or double", excerpt(.0))]
    QuoteMode(String),
    #[error("CSV syntax error at line {line}: {message}")]
    Syntax { line: u64, message: String },
    #[error("reading the file failed: {0}")]
    Io(String),
    /// The source stopped delivering bytes (network, database): not the
    /// file's fault, so a retry may succeed ([`SourceInterrupted`]).
    #[error("reading the source was interrupted: {0}")]
    Interrupted(String),
}

impl InputError {
    /// The error of a failed read: [`InputError::Interrupted`] when the source
    /// said so with a [`SourceInterrupted`], [`InputError::Io`] otherwise.
    pub fn from_io(e: &std::io::Error) -> Self {
        match e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<SourceInterrupted>())
        {
            Some(s) => InputError::Interrupted(s.0.clone()),
            None => InputError::Io(e.to_string()),
        }
    }

    /// Whether the input itself is at fault, so reading it again cannot help.
    pub fn is_permanent(&self) -> bool {
        !matches!(self, InputError::Interrupted(_))
    }
}

/// The inner error of an [`std::io::Error`] by which a source's stream says it
/// was cut off by something other than its content (a dropped connection, a
/// database error while reading an upload).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SourceInterrupted(pub String);

/// One data row of the input, with its status decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// 1-based data row number (the header is not counted, blank lines neither).
    pub row_number: u64,
    /// 1-based line of the file where the record starts.
    pub line: u64,
    /// The user's fields, re-encoded as one comma-separated CSV record (no line end).
    pub fields: String,
    /// The validated WGS84 coordinate, or why the row is invalid.
    pub coordinate: Result<(f64, f64), String>,
}

/// Parses a delimiter as given on a command line or in the CRD (`,`, `;`, `\t`, `tab`, `|`).
pub fn parse_delimiter(s: &str) -> Result<u8, InputError> {
    match s {
        "," | "comma" => Ok(b','),
        ";" | "semicolon" => Ok(b';'),
        "\t" | "\\t" | "tab" | "TAB" => Ok(b'\t'),
        "|" | "pipe" => Ok(b'|'),
        other => Err(InputError::Delimiter(other.to_string())),
    }
}

fn normalise_name(s: &str) -> String {
    s.chars()
        .filter(char::is_ascii_alphanumeric)
        .collect::<String>()
        .to_ascii_lowercase()
}

pub use crate::degrees::parse_degrees;
use crate::degrees::{parse_coordinate, Axis};

/// Validates one record's coordinate fields; the error names the line and says why.
pub fn validate(record: &csv::ByteRecord, layout: &Layout, line: u64) -> Result<(f64, f64), String> {
    let field = |idx: usize, what: &str, axis: Axis| -> Result<f64, String> {
        let raw = record.get(idx).ok_or_else(|| {
            format!(
                "line {line}: missing {what} (row has {} field(s), {what} is column {})",
                record.len(),
                idx + 1
            )
        })?;
        let text = String::from_utf8_lossy(raw);
        parse_coordinate(&text, layout.delimiter, axis).map_err(|e| format!("line {line}: {what} {e}"))
    };
    let lat = field(layout.lat_index, "latitude", Axis::Latitude)?;
    let lon = field(layout.lon_index, "longitude", Axis::Longitude)?;
    if !(-90.0..=90.0).contains(&lat) {
        let hint = if lat.abs() > 1000.0 {
            " (an OSGB northing? WGS84 degrees are expected)"
        } else {
            ""
        };
        return Err(format!("line {line}: latitude {lat} is outside -90..90{hint}"));
    }
    if !(-180.0..=180.0).contains(&lon) {
        let hint = if lon.abs() > 1000.0 {
            " (an OSGB easting? WGS84 degrees are expected)"
        } else {
            ""
        };
        return Err(format!("line {line}: longitude {lon} is outside -180..180{hint}"));
    }
    Ok((lat, lon))
}

/// The 0-based column a `--lat-column`/`--lon-column` option names: a 1-based
/// number, or a header name (exact, then normalised); `None` without option.
fn column_by_option(
    opt: &Option<String>,
    names: &[String],
    has_header: bool,
) -> Result<Option<usize>, InputError> {
    let Some(o) = opt else { return Ok(None) };
    if let Ok(n) = o.trim().parse::<usize>() {
        if n >= 1 {
            return Ok(Some(n - 1));
        }
    }
    if !has_header {
        return Err(InputError::ColumnNotFound(o.clone(), vec![]));
    }
    let want = o.trim().to_lowercase();
    names
        .iter()
        .position(|n| n.to_lowercase() == want)
        .or_else(|| {
            names
                .iter()
                .position(|n| normalise_name(n) == normalise_name(&want))
        })
        .map(Some)
        .ok_or_else(|| InputError::ColumnNotFound(o.clone(), names.to_vec()))
}

/// The latitude (`lat`) or longitude column a header names by the accepted
/// names; `y`/`x` only when no latitude/longitude name is present.
fn header_column(names: &[String], lat: bool) -> Option<usize> {
    let find = |list: &[&str]| {
        list.iter()
            .find_map(|cand| names.iter().position(|n| normalise_name(n) == *cand))
    };
    let geo_lat = find(&LAT_NAMES[..LAT_NAMES.len() - 1]);
    let geo_lon = find(&LON_NAMES[..LON_NAMES.len() - 1]);
    if geo_lat.is_some() || geo_lon.is_some() {
        return if lat { geo_lat } else { geo_lon };
    }
    find(if lat { &["y"] } else { &["x"] })
}

/// Decides the file's layout from its first bytes (BOM already removed).
pub fn detect(sample: &[u8], opts: &CsvOptions) -> Result<Layout, InputError> {
    if sample.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(InputError::Empty);
    }
    // A NUL in the first line means a binary file (a spreadsheet, an
    // archive); later ones are bytes of a text file (e.g. a zero-filled tail).
    let first_line_end = memchr::memchr2(b'\n', b'\r', sample).unwrap_or(sample.len());
    if let Some(pos) = sample[..first_line_end].iter().position(|&b| b == 0) {
        return Err(InputError::Binary(pos));
    }
    // Only complete lines count, unless the sample is the whole file.
    let complete = if sample.len() >= SAMPLE_BYTES {
        match sample.iter().rposition(|&b| b == b'\n') {
            Some(p) => &sample[..=p],
            None => sample,
        }
    } else {
        sample
    };
    let delimiter = match opts.delimiter {
        Some(d) => d,
        None => detect_delimiter(complete),
    };
    let quote = opts.quote.unwrap_or_else(|| detect_quoting(complete, delimiter));
    let first = first_record(complete, delimiter, quote)?;
    let names: Vec<String> = first
        .iter()
        .map(|f| String::from_utf8_lossy(f).trim().to_string())
        .collect();
    if names.len() < 2 && opts.lat_column.is_none() {
        return Err(InputError::OneColumn);
    }
    let numeric = |i: usize| names.get(i).is_some_and(|n| parse_degrees(n, delimiter).is_ok());
    let all_numeric_or_empty = names.iter().enumerate().all(|(i, n)| n.is_empty() || numeric(i));
    let has_header = !(all_numeric_or_empty && numeric(0));

    let lat_opt = column_by_option(&opts.lat_column, &names, has_header)?;
    let lon_opt = column_by_option(&opts.lon_column, &names, has_header)?;
    let (lat_index, lon_index) = if has_header {
        match (
            lat_opt.or(header_column(&names, true)),
            lon_opt.or(header_column(&names, false)),
        ) {
            (Some(a), Some(b)) => (a, b),
            _ => return Err(InputError::NoCoordinateColumns(names)),
        }
    } else {
        match (lat_opt, lon_opt) {
            (Some(a), Some(b)) => (a, b),
            _ if names.len() == 2 => (lat_opt.unwrap_or(0), lon_opt.unwrap_or(1)),
            _ => return Err(InputError::AmbiguousHeaderless(names.len())),
        }
    };
    if lat_index == lon_index {
        return Err(InputError::SameColumn(lat_index + 1));
    }
    Ok(Layout {
        delimiter,
        quote,
        width: names.len().max(lat_index + 1).max(lon_index + 1),
        header: has_header.then_some(names),
        lat_index,
        lon_index,
    })
}

fn reader_for(data: &[u8], delimiter: u8, quote: Quote) -> csv::Reader<&[u8]> {
    csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .quoting(quote == Quote::Double)
        .has_headers(false)
        .flexible(true)
        .from_reader(data)
}

fn first_record(data: &[u8], delimiter: u8, quote: Quote) -> Result<csv::ByteRecord, InputError> {
    let mut rdr = reader_for(data, delimiter, quote);
    let mut rec = csv::ByteRecord::new();
    match rdr.read_byte_record(&mut rec) {
        Ok(true) => Ok(rec),
        Ok(false) => Err(InputError::Empty),
        Err(e) => Err(InputError::Syntax {
            line: 1,
            message: e.to_string(),
        }),
    }
}

/// Whether a file quotes its fields: comma and semicolon files do (RFC 4180,
/// Excel); a tab or pipe file only when every `"` in the sample sits at a
/// field boundary as quoting puts it (`"…"` whole fields, `""` inside them).
/// Tab and pipe files are often written without quoting, and one stray
/// quote (`Ben "Nevis`) would otherwise swallow the lines after it.
pub fn detect_quoting(sample: &[u8], delimiter: u8) -> Quote {
    if matches!(delimiter, b',' | b';') {
        return Quote::Double;
    }
    let all_paired = sample
        .split(|&b| b == b'\n')
        .all(|line| quotes_at_boundaries(line, delimiter));
    if all_paired {
        Quote::Double
    } else {
        Quote::None
    }
}

/// Whether every `"` of `line` is where quoting puts one: opening a field,
/// doubled inside a quoted field, or closing it before a delimiter or the end.
fn quotes_at_boundaries(line: &[u8], delimiter: u8) -> bool {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut i = 0;
    loop {
        if line.get(i) == Some(&b'"') {
            i += 1;
            loop {
                match (line.get(i), line.get(i + 1)) {
                    (Some(b'"'), Some(b'"')) => i += 2,
                    (Some(b'"'), next) => {
                        i += 1;
                        if next.is_some_and(|&b| b != delimiter) {
                            return false;
                        }
                        break;
                    }
                    (Some(_), _) => i += 1,
                    // A field open at the line end: a line break inside quotes, or a stray quote.
                    (None, _) => return false,
                }
            }
        } else {
            while let Some(&b) = line.get(i) {
                if b == delimiter {
                    break;
                }
                if b == b'"' {
                    return false;
                }
                i += 1;
            }
        }
        if i >= line.len() {
            return true;
        }
        i += 1; // the delimiter
    }
}

/// Picks the delimiter that splits the sample's records into the same number (≥ 2)
/// of fields most consistently; `,` when nothing splits.
fn detect_delimiter(sample: &[u8]) -> u8 {
    let mut best = (b',', 0usize, 0usize); // (delimiter, records agreeing, width)
    for &d in &DELIMITERS {
        let mut rdr = reader_for(sample, d, Quote::Double);
        let mut widths = Vec::new();
        let mut rec = csv::ByteRecord::new();
        while widths.len() < 100 {
            match rdr.read_byte_record(&mut rec) {
                Ok(true) => widths.push(rec.len()),
                _ => break,
            }
        }
        let Some(&first) = widths.first() else { continue };
        if first < 2 {
            continue;
        }
        let agreeing = widths.iter().filter(|&&w| w == first).count();
        if (agreeing, first) > (best.1, best.2) {
            best = (d, agreeing, first);
        }
    }
    best.0
}

type Source = BufReader<LineIndexed<Chain<Cursor<Vec<u8>>, Box<dyn Read + Send>>>>;

/// Records the byte offset of every line end it reads (`\n`, `\r\n` at its
/// `\n`, and a lone `\r` as classic Mac files end lines), so a record's line
/// can be told from its end offset (the csv crate's own line counter skips
/// blank lines).
struct LineIndexed<R> {
    inner: R,
    offset: u64,
    /// Offset of a `\r` that ended the last read: a line end unless a `\n` follows.
    pending_cr: Option<u64>,
    newlines: Arc<Mutex<VecDeque<u64>>>,
    /// Total bytes once the source is exhausted.
    end: Arc<Mutex<Option<u64>>>,
}

impl<R: Read> Read for LineIndexed<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut q = self.newlines.lock().expect("line index");
        if n == 0 && !buf.is_empty() {
            *self.end.lock().expect("line index") = Some(self.offset);
            q.extend(self.pending_cr.take());
            return Ok(0);
        }
        for p in memchr::memchr2_iter(b'\n', b'\r', &buf[..n]) {
            let at = self.offset + p as u64;
            if let Some(cr) = self.pending_cr.take() {
                if !(buf[p] == b'\n' && cr + 1 == at) {
                    q.push_back(cr);
                }
            }
            match buf[p] {
                b'\r' => self.pending_cr = Some(at),
                _ => q.push_back(at),
            }
        }
        if let Some(cr) = self.pending_cr {
            // A `\r` before the last byte read is known to be alone.
            if cr + 1 < self.offset + n as u64 {
                q.push_back(cr);
                self.pending_cr = None;
            }
        }
        self.offset += n as u64;
        Ok(n)
    }
}

/// Line ends inside `field`, counted as [`LineIndexed`] counts them.
fn line_ends_in(field: &[u8]) -> u64 {
    let crlf = memchr::memmem::find_iter(field, b"\r\n").count();
    (memchr::memchr2_iter(b'\n', b'\r', field).count() - crlf) as u64
}

/// Streams the rows of a CSV file; see the module docs.
pub struct RowReader {
    layout: Layout,
    csv: csv::Reader<Source>,
    record: csv::ByteRecord,
    next_row: u64,
    /// Records before the first data row: the header, and Excel's `sep=` line.
    skip_records: u8,
    /// Fields whose bytes were replaced: NUL bytes and invalid UTF-8 become U+FFFD.
    replaced: u64,
    /// Rows whose quoted fields span lines (each is `invalid`).
    spanning: u64,
    /// Rows with fewer fields than [`Layout::width`] (padded) and with more
    /// (the surplus kept in `extra_fields`).
    short: u64,
    long: u64,
    width: usize,
    newlines: Arc<Mutex<VecDeque<u64>>>,
    end: Arc<Mutex<Option<u64>>>,
    lines_before: u64,
}

impl RowReader {
    /// Reads the first [`SAMPLE_BYTES`] of `input`, strips a UTF-8 BOM, decides the
    /// layout and returns a reader positioned before the first data row.
    pub fn new(input: Box<dyn Read + Send>, opts: &CsvOptions) -> Result<Self, InputError> {
        let mut input = utf8_stream(input).map_err(|e| InputError::from_io(&e))?;
        let mut sample = Vec::with_capacity(SAMPLE_BYTES);
        (&mut input)
            .take(SAMPLE_BYTES as u64)
            .read_to_end(&mut sample)
            .map_err(|e| InputError::from_io(&e))?;
        if sample.starts_with(&[0xEF, 0xBB, 0xBF]) {
            sample.drain(..3);
        }
        // Excel's `sep=;` first line names the delimiter; it is not a record.
        let (sep, sep_len) = excel_separator_line(&sample);
        let opts = CsvOptions {
            delimiter: opts.delimiter.or(sep),
            ..opts.clone()
        };
        let layout = detect(&sample[sep_len..], &opts)?;
        let width = layout.width;
        let newlines = Arc::new(Mutex::new(VecDeque::new()));
        let end = Arc::new(Mutex::new(None));
        let indexed = LineIndexed {
            inner: Cursor::new(sample).chain(input),
            offset: 0,
            pending_cr: None,
            newlines: newlines.clone(),
            end: end.clone(),
        };
        let source: Source = BufReader::with_capacity(256 * 1024, indexed);
        let csv = csv::ReaderBuilder::new()
            .delimiter(layout.delimiter)
            .quoting(layout.quote == Quote::Double)
            .has_headers(false)
            .flexible(true)
            .from_reader(source);
        let skip_records = u8::from(layout.header.is_some()) + u8::from(sep.is_some());
        Ok(Self {
            layout,
            csv,
            record: csv::ByteRecord::new(),
            next_row: 1,
            skip_records,
            replaced: 0,
            spanning: 0,
            short: 0,
            long: 0,
            width,
            newlines,
            end,
            lines_before: 0,
        })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Number of the user's columns of every stored row ([`Layout::width`]).
    pub fn width(&self) -> usize {
        self.width
    }

    /// Rows so far with fewer fields than the header (padded with empty
    /// fields) and with more (the surplus kept in `extra_fields`).
    pub fn ragged_rows(&self) -> (u64, u64) {
        (self.short, self.long)
    }

    /// The next row, `Ok(None)` at the end; `Err` only for an unreadable stream.
    pub fn next_row(&mut self) -> Result<Option<Row>, InputError> {
        loop {
            match self.csv.read_byte_record(&mut self.record) {
                Ok(false) => return Ok(None),
                Ok(true) => {}
                Err(e) => {
                    return match e.kind() {
                        csv::ErrorKind::Io(io) => Err(InputError::from_io(io)),
                        _ => {
                            let line = e.position().map_or(0, csv::Position::line);
                            Err(InputError::Syntax {
                                line,
                                message: e.to_string(),
                            })
                        }
                    }
                }
            }
            let line = self.start_line();
            if self.skip_records > 0 {
                self.skip_records -= 1;
                continue;
            }
            if is_blank(&self.record) {
                continue;
            }
            let spans = self.record.iter().map(line_ends_in).sum::<u64>();
            let coordinate = if spans > 0 {
                self.spanning += 1;
                let last = line + spans - u64::from(self.swallowed_last_line_end());
                Err(format!(
                    "lines {line}-{last}: a quoted field spans lines {line} to {last}, so their records were read as one; \
                     check for a stray quote, or read the file unquoted (--quote none, spec.csv.quote: none)"
                ))
            } else {
                validate(&self.record, &self.layout, line)
            };
            let fields = self.encode_fields()?;
            let row = Row {
                row_number: self.next_row,
                line,
                fields,
                coordinate,
            };
            self.next_row += 1;
            return Ok(Some(row));
        }
    }

    /// 1-based line where the record just read starts: newlines before its last
    /// byte (the terminator, or the last byte at end of file), less those inside it.
    fn start_line(&mut self) -> u64 {
        let last = self.csv.position().byte().saturating_sub(1);
        let mut q = self.newlines.lock().expect("line index");
        while q.front().is_some_and(|&p| p < last) {
            q.pop_front();
            self.lines_before += 1;
        }
        let mut inside: u64 = self.record.iter().map(line_ends_in).sum();
        // That newline is the one at `last`, not before it.
        if self.swallowed_last_line_end() {
            inside = inside.saturating_sub(1);
        }
        self.lines_before + 1 - inside.min(self.lines_before)
    }

    /// Whether the record just read is the last one and a quote left open
    /// swallowed the file's last line end into its last field: that line end
    /// ends the record's last line, it starts no other.
    fn swallowed_last_line_end(&self) -> bool {
        let at_eof = *self.end.lock().expect("line index") == Some(self.csv.position().byte());
        at_eof
            && self
                .record
                .iter()
                .next_back()
                .is_some_and(|f| f.ends_with(b"\n") || f.ends_with(b"\r"))
    }

    /// Rows so far whose quoted fields span lines: each is `invalid` and the
    /// load's summary warns about them.
    pub fn spanning_rows(&self) -> u64 {
        self.spanning
    }

    /// Fields whose bytes were replaced so far (NUL bytes and invalid UTF-8
    /// become U+FFFD, as PostgreSQL text cannot hold them).
    pub fn replaced_fields(&self) -> u64 {
        self.replaced
    }

    /// The stored fields of the record just read: exactly [`Layout::width`]
    /// of the user's fields (missing ones empty), then the `extra_fields`
    /// field (the surplus fields joined with the input's delimiter, empty when
    /// there are none), each CSV-encoded, joined with commas. NUL bytes and
    /// invalid UTF-8 become U+FFFD and are counted ([`RowReader::replaced_fields`]).
    fn encode_fields(&mut self) -> Result<String, InputError> {
        let n = self.record.len();
        if n < self.width {
            self.short += 1;
        } else if n > self.width {
            self.long += 1;
        }
        let mut out = String::with_capacity(self.record.as_slice().len() + self.width + 8);
        for i in 0..self.width {
            if i > 0 {
                out.push(',');
            }
            let text = self.text_of(i);
            push_csv_field(&mut out, &text);
        }
        out.push(',');
        if n > self.width {
            let delimiter = char::from(self.layout.delimiter);
            let mut extra = String::new();
            for i in self.width..n {
                if i > self.width {
                    extra.push(delimiter);
                }
                extra.push_str(&self.text_of(i));
            }
            push_csv_field(&mut out, &extra);
        }
        Ok(out)
    }

    /// Field `i` of the record just read as text (empty when the record is
    /// shorter), with NUL bytes and invalid UTF-8 replaced by U+FFFD (counted).
    fn text_of(&mut self, i: usize) -> std::borrow::Cow<'_, str> {
        let Some(f) = self.record.get(i) else {
            return std::borrow::Cow::Borrowed("");
        };
        let text = String::from_utf8_lossy(f);
        if matches!(text, std::borrow::Cow::Owned(_)) || f.contains(&0) {
            self.replaced += 1;
            return std::borrow::Cow::Owned(text.replace('\0', "\u{FFFD}"));
        }
        text
    }
}

/// A record that is no data row: one field of only spaces, tabs or NUL bytes
/// (a whitespace-only line, or the zero-filled tail of a file cut short by a crash).
fn is_blank(record: &csv::ByteRecord) -> bool {
    record.len() == 1 && record[0].iter().all(|&b| b == 0 || b.is_ascii_whitespace())
}

/// The delimiter an Excel `sep=X` first line names, and that line's length
/// with its line end; `(None, 0)` when the file has no such line.
fn excel_separator_line(sample: &[u8]) -> (Option<u8>, usize) {
    let Some(rest) = sample.strip_prefix(b"sep=") else {
        return (None, 0);
    };
    let Some(&d) = rest.first() else { return (None, 0) };
    let ends = match &rest[1..] {
        [b'\r', b'\n', ..] => 2,
        [b'\n' | b'\r', ..] => 1,
        _ => return (None, 0),
    };
    if !DELIMITERS.contains(&d) {
        return (None, 0);
    }
    (Some(d), 4 + 1 + ends)
}

/// The input as UTF-8: a UTF-16 file with a byte order mark (Excel's
/// "Unicode Text") is decoded; anything else passes through as it is.
fn utf8_stream(input: Box<dyn Read + Send>) -> std::io::Result<Box<dyn Read + Send>> {
    let mut buf = BufReader::new(input);
    let head = buf.fill_buf()?;
    if head.starts_with(&[0xFF, 0xFE]) || head.starts_with(&[0xFE, 0xFF]) {
        let decoder = encoding_rs_io::DecodeReaderBytesBuilder::new()
            .bom_sniffing(true)
            .build(buf);
        return Ok(Box::new(decoder));
    }
    Ok(Box::new(buf))
}

/// Appends one CSV field (RFC 4180): quoted when it holds a comma, quote, CR or
/// LF, with inner quotes doubled.
pub fn push_csv_field(out: &mut String, field: &str) {
    if field.bytes().any(|b| matches!(b, b',' | b'"' | b'\n' | b'\r')) {
        out.push('"');
        for c in field.chars() {
            if c == '"' {
                out.push('"');
            }
            out.push(c);
        }
        out.push('"');
    } else {
        out.push_str(field);
    }
}

/// Opens a path as a byte stream, transparently gunzipping `.gz` content (by magic bytes).
pub fn open_maybe_gzip(reader: Box<dyn Read + Send>) -> std::io::Result<Box<dyn Read + Send>> {
    let mut buf = BufReader::new(reader);
    let head = buf.fill_buf()?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(buf)))
    } else {
        Ok(Box::new(buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_quote_at_most_a_sanitised_excerpt_of_the_header() {
        let secret = "s3cr3t".repeat(40);
        let header = format!("user,password\x1b[31m,{secret}\n1,2,3\n");
        let e = RowReader::new(
            Box::new(std::io::Cursor::new(header.clone().into_bytes())),
            &CsvOptions::default(),
        )
        .err()
        .unwrap();
        let msg = e.to_string();
        assert!(matches!(e, InputError::NoCoordinateColumns(_)), "{msg}");
        assert!(msg.contains("[user, password\\u{1b}[31m, s3cr3t"), "{msg}");
        assert!(!msg.contains('\x1b') && !msg.contains(&secret[..100]), "{msg}");
        let quoted = msg.split('[').nth(1).unwrap().split(']').next().unwrap();
        assert!(
            quoted.chars().count() <= EXCERPT_CHARS + "\\u{1b}".len() + 1,
            "{quoted}"
        );
        let opts = CsvOptions {
            lat_column: Some("lat".into()),
            lon_column: Some("lon".into()),
            ..CsvOptions::default()
        };
        let msg = RowReader::new(Box::new(std::io::Cursor::new(header.clone().into_bytes())), &opts)
            .err()
            .unwrap()
            .to_string();
        assert!(
            msg.contains("column \"lat\" not found") && !msg.contains(&secret[..100]),
            "{msg}"
        );
        assert_eq!(excerpt("a\tb"), "a\\tb");
        assert_eq!(excerpt(&"é".repeat(81)), format!("{}…", "é".repeat(80)));
    }

    fn rows(text: &str, opts: &CsvOptions) -> Result<(Layout, Vec<Row>), InputError> {
        let mut r = RowReader::new(Box::new(Cursor::new(text.as_bytes().to_vec())), opts)?;
        let mut out = Vec::new();
        while let Some(row) = r.next_row()? {
            out.push(row);
        }
        Ok((r.layout().clone(), out))
    }

    fn ok(text: &str) -> (Layout, Vec<Row>) {
        rows(text, &CsvOptions::default()).unwrap()
    }

    #[test]
    fn comma_header_lf() {
        let (l, r) = ok("lat,lon\n51.5,-0.1\n52,1\n");
        assert_eq!((l.delimiter, l.lat_index, l.lon_index), (b',', 0, 1));
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].coordinate, Ok((51.5, -0.1)));
        assert_eq!((r[1].row_number, r[1].line), (2, 3));
    }

    #[test]
    fn each_delimiter_is_detected() {
        for (d, text) in [
            (b';', "lat;lon\n51,5;-0,1\n"),
            (b'\t', "lat\tlon\n51.5\t-0.1\n"),
            (b'|', "lat|lon\n51.5|-0.1\n"),
        ] {
            let (l, r) = ok(text);
            assert_eq!(l.delimiter, d);
            assert_eq!(r[0].coordinate, Ok((51.5, -0.1)), "{text:?}");
        }
    }

    #[test]
    fn semicolon_file_with_decimal_points_too() {
        let (l, r) = ok("id;Latitude;Longitude\n1;51.5;-0.1\n");
        assert_eq!((l.delimiter, l.lat_index, l.lon_index), (b';', 1, 2));
        assert_eq!(r[0].coordinate, Ok((51.5, -0.1)));
    }

    #[test]
    fn header_names_in_any_case_bom_quotes_crlf_and_extra_columns() {
        let (l, r) =
            ok("\u{feff}\"ID\",\"Name, full\",\"LONGITUDE\",\"Latitude\"\r\n7,\"Smith, J\",-0.1,51.5\r\n");
        assert_eq!(l.header.as_ref().unwrap()[0], "ID");
        assert_eq!((l.lat_index, l.lon_index), (3, 2));
        assert_eq!(r[0].coordinate, Ok((51.5, -0.1)));
        assert_eq!(r[0].fields, "7,\"Smith, J\",-0.1,51.5,");
    }

    #[test]
    fn lng_long_x_y_names() {
        assert_eq!(ok("LAT,LNG\n1,2\n").0.lon_index, 1);
        assert_eq!(ok("latitude,long\n1,2\n").0.lon_index, 1);
        let (l, _) = ok("x,y\n-0.1,51.5\n");
        assert_eq!((l.lat_index, l.lon_index), (1, 0));
        // lat/lon names win over x/y
        let (l, _) = ok("x,y,lat,lon\n1,2,3,4\n");
        assert_eq!((l.lat_index, l.lon_index), (2, 3));
    }

    #[test]
    fn headerless_two_numeric_columns_are_lat_lon() {
        let (l, r) = ok("51.5,-0.1\n52.0,1.0\n");
        assert_eq!(l.header, None);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].row_number, 1);
        assert_eq!(l.output_columns(), vec!["lat", "lon"]);
    }

    #[test]
    fn headerless_with_more_columns_needs_explicit_columns() {
        assert_eq!(
            rows("1,51.5,-0.1\n", &CsvOptions::default()).unwrap_err(),
            InputError::AmbiguousHeaderless(3)
        );
        let opts = CsvOptions {
            lat_column: Some("2".into()),
            lon_column: Some("3".into()),
            ..CsvOptions::default()
        };
        let (_, r) = rows("1,51.5,-0.1\n", &opts).unwrap();
        assert_eq!(r[0].coordinate, Ok((51.5, -0.1)));
    }

    #[test]
    fn explicit_column_names() {
        let opts = CsvOptions {
            lat_column: Some("PickupLat".into()),
            lon_column: Some("pickuplon".into()),
            delimiter: Some(b','),
            quote: None,
        };
        let (l, _) = rows("PickupLat,PickupLon\n1,2\n", &opts).unwrap();
        assert_eq!((l.lat_index, l.lon_index), (0, 1));
        let bad = CsvOptions {
            lat_column: Some("nope".into()),
            ..opts
        };
        assert!(matches!(
            rows("PickupLat,PickupLon\n1,2\n", &bad),
            Err(InputError::ColumnNotFound(..))
        ));
    }

    #[test]
    fn every_bad_row_is_invalid_with_its_line_and_reason() {
        let text = "lat,lon\n51.5\n,-0.1\nabc,1\nNaN,1\n1,inf\n91,0\n0,181\n530000,180000\n51.5,-0.1\n";
        let (_, r) = ok(text);
        let errs: Vec<_> = r
            .iter()
            .map(|r| r.coordinate.clone().err().unwrap_or_default())
            .collect();
        assert_eq!(r.len(), 9);
        assert!(errs[0].starts_with("line 2: missing longitude"), "{}", errs[0]);
        assert_eq!(errs[1], "line 3: latitude is empty");
        assert_eq!(errs[2], "line 4: latitude \"abc\" is not a number");
        assert!(errs[3].contains("not a finite number"), "{}", errs[3]);
        assert!(
            errs[4].contains("longitude \"inf\" is not a finite number"),
            "{}",
            errs[4]
        );
        assert_eq!(errs[5], "line 7: latitude 91 is outside -90..90");
        assert_eq!(errs[6], "line 8: longitude 181 is outside -180..180");
        assert!(errs[7].contains("OSGB"), "{}", errs[7]);
        assert_eq!(errs[8], "");
    }

    #[test]
    fn blank_lines_are_not_rows_and_row_numbers_stay_dense() {
        let (_, r) = ok("lat,lon\n\n51,0\n\n\n52,0\n");
        assert_eq!(
            r.iter().map(|r| (r.row_number, r.line)).collect::<Vec<_>>(),
            vec![(1, 3), (2, 6)]
        );
    }

    #[test]
    fn ragged_rows_are_padded_or_keep_their_surplus_in_extra_fields() {
        let text = "a;lat;lon\nx;51;0\ny;52\nz;53;1;p;q\n";
        let mut rd = RowReader::new(
            Box::new(Cursor::new(text.as_bytes().to_vec())),
            &CsvOptions::default(),
        )
        .unwrap();
        let mut fields = vec![];
        while let Some(r) = rd.next_row().unwrap() {
            fields.push(r.fields);
        }
        // width 3 + extra_fields, the surplus joined with the input's delimiter
        assert_eq!(fields, ["x,51,0,", "y,52,,", "z,53,1,p;q"]);
        assert_eq!(rd.ragged_rows(), (1, 1));
    }

    #[test]
    fn a_headerless_file_is_as_wide_as_its_first_row_or_its_named_columns() {
        let opts = CsvOptions {
            lat_column: Some("2".into()),
            lon_column: Some("3".into()),
            ..CsvOptions::default()
        };
        let (l, r) = rows("7,51.5,-0.1,8\n9,52,0\n", &opts).unwrap();
        assert_eq!(l.width, 4);
        assert_eq!(l.output_columns(), ["column_1", "lat", "lon", "column_4"]);
        assert_eq!(r[1].fields, "9,52,0,,");
        let opts = CsvOptions {
            lat_column: Some("1".into()),
            lon_column: Some("5".into()),
            ..CsvOptions::default()
        };
        assert_eq!(rows("51.5,1\n", &opts).unwrap().0.width, 5);
    }

    #[test]
    fn a_quoted_field_spanning_lines_is_invalid_with_its_lines() {
        let (_, r) = ok("name,lat,lon\n\"a\nb\",51,0\nc,52,0\n");
        assert_eq!(r[0].line, 2);
        assert_eq!(r[1].line, 4);
        assert_eq!(r[0].fields, "\"a\nb\",51,0,");
        assert!(r[0]
            .coordinate
            .as_ref()
            .unwrap_err()
            .starts_with("lines 2-3: a quoted field spans"));
        assert!(r[1].coordinate.is_ok());
    }

    #[test]
    fn a_stray_quote_in_a_tab_or_pipe_file_merges_nothing() {
        for d in ['\t', '|'] {
            let text = "id,locality,lat,lon\n1,Ben \"Nevis,56.79,-5.00\n2,Fort William,56.82,-5.10\n3,Glen,56.80,-5.05\n"
                .replace(',', &d.to_string());
            let (layout, r) = ok(&text);
            assert_eq!(layout.quote, Quote::None, "{d:?}");
            assert_eq!(r.len(), 3, "{d:?}");
            assert_eq!(r[0].coordinate, Ok((56.79, -5.0)));
            assert_eq!(r[1].coordinate, Ok((56.82, -5.1)));
            assert_eq!(r[0].fields, "1,\"Ben \"\"Nevis\",56.79,-5.00,");
        }
        // Properly quoted tab files keep quoting; --quote double forces it.
        let (layout, _) = ok("id\tlat\tlon\n\"a\tb\"\t1\t2\n");
        assert_eq!(layout.quote, Quote::Double);
        let forced = CsvOptions {
            quote: Some(Quote::Double),
            ..CsvOptions::default()
        };
        let (_, r) = rows("id\tlat\tlon\n\"1 x\t1\t2\n2\t3\t4\n", &forced).unwrap();
        assert_eq!(r.len(), 1, "forced quoting merges, and says so");
        assert!(
            r[0].coordinate.as_ref().unwrap_err().starts_with("lines 2-"),
            "{:?}",
            r[0].coordinate
        );
        assert_eq!("none".parse::<Quote>(), Ok(Quote::None));
        assert!("single".parse::<Quote>().is_err());
    }

    #[test]
    fn an_unterminated_quote_at_the_end_keeps_its_line() {
        let (_, r) = ok("lat,lon\n\n\"\"\"\n");
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].line, 3);
        let (_, r) = ok("lat,lon\r\n51,0\r\n\r\n52,0\r\n");
        assert_eq!(r.iter().map(|r| r.line).collect::<Vec<_>>(), vec![2, 4]);
    }

    #[test]
    fn unreadable_files_fail_with_a_message() {
        assert_eq!(rows("", &CsvOptions::default()).unwrap_err(), InputError::Empty);
        assert_eq!(
            rows("\n\n  \n", &CsvOptions::default()).unwrap_err(),
            InputError::Empty
        );
        assert!(matches!(
            rows("PK\x03\x04\x00\x00", &CsvOptions::default()),
            Err(InputError::Binary(4))
        ));
        assert!(matches!(
            rows("name,city\na,b\n", &CsvOptions::default()),
            Err(InputError::NoCoordinateColumns(_))
        ));
        assert_eq!(
            rows("justone\n1\n", &CsvOptions::default()).unwrap_err(),
            InputError::OneColumn
        );
        let msg = rows("name,city\na,b\n", &CsvOptions::default())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("name, city"), "{msg}");
    }

    #[test]
    fn latin1_bytes_in_extra_columns_do_not_lose_the_row() {
        let mut bytes = b"name,lat,lon\nCaf".to_vec();
        bytes.extend_from_slice(&[0xE9]);
        bytes.extend_from_slice(b",51.5,-0.1\n");
        let mut r = RowReader::new(Box::new(Cursor::new(bytes)), &CsvOptions::default()).unwrap();
        let row = r.next_row().unwrap().unwrap();
        assert_eq!(row.coordinate, Ok((51.5, -0.1)));
        assert!(row.fields.starts_with("Caf\u{fffd}"));
    }

    #[test]
    fn no_final_newline_and_long_sample() {
        let mut text = String::from("lat,lon\n");
        for i in 0..20_000 {
            text.push_str(&format!("{}.{},-0.{}\n", 50 + i % 5, i, i));
        }
        text.push_str("51,0");
        let (_, r) = ok(&text);
        assert_eq!(r.len(), 20_001);
        assert_eq!(r.last().unwrap().coordinate, Ok((51.0, 0.0)));
    }

    fn reasons(rows: &[Row]) -> Vec<String> {
        rows.iter()
            .map(|r| match &r.coordinate {
                Ok(_) => "ok".to_string(),
                Err(e) => e.split(':').next().unwrap().to_string(),
            })
            .collect()
    }

    #[test]
    fn cr_only_line_ends_number_lines_like_lf() {
        let (_, r) = ok("lat,lon\r51.5,-0.1\rx,1\r\r52,1\ry,2");
        assert_eq!(r.len(), 4);
        assert_eq!(r.iter().map(|r| r.line).collect::<Vec<_>>(), [2, 3, 5, 6]);
        assert_eq!(reasons(&r), ["ok", "line 3", "ok", "line 6"]);
        // Mixed CRLF and LF count each line end once.
        let (_, r) = ok("lat,lon\r\nx,1\ny,2\r\n");
        assert_eq!(reasons(&r), ["line 2", "line 3"]);
    }

    #[test]
    fn whitespace_only_lines_and_a_zero_filled_tail_are_blank() {
        let text = "lat,lon\n51.5,-0.1\n   \n\t\n52,1\n\0\0\0\0\0\0";
        let (_, r) = ok(text);
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].line, 5);
        assert_eq!(r[1].row_number, 2);
    }

    #[test]
    fn nul_bytes_in_text_are_replaced_and_counted_in_coordinates_invalid() {
        let text = "id,lat,lon\na\0b,51.5,-0.1\nc,5\x001,1\n";
        let mut rd = RowReader::new(
            Box::new(Cursor::new(text.as_bytes().to_vec())),
            &CsvOptions::default(),
        )
        .unwrap();
        let first = rd.next_row().unwrap().unwrap();
        assert_eq!(first.fields, "a\u{FFFD}b,51.5,-0.1,");
        assert!(first.coordinate.is_ok());
        let second = rd.next_row().unwrap().unwrap();
        assert!(second.coordinate.unwrap_err().starts_with("line 3: latitude"));
        assert!(!second.fields.contains('\0'));
        assert_eq!(rd.replaced_fields(), 2);
        // A NUL in the first line is still a binary file.
        assert!(matches!(
            rows("la\0t,lon\n1,2\n", &CsvOptions::default()),
            Err(InputError::Binary(2))
        ));
    }

    #[test]
    fn excel_sep_line_names_the_delimiter() {
        for (text, d) in [
            ("sep=;\r\nlat;lon\r\n51,5;1\r\n", b';'),
            ("sep=,\nlat,lon\n51.5,1\n", b','),
        ] {
            let (layout, r) = ok(text);
            assert_eq!(layout.delimiter, d);
            assert_eq!(
                layout.header.as_deref(),
                Some(&["lat".to_string(), "lon".to_string()][..])
            );
            assert_eq!(r.len(), 1);
            assert_eq!(r[0].line, 3);
            assert!(r[0].coordinate.is_ok(), "{:?}", r[0].coordinate);
        }
        let (layout, r) = rows(
            "sep=|\ny|x\n1|2\n",
            &CsvOptions {
                lat_column: Some("y".into()),
                lon_column: Some("x".into()),
                delimiter: None,
                quote: None,
            },
        )
        .unwrap();
        assert_eq!(
            (layout.delimiter, r[0].coordinate.clone()),
            (b'|', Ok((1.0, 2.0)))
        );
    }

    #[test]
    fn utf16_with_a_bom_is_decoded() {
        let text = "id\tlat\tlon\r\nÅ\t51.5\t-0.1\r\n";
        for le in [true, false] {
            let mut bytes = if le { vec![0xFF, 0xFE] } else { vec![0xFE, 0xFF] };
            for u in text.encode_utf16() {
                bytes.extend(if le { u.to_le_bytes() } else { u.to_be_bytes() });
            }
            let mut rd = RowReader::new(Box::new(Cursor::new(bytes)), &CsvOptions::default()).unwrap();
            assert_eq!(rd.layout().delimiter, b'\t');
            let row = rd.next_row().unwrap().unwrap();
            assert_eq!(
                (row.fields.as_str(), row.coordinate),
                ("Å,51.5,-0.1,", Ok((51.5, -0.1)))
            );
        }
    }

    #[test]
    fn hemisphere_and_dms_rows() {
        let (_, r) = ok("lat,lon\n51.5014N,0.1419W\n\"51°30'05\"\"N\",\"0°08'31\"\"W\"\n-51.5N,1\n51.5E,1\n");
        assert_eq!(r[0].coordinate, Ok((51.5014, -0.1419)));
        let (lat, lon) = r[1].coordinate.clone().unwrap();
        assert!((lat - 51.501_388_9).abs() < 1e-6 && (lon + 0.141_944_4).abs() < 1e-6);
        assert_eq!(reasons(&r)[2..], ["line 4", "line 5"]);
    }
}
