//! A throwaway PostgreSQL with TLS for the tests (`.ci/postgres.sh
//! start-tls`) and the openssl CLI steps that make its test CA and server
//! certificate. Shared by `pipeline/tests/postgres_tls.rs` and the operator's
//! end-to-end tests (included with `#[path]`).
#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    process::Command,
};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../.ci/postgres.sh")
}

/// A throwaway PostgreSQL started by `.ci/postgres.sh`, stopped on drop.
pub struct Server {
    dir: PathBuf,
    url: String,
}

impl Server {
    pub fn start(dir: &Path, tls: Option<(&Path, &Path)>) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
            .to_string();
        let mut cmd = Command::new(script());
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
    pub fn url(&self, host: &str, query: &str) -> String {
        let port = self.url.rsplit_once(':').unwrap().1.split('/').next().unwrap();
        format!("postgres://postgres@{host}:{port}/postgres?{query}")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new(script()).arg("stop").arg(&self.dir).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn openssl(dir: &Path, args: &[&str]) {
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
pub fn make_ca(dir: &Path, name: &str) {
    let (crt, key) = (format!("{name}.crt"), format!("{name}.key"));
    #[rustfmt::skip]
    openssl(dir, &["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", &format!("/CN={name}"), "-keyout", &key, "-out", &crt,
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
}

/// `server.crt`/`server.key` for the name `localhost` only, signed by CA `ca`.
pub fn make_server_cert(dir: &Path) {
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
