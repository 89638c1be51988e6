//! TLS to PostgreSQL (issue 11, point 5): a server with `ssl=on` and only
//! `hostssl` lines in pg_hba.conf (`.ci/postgres.sh start-tls`), its
//! certificate signed by a CA this test makes with the openssl CLI.
//! `sslmode=verify-full` with that CA connects and a load runs through it; a
//! wrong CA, a host name the certificate does not name and a plaintext
//! connection are refused with a message that says why; asking for TLS from a
//! server without it never falls back to plaintext.
#![allow(clippy::too_many_lines)] // the 80-line limit is for non-test code

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use pipeline::{
    csv_input::CsvOptions,
    egress::EgressPolicy,
    load::{load, Source},
    model::ImportPhase,
    store::Store,
};

/// A throwaway PostgreSQL started by `.ci/postgres.sh`, stopped on drop.
struct Server {
    dir: PathBuf,
    url: String,
}

impl Server {
    fn start(dir: &Path, tls: Option<(&Path, &Path)>) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
            .to_string();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.ci/postgres.sh");
        let mut cmd = Command::new(script);
        match tls {
            Some((crt, key)) => cmd.arg("start-tls").arg(dir).arg(&port).arg(crt).arg(key),
            None => cmd.arg("start").arg(dir).arg(&port),
        };
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        Self {
            dir: dir.to_path_buf(),
            url: String::from_utf8(out.stdout).unwrap().trim().to_string(),
        }
    }

    /// The URL with another host (same port) and query.
    fn url(&self, host: &str, query: &str) -> String {
        let port = self.url.rsplit_once(':').unwrap().1.split('/').next().unwrap();
        format!("postgres://postgres@{host}:{port}/postgres?{query}")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.ci/postgres.sh");
        let _ = Command::new(script).arg("stop").arg(&self.dir).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed CA `NAME.crt`/`NAME.key` in `dir`.
fn make_ca(dir: &Path, name: &str) {
    let (crt, key) = (format!("{name}.crt"), format!("{name}.key"));
    #[rustfmt::skip]
    openssl(dir, &["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", &format!("/CN={name}"), "-keyout", &key, "-out", &crt,
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
}

/// `server.crt`/`server.key` for the name `localhost` only, signed by CA `ca`.
fn make_server_cert(dir: &Path) {
    #[rustfmt::skip]
    openssl(dir, &["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
        "-keyout", "server.key", "-out", "server.csr"]);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    #[rustfmt::skip]
    openssl(dir, &["x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "server.ext", "-out", "server.crt"]);
}

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
