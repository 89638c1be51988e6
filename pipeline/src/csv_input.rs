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
}

/// The shape of a file, decided from its first bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub delimiter: u8,
    /// The user's column names; `None` for a headerless file.
    pub header: Option<Vec<String>>,
    /// 0-based index of the latitude column.
    pub lat_index: usize,
    /// 0-based index of the longitude column.
    pub lon_index: usize,
}

impl Layout {
    /// Column names for the enriched CSV: the user's header, or `lat,lon` (and
    /// `column_3…`) for a headerless file.
    pub fn output_columns(&self, width: usize) -> Vec<String> {
        match &self.header {
            Some(h) => h.clone(),
            None => (0..width.max(2))
                .map(|i| match i {
                    _ if i == self.lat_index => "lat".to_string(),
                    _ if i == self.lon_index => "lon".to_string(),
                    _ => format!("column_{}", i + 1),
                })
                .collect(),
        }
    }
}

/// Why a file cannot be read at all; the import fails with this message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InputError {
    #[error("the file is empty: expected a CSV with latitude and longitude columns")]
    Empty,
    #[error("the file looks binary (NUL byte at offset {0}), not CSV text; is it compressed or a spreadsheet? Export it as CSV")]
    Binary(usize),
    #[error("no latitude/longitude columns found in header [{}]; name them lat/latitude and lon/lng/long/longitude, or pass the columns explicitly (--lat-column/--lon-column, spec.csv.latColumn/lonColumn)", .0.join(", "))]
    NoCoordinateColumns(Vec<String>),
    #[error("column {0:?} not found in header [{cols}]", cols = .1.join(", "))]
    ColumnNotFound(String, Vec<String>),
    #[error("headerless file with {0} columns: say which hold latitude and longitude as 1-based numbers (--lat-column 1 --lon-column 2)")]
    AmbiguousHeaderless(usize),
    #[error("only one column found (delimiters tried: , ; tab |): expected latitude and longitude columns")]
    OneColumn,
    #[error("latitude and longitude cannot be the same column ({0})")]
    SameColumn(usize),
    #[error("unsupported delimiter {0:?}: use one of , ; tab |")]
    Delimiter(String),
    #[error("CSV syntax error at line {line}: {message}")]
    Syntax { line: u64, message: String },
    #[error("reading the file failed: {0}")]
    Io(String),
}

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

/// Parses a coordinate field: trimmed, optional sign, `.` decimal point (or `,`
/// when the field delimiter is not a comma, as in European `;` files); NaN and
/// infinities are refused.
pub fn parse_degrees(field: &str, delimiter: u8) -> Result<f64, String> {
    let t = field.trim();
    if t.is_empty() {
        return Err("is empty".into());
    }
    let owned;
    let t = if delimiter != b',' && t.contains(',') && !t.contains('.') && t.matches(',').count() == 1 {
        owned = t.replace(',', ".");
        owned.as_str()
    } else {
        t
    };
    let lower = t.to_ascii_lowercase();
    if lower.contains("nan") || lower.contains("inf") {
        return Err(format!("{t:?} is not a finite number"));
    }
    match t.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(format!("{t:?} is not a number")),
    }
}

/// Validates one record's coordinate fields; the error names the line and says why.
pub fn validate(record: &csv::ByteRecord, layout: &Layout, line: u64) -> Result<(f64, f64), String> {
    let field = |idx: usize, what: &str| -> Result<f64, String> {
        let raw = record.get(idx).ok_or_else(|| {
            format!(
                "line {line}: missing {what} (row has {} field(s), {what} is column {})",
                record.len(),
                idx + 1
            )
        })?;
        let text = String::from_utf8_lossy(raw);
        parse_degrees(&text, layout.delimiter).map_err(|e| format!("line {line}: {what} {e}"))
    };
    let lat = field(layout.lat_index, "latitude")?;
    let lon = field(layout.lon_index, "longitude")?;
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

/// Decides the file's layout from its first bytes (BOM already removed).
pub fn detect(sample: &[u8], opts: &CsvOptions) -> Result<Layout, InputError> {
    if sample.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(InputError::Empty);
    }
    if let Some(pos) = sample.iter().position(|&b| b == 0) {
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
    let first = first_record(complete, delimiter)?;
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

    let by_option = |opt: &Option<String>| -> Result<Option<usize>, InputError> {
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
            .ok_or_else(|| InputError::ColumnNotFound(o.clone(), names.clone()))
    };
    let lat_opt = by_option(&opts.lat_column)?;
    let lon_opt = by_option(&opts.lon_column)?;

    let (lat_index, lon_index) = coordinate_columns(&names, has_header, lat_opt, lon_opt)?;
    if lat_index == lon_index {
        return Err(InputError::SameColumn(lat_index + 1));
    }
    Ok(Layout {
        delimiter,
        header: has_header.then_some(names),
        lat_index,
        lon_index,
    })
}

/// The latitude and longitude columns (0-based): the ones the options name,
/// else found by header name, else the two columns of a headerless file.
fn coordinate_columns(
    names: &[String],
    has_header: bool,
    lat_opt: Option<usize>,
    lon_opt: Option<usize>,
) -> Result<(usize, usize), InputError> {
    if has_header {
        let find = |list: &[&str]| {
            list.iter()
                .find_map(|cand| names.iter().position(|n| normalise_name(n) == *cand))
        };
        let geo_lat = find(&LAT_NAMES[..LAT_NAMES.len() - 1]);
        let geo_lon = find(&LON_NAMES[..LON_NAMES.len() - 1]);
        // x/y only when no latitude/longitude names are present.
        let (dlat, dlon) = if geo_lat.is_some() || geo_lon.is_some() {
            (geo_lat, geo_lon)
        } else {
            (find(&["y"]), find(&["x"]))
        };
        match (lat_opt.or(dlat), lon_opt.or(dlon)) {
            (Some(a), Some(b)) => Ok((a, b)),
            _ => Err(InputError::NoCoordinateColumns(names.to_vec())),
        }
    } else {
        match (lat_opt, lon_opt) {
            (Some(a), Some(b)) => Ok((a, b)),
            _ if names.len() == 2 => Ok((lat_opt.unwrap_or(0), lon_opt.unwrap_or(1))),
            _ => Err(InputError::AmbiguousHeaderless(names.len())),
        }
    }
}

fn reader_for(data: &[u8], delimiter: u8) -> csv::Reader<&[u8]> {
    csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(false)
        .flexible(true)
        .from_reader(data)
}

fn first_record(data: &[u8], delimiter: u8) -> Result<csv::ByteRecord, InputError> {
    let mut rdr = reader_for(data, delimiter);
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

/// Picks the delimiter that splits the sample's records into the same number (≥ 2)
/// of fields most consistently; `,` when nothing splits.
fn detect_delimiter(sample: &[u8]) -> u8 {
    let mut best = (b',', 0usize, 0usize); // (delimiter, records agreeing, width)
    for &d in &DELIMITERS {
        let mut rdr = reader_for(sample, d);
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

/// Records the byte offset of every `\n` it reads, so a record's line can be
/// told from its end offset (the csv crate's own line counter skips blank lines).
struct LineIndexed<R> {
    inner: R,
    offset: u64,
    newlines: Arc<Mutex<VecDeque<u64>>>,
    /// Total bytes once the source is exhausted.
    end: Arc<Mutex<Option<u64>>>,
}

impl<R: Read> Read for LineIndexed<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            *self.end.lock().expect("line index") = Some(self.offset);
        }
        let mut q = self.newlines.lock().expect("line index");
        q.extend(memchr::memchr_iter(b'\n', &buf[..n]).map(|p| self.offset + p as u64));
        self.offset += n as u64;
        Ok(n)
    }
}

/// Streams the rows of a CSV file; see the module docs.
pub struct RowReader {
    layout: Layout,
    csv: csv::Reader<Source>,
    record: csv::ByteRecord,
    next_row: u64,
    skip_header: bool,
    width: usize,
    newlines: Arc<Mutex<VecDeque<u64>>>,
    end: Arc<Mutex<Option<u64>>>,
    lines_before: u64,
}

impl RowReader {
    /// Reads the first [`SAMPLE_BYTES`] of `input`, strips a UTF-8 BOM, decides the
    /// layout and returns a reader positioned before the first data row.
    pub fn new(mut input: Box<dyn Read + Send>, opts: &CsvOptions) -> Result<Self, InputError> {
        let mut sample = Vec::with_capacity(SAMPLE_BYTES);
        (&mut input)
            .take(SAMPLE_BYTES as u64)
            .read_to_end(&mut sample)
            .map_err(|e| InputError::Io(e.to_string()))?;
        if sample.starts_with(&[0xEF, 0xBB, 0xBF]) {
            sample.drain(..3);
        }
        let layout = detect(&sample, opts)?;
        let width = layout.header.as_ref().map_or(2, Vec::len);
        let newlines = Arc::new(Mutex::new(VecDeque::new()));
        let end = Arc::new(Mutex::new(None));
        let indexed = LineIndexed {
            inner: Cursor::new(sample).chain(input),
            offset: 0,
            newlines: newlines.clone(),
            end: end.clone(),
        };
        let source: Source = BufReader::with_capacity(256 * 1024, indexed);
        let csv = csv::ReaderBuilder::new()
            .delimiter(layout.delimiter)
            .has_headers(false)
            .flexible(true)
            .from_reader(source);
        let skip_header = layout.header.is_some();
        Ok(Self {
            layout,
            csv,
            record: csv::ByteRecord::new(),
            next_row: 1,
            skip_header,
            width,
            newlines,
            end,
            lines_before: 0,
        })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Number of columns of the header (or of a headerless file's first row).
    pub fn width(&self) -> usize {
        self.width
    }

    /// The next row, `Ok(None)` at the end; `Err` only for an unreadable stream.
    pub fn next_row(&mut self) -> Result<Option<Row>, InputError> {
        loop {
            match self.csv.read_byte_record(&mut self.record) {
                Ok(false) => return Ok(None),
                Ok(true) => {}
                Err(e) => {
                    return match e.kind() {
                        csv::ErrorKind::Io(io) => Err(InputError::Io(io.to_string())),
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
            if self.skip_header {
                self.skip_header = false;
                continue;
            }
            let coordinate = validate(&self.record, &self.layout, line);
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
        let mut inside: u64 = self
            .record
            .iter()
            .map(|f| memchr::memchr_iter(b'\n', f).count() as u64)
            .sum();
        // A quote left open at the end of the file swallows the last line end
        // into the field: that newline is the one at `last`, not before it.
        let at_eof = *self.end.lock().expect("line index") == Some(self.csv.position().byte());
        if at_eof && self.record.iter().next_back().is_some_and(|f| f.ends_with(b"\n")) {
            inside = inside.saturating_sub(1);
        }
        self.lines_before + 1 - inside.min(self.lines_before)
    }

    fn encode_fields(&mut self) -> Result<String, InputError> {
        let mut out = String::with_capacity(self.record.as_slice().len() + 8);
        for (i, f) in self.record.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            push_csv_field(&mut out, &String::from_utf8_lossy(f));
        }
        Ok(out)
    }
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
        assert_eq!(r[0].fields, "7,\"Smith, J\",-0.1,51.5");
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
        assert_eq!(l.output_columns(2), vec!["lat", "lon"]);
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
            delimiter: None,
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
    fn quoted_newline_keeps_the_starting_line() {
        let (_, r) = ok("name,lat,lon\n\"a\nb\",51,0\nc,52,0\n");
        assert_eq!(r[0].line, 2);
        assert_eq!(r[1].line, 4);
        assert_eq!(r[0].fields, "\"a\nb\",51,0");
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
}
