//! Where an import's CSV comes from, and whose fault a failure is: a source
//! that is wrong (HTTP 404, no such upload) fails the import for good; one
//! that is unavailable for now (connection refused, HTTP 503/429, a download
//! cut off midway, a database error while reading an upload) is retried, and
//! nothing is stored. Run on PostgreSQL and SQLite alike; the HTTP server is a
//! raw socket that answers as told, so it can misbehave on demand.

mod common;

use common::fresh_pg;
use pipeline::{
    csv_input::CsvOptions,
    egress::EgressPolicy,
    load::{load, LoadError, Source},
    model::ImportPhase,
    store::Store,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

const CSV: &str = "lat,lon\n51.5,-0.1\n52.5,-1.1\n";

/// Serves every connection with `response` (raw HTTP bytes), then closes it.
async fn http_server(response: Vec<u8>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let response = response.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
                let _ = sock.write_all(&response).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    format!("http://{addr}/trips.csv")
}

fn response(status: &str, body: &str, content_length: usize) -> Vec<u8> {
    format!("HTTP/1.1 {status}\r\ncontent-type: text/csv\r\ncontent-length: {content_length}\r\nconnection: close\r\n\r\n{body}")
        .into_bytes()
}

async fn sqlite() -> Store {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let path = std::env::temp_dir().join(format!("sources-{}-{nanos:x}.db", std::process::id()));
    let store = Store::connect(path.to_str().unwrap()).await.unwrap();
    store.migrate().await.unwrap();
    store
}

async fn stores() -> Vec<(&'static str, Store)> {
    vec![("postgres", fresh_pg().await), ("sqlite", sqlite().await)]
}

/// Loads `source` as a new import with no egress policy (as the `local`
/// runner does); the error (if any) and the rows stored.
async fn try_load(store: &Store, uid: &str, source: &str) -> (Option<LoadError>, i64, ImportPhase) {
    try_load_with(store, uid, source, &EgressPolicy::unrestricted()).await
}

/// [`try_load`] under `egress`.
async fn try_load_with(
    store: &Store,
    uid: &str,
    source: &str,
    egress: &EgressPolicy,
) -> (Option<LoadError>, i64, ImportPhase) {
    let import = store.ensure_import(uid, uid, source, 2).await.unwrap();
    let result = load(
        store,
        &import,
        &Source::parse(source),
        &CsvOptions::default(),
        egress,
    )
    .await;
    let after = store.import(uid).await.unwrap().unwrap();
    (result.err(), after.rows_total, after.phase)
}

#[tokio::test]
async fn an_unavailable_http_source_is_retryable_and_a_wrong_one_is_not() {
    let ok = http_server(response("200 OK", CSV, CSV.len())).await;
    let unavailable = [
        http_server(response("503 Service Unavailable", "busy", 4)).await,
        http_server(response("429 Too Many Requests", "slow down", 9)).await,
        // the download stops after the first row: the peer closes early
        http_server(response("200 OK", "lat,lon\n51.5,-0.1\n", CSV.len() + 1000)).await,
        // nothing listens on this port any more
        {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = l.local_addr().unwrap().port();
            drop(l);
            format!("http://127.0.0.1:{port}/trips.csv")
        },
    ];
    let wrong = [
        http_server(response("404 Not Found", "no", 2)).await,
        http_server(response("403 Forbidden", "no", 2)).await,
    ];
    for (db, store) in stores().await {
        let (err, rows, phase) = try_load(&store, "ok", &ok).await;
        assert!(err.is_none(), "{db}: {err:?}");
        assert_eq!((rows, phase), (2, ImportPhase::Loaded), "{db}");
        for (i, url) in unavailable.iter().enumerate() {
            let (err, rows, _) = try_load(&store, &format!("unavailable-{i}"), url).await;
            let err = err.unwrap_or_else(|| panic!("{db}: {url} loaded"));
            assert!(!err.is_permanent(), "{db}: {url}: {err} should be retried");
            assert_eq!(rows, 0, "{db}: {url}");
        }
        for (i, url) in wrong.iter().enumerate() {
            let (err, rows, _) = try_load(&store, &format!("wrong-{i}"), url).await;
            let err = err.unwrap_or_else(|| panic!("{db}: {url} loaded"));
            assert!(err.is_permanent(), "{db}: {url}: {err} should fail the import");
            assert!(err.to_string().contains("HTTP 40"), "{db}: {err}");
            assert_eq!(rows, 0, "{db}: {url}");
        }
    }
}

#[tokio::test]
async fn a_missing_upload_fails_for_good_and_a_database_error_is_retried() {
    for (db, store) in stores().await {
        let (err, _, _) = try_load(&store, "no-upload", "upload:nope").await;
        let err = err.expect("a missing upload is an error");
        assert!(err.is_permanent(), "{db}: {err}");
        assert!(
            err.to_string().contains("upload nope does not exist"),
            "{db}: {err}"
        );

        store.create_upload("u1").await.unwrap();
        store.append_upload_chunk("u1", 0, CSV.as_bytes()).await.unwrap();
        let (err, _, _) = try_load(&store, "incomplete", "upload:u1").await;
        assert!(err.expect("incomplete").is_permanent(), "{db}");
        store.finish_upload("u1", CSV.len() as i64, "x").await.unwrap();
        let (err, rows, _) = try_load(&store, "uploaded", "upload:u1").await;
        assert!(err.is_none(), "{db}: {err:?}");
        assert_eq!(rows, 2, "{db}");

        // The database goes away while the upload is to be read.
        let import = store.import("uploaded").await.unwrap().unwrap();
        store.close().await;
        let err = load(
            &store,
            &import,
            &Source::parse("upload:u1"),
            &CsvOptions::default(),
            &EgressPolicy::unrestricted(),
        )
        .await
        .expect_err("a closed database cannot be read");
        assert!(!err.is_permanent(), "{db}: {err} should be retried");
    }
}

#[tokio::test]
async fn a_missing_file_fails_for_good() {
    let store = sqlite().await;
    let (err, rows, _) = try_load(&store, "missing", "/nonexistent/dir/trips.csv").await;
    let err = err.expect("missing file");
    assert!(err.is_permanent(), "{err}");
    assert!(
        err.to_string().contains("cannot open /nonexistent/dir/trips.csv"),
        "{err}"
    );
    assert_eq!(rows, 0);
}

/// Under the Jobs' egress policy a refused source fails the import for good
/// (a retry meets the same policy) with nothing stored, while an allowed
/// source that is unavailable is still retried: the policy's client keeps
/// the distinction.
#[tokio::test]
async fn a_source_the_egress_policy_refuses_fails_for_good() {
    let ok = http_server(response("200 OK", CSV, CSV.len())).await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        format!("http://127.0.0.1:{port}/trips.csv")
    };
    let port = ok.rsplit(':').next().unwrap().split('/').next().unwrap();
    // files.example.test stands for a public name whose DNS answers a private address.
    let public_only = EgressPolicy::enforced(Vec::new(), Vec::new(), Vec::new(), None)
        .with_host("files.example.test", &["10.0.0.1".parse().unwrap()]);
    let loopback_allowed = EgressPolicy::enforced(
        vec!["127.0.0.1/32".parse().unwrap()],
        Vec::new(),
        Vec::new(),
        None,
    );
    for (db, store) in stores().await {
        for (i, (url, reason)) in [
            (ok.clone(), "127.0.0.1 is a loopback address"),
            (
                format!("http://localhost:{port}/trips.csv"),
                "localhost resolves to",
            ),
            ("/etc/passwd".to_string(), "a file path is never a source"),
            (
                "https://files.example.test/trips.csv".to_string(),
                "files.example.test resolves to 10.0.0.1 is a private address",
            ),
            (
                "http://169.254.169.254/latest/meta-data/".to_string(),
                "link-local",
            ),
        ]
        .iter()
        .enumerate()
        {
            let (err, rows, _) = try_load_with(&store, &format!("refused-{i}"), url, &public_only).await;
            let err = err.unwrap_or_else(|| panic!("{db}: {url} loaded"));
            assert!(err.is_permanent(), "{db}: {url}: {err} should fail the import");
            let msg = err.to_string();
            assert!(
                msg.contains("refused by the egress policy") && msg.contains(reason),
                "{db}: {url}: {msg}"
            );
            assert_eq!(rows, 0, "{db}: {url}");
        }
        let (err, rows, phase) = try_load_with(&store, "allowed", &ok, &loopback_allowed).await;
        assert!(err.is_none(), "{db}: {err:?}");
        assert_eq!((rows, phase), (2, ImportPhase::Loaded), "{db}");
        let (err, rows, _) = try_load_with(&store, "allowed-dead", &dead, &loopback_allowed).await;
        let err = err.unwrap_or_else(|| panic!("{db}: {dead} loaded"));
        assert!(!err.is_permanent(), "{db}: {dead}: {err} should be retried");
        assert_eq!(rows, 0, "{db}");
    }
}
