//! TLS to PostgreSQL (issue 11, point 5): a server with `ssl=on` and only
//! `hostssl` lines in pg_hba.conf (`.ci/postgres.sh start-tls`), its
//! certificate signed by a CA this test makes with the openssl CLI.
//! `sslmode=verify-full` with that CA connects and a load runs through it; a
//! wrong CA, a host name the certificate does not name and a plaintext
//! connection are refused with a message that says why; asking for TLS from a
//! server without it never falls back to plaintext.
#![allow(clippy::too_many_lines)] // the 80-line limit is for non-test code

#[path = "support/tls_postgres.rs"]
mod tls_postgres;

use std::path::PathBuf;

use pipeline::{
    csv_input::CsvOptions,
    egress::EgressPolicy,
    load::{load, Source},
    model::ImportPhase,
    store::Store,
};
use tls_postgres::{make_ca, make_server_cert, Server};

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pg-tls-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

async fn refused(url: &str) -> String {
    match Store::connect(url).await {
        Ok(_) => panic!("{url} connected"),
        Err(e) => format!("{e:#}"),
    }
}

#[tokio::test]
async fn verify_full_with_the_test_ca_loads_and_a_wrong_ca_or_plaintext_is_refused() {
    let certs = temp_dir("certs");
    make_ca(&certs, "ca");
    make_ca(&certs, "wrong-ca");
    make_server_cert(&certs);
    let server = Server::start(
        &temp_dir("server"),
        Some((&certs.join("server.crt"), &certs.join("server.key"))),
    );
    let ca = certs.join("ca.crt").display().to_string();
    let wrong = certs.join("wrong-ca.crt").display().to_string();

    // The right CA, the name on the certificate: connects, encrypted, and the store works.
    let store = Store::connect(&server.url("localhost", &format!("sslmode=verify-full&sslrootcert={ca}")))
        .await
        .unwrap();
    assert!(store.uses_tls().await.unwrap(), "the connection is encrypted");
    store.migrate().await.unwrap();
    let csv = certs.join("in.csv");
    let mut text = String::from("id,lat,lon\n");
    for i in 0..500 {
        text.push_str(&format!("{i},{},-0.1\n", 51.0 + f64::from(i) * 1e-3));
    }
    text.push_str("bad,x,y\n");
    std::fs::write(&csv, text).unwrap();
    let imp = store.ensure_import("tls-1", "t", "file", 2).await.unwrap();
    let c = load(
        &store,
        &imp,
        &Source::File(csv),
        &CsvOptions::default(),
        &EgressPolicy::unrestricted(),
    )
    .await
    .unwrap();
    assert_eq!((c.rows, c.invalid), (501, 1));
    let imp = store.import("tls-1").await.unwrap().unwrap();
    assert_eq!((imp.phase, imp.rows_total), (ImportPhase::Loaded, 501));
    store.close().await;

    // A CA given without sslmode means verify-full, not sqlx's `prefer`.
    let e = refused(&server.url("127.0.0.1", &format!("sslrootcert={ca}"))).await;
    assert!(e.contains("sslmode=verify-full"), "{e}");
    assert!(e.contains("does not name the host 127.0.0.1"), "{e}");
    // verify-ca checks the CA but not the name.
    let store = Store::connect(&server.url("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={ca}")))
        .await
        .unwrap();
    assert!(store.uses_tls().await.unwrap());
    store.close().await;

    // The wrong CA: refused, and the message says so.
    let e = refused(&server.url("localhost", &format!("sslmode=verify-full&sslrootcert={wrong}"))).await;
    assert!(e.contains("not signed by the CA in sslrootcert"), "{e}");
    let e = refused(&server.url("localhost", &format!("sslmode=verify-ca&sslrootcert={wrong}"))).await;
    assert!(e.contains("not signed by the CA in sslrootcert"), "{e}");
    // No CA at all: the webpki roots do not know the test CA either.
    let e = refused(&server.url("localhost", "sslmode=verify-full")).await;
    assert!(e.contains("not signed by the CA"), "{e}");
    // A CA file that is not there is named.
    let e = refused(&server.url("localhost", "sslmode=verify-full&sslrootcert=/nonexistent/ca.crt")).await;
    assert!(e.contains("sslrootcert /nonexistent/ca.crt"), "{e}");
    // Plaintext: the server has only hostssl lines.
    let e = refused(&server.url("localhost", "sslmode=disable")).await;
    assert!(e.contains("no encryption"), "{e}");

    // A server without TLS: asking for TLS never falls back to plaintext.
    let plain = Server::start(&temp_dir("plain"), None);
    for query in ["sslmode=require".to_string(), format!("sslrootcert={ca}")] {
        let e = refused(&plain.url("localhost", &query)).await;
        assert!(e.contains("does not offer TLS"), "{query}: {e}");
    }
    let _ = std::fs::remove_dir_all(&certs);
}
