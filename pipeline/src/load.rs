//! The reader: one import's CSV (a file, a URL or an upload stored in the
//! database) streamed through the CSV input rules into `points` and `lookups`.

use std::{
    io::Read,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use futures::TryStreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tokio_util::io::{StreamReader, SyncIoBridge};

use crate::{
    csv_input::{open_maybe_gzip, CsvOptions, InputError, Layout, Row, RowReader, SourceInterrupted},
    egress::{egress_error_in, EgressPolicy},
    store::{ImportRecord, LoadCounts, LoadEnd, Store, UploadMissing},
};

/// Where an import's CSV comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A local file (plain or gzip).
    File(PathBuf),
    /// An `http://` or `https://` URL, streamed.
    Url(String),
    /// An upload stored in the database by the upload API (`upload:<id>`).
    Upload(String),
}

impl Source {
    /// Parses `upload:<id>`, `http(s)://…`, `file://…` or a plain path.
    pub fn parse(s: &str) -> Self {
        if let Some(id) = s.strip_prefix("upload:") {
            Source::Upload(id.to_string())
        } else if s.starts_with("http://") || s.starts_with("https://") {
            Source::Url(s.to_string())
        } else {
            Source::File(PathBuf::from(s.strip_prefix("file://").unwrap_or(s)))
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Url(u) => f.write_str(u),
            Source::Upload(id) => write!(f, "upload:{id}"),
        }
    }
}

/// Why a load failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The input cannot be read as CSV of coordinates: retrying will not help.
    #[error("{0}")]
    Input(#[from] InputError),
    /// The source cannot be had (missing file, HTTP 404, no such upload):
    /// retrying will not help.
    #[error("{0}")]
    Source(String),
    /// The source is unavailable for now (connection refused, timeout,
    /// HTTP 5xx/429/408, a database error reading an upload): worth retrying.
    #[error("{0}")]
    Unavailable(String),
    /// Anything else (database, I/O): worth retrying.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl LoadError {
    /// Whether a retry of the reader Job could succeed.
    pub fn is_permanent(&self) -> bool {
        match self {
            LoadError::Input(e) => e.is_permanent(),
            LoadError::Source(_) => true,
            LoadError::Unavailable(_) | LoadError::Other(_) => false,
        }
    }
}

/// Counts bytes and hashes them (SHA-256) as they are read.
struct Hashing<R> {
    inner: R,
    state: Arc<Mutex<(Sha256, u64)>>,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut s = self.state.lock().expect("hash state");
        s.0.update(&buf[..n]);
        s.1 += n as u64;
        Ok(n)
    }
}

/// Why a fetch of `url` failed: the egress policy's reason when it refused a
/// connection or a redirect ([`LoadError::Source`]: a retry meets the same
/// policy), else reqwest's error with its causes ([`LoadError::Unavailable`]:
/// connection errors and timeouts may pass).
fn fetch_error(url: &str, e: &reqwest::Error) -> LoadError {
    if let Some(refused) = egress_error_in(e) {
        return LoadError::Source(format!("cannot fetch {url}: {refused}"));
    }
    let mut msg = format!("cannot fetch {url}: {e}");
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        msg.push_str(&format!(": {c}"));
        cause = c.source();
    }
    LoadError::Unavailable(msg)
}

async fn open(
    store: &Store,
    source: &Source,
    egress: &EgressPolicy,
) -> Result<Box<dyn Read + Send>, LoadError> {
    Ok(match source {
        Source::File(_) if egress.is_enforced() => {
            return Err(LoadError::Source(
                "refused by the egress policy: a file path is never a source of a Job \
                 (use an http(s) URL or an upload)"
                    .into(),
            ))
        }
        Source::File(p) => Box::new(
            std::fs::File::open(p)
                .map_err(|e| LoadError::Source(format!("cannot open {}: {e}", p.display())))?,
        ),
        Source::Url(u) => open_url(egress, u).await?,
        Source::Upload(id) => open_upload(store, id).await?,
    })
}

/// An HTTP(S) source, streamed, through the egress policy's client: a URL or
/// a connection (any redirect hop included) the policy refuses is
/// [`LoadError::Source`]. HTTP 408, 429 and 5xx, connection errors and
/// timeouts are [`LoadError::Unavailable`]; other statuses are
/// [`LoadError::Source`]; a stream cut off midway is
/// [`InputError::Interrupted`].
async fn open_url(egress: &EgressPolicy, u: &str) -> Result<Box<dyn Read + Send>, LoadError> {
    let url = url::Url::parse(u).map_err(|e| LoadError::Source(format!("cannot fetch {u}: {e}")))?;
    egress
        .check_source_url(&url)
        .map_err(|e| LoadError::Source(format!("cannot fetch {u}: {e}")))?;
    let resp = egress
        .source_client()
        .get(url)
        .send()
        .await
        .map_err(|e| fetch_error(u, &e))?;
    let status = resp.status();
    if !status.is_success() {
        let msg = format!("cannot fetch {u}: HTTP {status}");
        let transient = status.is_server_error()
            || status == reqwest::StatusCode::TOO_MANY_REQUESTS
            || status == reqwest::StatusCode::REQUEST_TIMEOUT;
        return Err(if transient {
            LoadError::Unavailable(msg)
        } else {
            LoadError::Source(msg)
        });
    }
    let stream = resp
        .bytes_stream()
        .map_err(|e| std::io::Error::other(SourceInterrupted(format!("the download stopped: {e}"))));
    Ok(Box::new(SyncIoBridge::new(StreamReader::new(Box::pin(stream)))))
}

/// An upload stored by the upload API, read chunk by chunk. A missing upload
/// is [`LoadError::Source`]; a database error is [`LoadError::Unavailable`]
/// at the start and [`InputError::Interrupted`] midway.
async fn open_upload(store: &Store, id: &str) -> Result<Box<dyn Read + Send>, LoadError> {
    match store.upload_chunk(id, 0).await {
        Ok(_) => {}
        Err(e) if e.is::<UploadMissing>() => return Err(LoadError::Source(e.to_string())),
        Err(e) => return Err(LoadError::Unavailable(format!("cannot read upload {id}: {e:#}"))),
    }
    let (store, id) = (store.clone(), id.to_string());
    let stream = futures::stream::try_unfold(0i32, move |seq| {
        let (store, id) = (store.clone(), id.clone());
        async move {
            match store.upload_chunk(&id, seq).await {
                Ok(Some(data)) => Ok(Some((bytes::Bytes::from(data), seq + 1))),
                Ok(None) => Ok(None),
                Err(e) => Err(std::io::Error::other(SourceInterrupted(format!(
                    "reading upload {id} failed: {e:#}"
                )))),
            }
        }
    });
    Ok(Box::new(SyncIoBridge::new(StreamReader::new(Box::pin(stream)))))
}

/// Rows sent to the database per batch.
const BATCH_ROWS: usize = 8192;

/// Loads `source` into the import, replacing any earlier load: every data row
/// ends `pending` or `invalid`. Parsing runs on a blocking thread, writing on
/// the async side, with a bounded channel between them, so memory stays flat.
/// `egress` decides what a file or URL source may reach
/// ([`crate::egress`]); a refused source is a [`LoadError::Source`] and
/// nothing is stored.
pub async fn load(
    store: &Store,
    import: &ImportRecord,
    source: &Source,
    opts: &CsvOptions,
    egress: &EgressPolicy,
) -> Result<LoadCounts, LoadError> {
    let input = open(store, source, egress).await?;
    let state = Arc::new(Mutex::new((Sha256::new(), 0u64)));
    let hashing: Box<dyn Read + Send> = Box::new(Hashing {
        inner: input,
        state: state.clone(),
    });
    let (layout_tx, layout_rx) = oneshot::channel::<Result<(Layout, usize), InputError>>();
    let (rows_tx, rows_rx) = mpsc::channel::<Vec<Row>>(8);
    let opts = opts.clone();
    let parser = tokio::task::spawn_blocking(move || -> Result<Option<String>, InputError> {
        let input = match open_maybe_gzip(hashing) {
            Ok(i) => i,
            Err(e) => {
                let _ = layout_tx.send(Err(InputError::from_io(&e)));
                return Ok(None);
            }
        };
        let mut reader = match RowReader::new(input, &opts) {
            Ok(r) => r,
            Err(e) => {
                let _ = layout_tx.send(Err(e));
                return Ok(None);
            }
        };
        let _ = layout_tx.send(Ok((reader.layout().clone(), reader.width())));
        let mut batch = Vec::with_capacity(BATCH_ROWS);
        while let Some(row) = reader.next_row()? {
            batch.push(row);
            if batch.len() == BATCH_ROWS
                && rows_tx
                    .blocking_send(std::mem::replace(&mut batch, Vec::with_capacity(BATCH_ROWS)))
                    .is_err()
            {
                return Ok(None); // the writer failed; its error is reported
            }
        }
        if !batch.is_empty() {
            let _ = rows_tx.blocking_send(batch);
        }
        Ok(repairs(&reader))
    });
    let (layout, width) = layout_rx
        .await
        .map_err(|_| anyhow::anyhow!("CSV parser stopped"))??;
    let done = async move {
        match parser.await {
            Ok(Ok(warnings)) => {
                let s = state.lock().expect("hash state");
                Ok(LoadEnd {
                    sha256: hex::encode(s.0.clone().finalize()),
                    warnings,
                })
            }
            Ok(Err(e)) => Err(anyhow::Error::new(e)),
            Err(e) => Err(anyhow::anyhow!("CSV parser panicked: {e}")),
        }
    };
    match store.load(import, &layout, width, done, rows_rx).await {
        Ok(c) => Ok(c),
        Err(e) => match e.downcast::<InputError>() {
            Ok(ie) => Err(LoadError::Input(ie)),
            Err(e) => Err(LoadError::Other(e)),
        },
    }
}

/// What the reader had to repair or could not read as records, one warning a
/// line (each also logged); `None` when nothing.
fn repairs(reader: &RowReader) -> Option<String> {
    let mut warnings = vec![];
    if reader.spanning_rows() > 0 {
        warnings.push(format!(
            "{} rows whose quoted field spans lines are invalid (their error names the lines); \
             a stray quote? read the file unquoted with --quote none (spec.csv.quote: none)",
            reader.spanning_rows()
        ));
    }
    if reader.replaced_fields() > 0 {
        warnings.push(format!(
            "{} fields held NUL bytes or invalid UTF-8: those bytes are stored as U+FFFD",
            reader.replaced_fields()
        ));
    }
    let (short, long) = reader.ragged_rows();
    if short > 0 {
        warnings.push(format!(
            "{short} rows had fewer fields than the header: padded with empty fields"
        ));
    }
    if long > 0 {
        warnings.push(format!(
            "{long} rows had more fields than the header: the surplus is in the extra_fields column"
        ));
    }
    for w in &warnings {
        tracing::warn!("{w}");
    }
    (!warnings.is_empty()).then(|| warnings.join("\n"))
}

/// SHA-256 (hex) of a file, for deciding whether a local re-run may resume.
pub fn sha256_file(path: &std::path::Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}
