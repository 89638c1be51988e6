//! What the Job binaries may read and call inside a cluster (issue 18: an
//! import must not be turned against the cluster). Whoever may create a
//! `PostcodeImport` chooses `source.url`, `api.baseUrl` and `offlinePostcodes`;
//! the cluster admin chooses, in the chart, what those may reach:
//!
//! - **Sources** (`source.url`): `http(s)` only, never a file path; the peer
//!   address of every connection actually made (after DNS resolution, so a
//!   name that resolves to a private address is refused, whatever it resolved
//!   to before) must be public, or inside an allowed CIDR; every redirect hop
//!   is checked the same way. Refused: loopback, link-local (incl. the cloud
//!   metadata address 169.254.169.254), private (RFC 1918, unique local),
//!   shared (100.64/10), multicast, reserved and unspecified ranges, and the
//!   admin's deny CIDRs (the cluster's Service and Pod CIDRs when public).
//! - **API base URLs** (`api.baseUrl`): only those on the allowlist
//!   (default [`DEFAULT_ALLOWED_API_URLS`]); the API client follows no redirect.
//! - **Offline postcode files** (`offlinePostcodes`): only files inside the
//!   allowed directory (none by default), after resolving symlinks and `..`.
//!
//! The policy comes from the environment ([`EgressPolicy::from_env`]); the
//! operator sets it on every Job from its own settings (the chart's `egress`
//! values). The `local` runner runs the Jobs as the user on the user's own
//! machine and turns the policy off (`EGRESS_POLICY=off`).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
};

use ipnet::IpNet;
use url::{Host, Url};

/// `EGRESS_POLICY`: `enforce` (the default) or `off` (the `local` runner).
pub const ENV_POLICY: &str = "EGRESS_POLICY";
/// `EGRESS_ALLOW_CIDRS`: comma-separated CIDRs a source may connect to even
/// though they are not public (e.g. an in-cluster object store).
pub const ENV_ALLOW_CIDRS: &str = "EGRESS_ALLOW_CIDRS";
/// `EGRESS_DENY_CIDRS`: comma-separated CIDRs refused besides the built-in
/// non-public ranges (the cluster's Service and Pod CIDRs when public).
pub const ENV_DENY_CIDRS: &str = "EGRESS_DENY_CIDRS";
/// `EGRESS_ALLOWED_API_URLS`: comma-separated API base URLs; `*` allows any.
pub const ENV_ALLOWED_API_URLS: &str = "EGRESS_ALLOWED_API_URLS";
/// `EGRESS_OFFLINE_DIR`: the directory offline postcode files must be in.
pub const ENV_OFFLINE_DIR: &str = "EGRESS_OFFLINE_DIR";

/// The API base URLs allowed when nothing is configured.
pub const DEFAULT_ALLOWED_API_URLS: &str = "https://api.postcodes.io";

/// Redirects a source fetch follows at most (reqwest's default).
const MAX_REDIRECTS: usize = 10;

/// Why the egress policy refused something; the message names what and why
/// (it holds the user's own URL or path, never fetched content).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("refused by the egress policy: {0}")]
pub struct EgressError(pub String);

/// The built-in ranges a source may not reach unless allowed, with what they are.
fn non_public(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => non_public_v4(v4),
            None => non_public_v6(v6),
        },
    }
}

fn non_public_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        _ if ip.is_unspecified() || a == 0 => "an unspecified (\"this network\") address",
        _ if ip.is_loopback() => "a loopback address",
        (169, 254, _) => "a link-local address (incl. cloud metadata)",
        _ if ip.is_private() => "a private address",
        (100, 64..=127, _) => "a shared (carrier-grade NAT) address",
        (192, 0, 0) => "an IETF protocol address",
        (198, 18..=19, _) => "a benchmarking address",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "a documentation address",
        _ if ip.is_multicast() => "a multicast address",
        _ if a >= 240 => "a reserved or broadcast address",
        _ => return None,
    })
}

fn non_public_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let seg0 = ip.segments()[0];
    Some(match seg0 {
        _ if ip.is_unspecified() => "an unspecified address",
        _ if ip.is_loopback() => "a loopback address",
        _ if seg0 & 0xffc0 == 0xfe80 => "a link-local address",
        _ if seg0 & 0xfe00 == 0xfc00 => "a unique local (private) address",
        _ if seg0 & 0xff00 == 0xff00 => "a multicast address",
        // NAT64 (64:ff9b::/96) and IPv4-compatible forms reach IPv4 addresses.
        0x0064 if ip.segments()[1] == 0xff9b => "a NAT64 address",
        0 => "an IPv4-compatible or reserved address",
        0x2001 if ip.segments()[1] == 0x0db8 => "a documentation address",
        _ => return None,
    })
}

/// What the Job binaries may read and call; see the module docs.
#[derive(Debug, Clone)]
pub struct EgressPolicy {
    enforce: bool,
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
    api_urls: Vec<String>,
    offline_dir: Option<PathBuf>,
    /// Names answered before DNS (see [`EgressPolicy::with_host`]); their
    /// addresses are checked like any other.
    hosts: Vec<(String, Vec<IpAddr>)>,
}

fn cidrs(name: &str, value: &str) -> Result<Vec<IpNet>, EgressError> {
    split_list(value)
        .map(|c| {
            c.parse::<IpNet>()
                .or_else(|_| c.parse::<IpAddr>().map(IpNet::from))
                .map_err(|e| EgressError(format!("{name}: {c:?} is not a CIDR: {e}")))
        })
        .collect()
}

fn split_list(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

impl EgressPolicy {
    /// No restriction at all: what the `local` runner uses on the user's machine.
    pub fn unrestricted() -> Self {
        Self {
            enforce: false,
            allow: Vec::new(),
            deny: Vec::new(),
            api_urls: vec!["*".into()],
            offline_dir: None,
            hosts: Vec::new(),
        }
    }

    /// The enforced policy: public sources plus `allow_cidrs` minus
    /// `deny_cidrs`, the given API base URLs, offline files under `offline_dir`.
    pub fn enforced(
        allow_cidrs: Vec<IpNet>,
        deny_cidrs: Vec<IpNet>,
        api_urls: Vec<String>,
        offline_dir: Option<PathBuf>,
    ) -> Self {
        Self {
            enforce: true,
            allow: allow_cidrs,
            deny: deny_cidrs,
            api_urls,
            offline_dir,
            hosts: Vec::new(),
        }
    }

    /// The same policy with `name` resolving to `addrs` before any DNS
    /// lookup, as an `/etc/hosts` line or a cluster DNS record would make it;
    /// the addresses still go through [`EgressPolicy::check_ip`] (unlike
    /// reqwest's own `resolve` override, which would skip the check). Tests
    /// use it to point a public-looking name at a private address.
    pub fn with_host(mut self, name: &str, addrs: &[IpAddr]) -> Self {
        self.hosts.push((name.to_ascii_lowercase(), addrs.to_vec()));
        self
    }

    /// Reads the policy from the `EGRESS_*` variables ([`ENV_POLICY`] …);
    /// errors on an unknown `EGRESS_POLICY` or a malformed CIDR.
    pub fn from_env() -> Result<Self, EgressError> {
        let var = |n: &str| std::env::var(n).unwrap_or_default();
        match var(ENV_POLICY).as_str() {
            "off" => return Ok(Self::unrestricted()),
            "" | "enforce" => {}
            other => {
                return Err(EgressError(format!(
                    "{ENV_POLICY}={other:?}: expected enforce or off"
                )))
            }
        }
        let api = std::env::var(ENV_ALLOWED_API_URLS).unwrap_or_else(|_| DEFAULT_ALLOWED_API_URLS.into());
        Self::parse(
            &var(ENV_ALLOW_CIDRS),
            &var(ENV_DENY_CIDRS),
            &api,
            &var(ENV_OFFLINE_DIR),
        )
    }

    /// The enforced policy from its settings as text: comma-separated CIDRs
    /// (a bare address is a /32 or /128), comma-separated API base URLs, the
    /// offline directory (`""` = none); errors on a malformed CIDR.
    pub fn parse(allow: &str, deny: &str, api_urls: &str, offline_dir: &str) -> Result<Self, EgressError> {
        Ok(Self::enforced(
            cidrs(ENV_ALLOW_CIDRS, allow)?,
            cidrs(ENV_DENY_CIDRS, deny)?,
            split_list(api_urls).map(str::to_string).collect(),
            Some(offline_dir).filter(|d| !d.is_empty()).map(PathBuf::from),
        ))
    }

    /// Whether anything is checked.
    pub fn is_enforced(&self) -> bool {
        self.enforce
    }

    /// Whether a source connection may go to `ip`: not denied, and public or allowed.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), EgressError> {
        if !self.enforce {
            return Ok(());
        }
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        if self.deny.iter().any(|n| n.contains(&ip)) {
            return Err(EgressError(format!("{ip} is in a denied range")));
        }
        match non_public(ip) {
            Some(what) if !self.allow.iter().any(|n| n.contains(&ip)) => Err(EgressError(format!(
                "{ip} is {what}; sources must be public addresses unless the chart allows them (egress.allowSourceCidrs)"
            ))),
            _ => Ok(()),
        }
    }

    /// Whether a source URL may be fetched before any connection: `http(s)`
    /// with a host, and an IP-literal host passes [`EgressPolicy::check_ip`]
    /// (names are checked when they resolve).
    pub fn check_source_url(&self, url: &Url) -> Result<(), EgressError> {
        if !self.enforce {
            return Ok(());
        }
        if !matches!(url.scheme(), "http" | "https") {
            return Err(EgressError(format!(
                "scheme {:?}: a source must be an http(s) URL",
                url.scheme()
            )));
        }
        match url.host() {
            None => Err(EgressError("a source URL must name a host".into())),
            Some(Host::Ipv4(ip)) => self.check_ip(IpAddr::V4(ip)),
            Some(Host::Ipv6(ip)) => self.check_ip(IpAddr::V6(ip)),
            Some(Host::Domain(_)) => Ok(()),
        }
    }

    /// Whether the enrichers may call the API at `base_url`: its scheme, host
    /// and port equal an allowed base URL's and its path starts with that one's.
    pub fn check_api_url(&self, base_url: &str) -> Result<(), EgressError> {
        if !self.enforce || self.api_urls.iter().any(|a| a == "*") {
            return Ok(());
        }
        let url = Url::parse(base_url).map_err(|e| EgressError(format!("API URL {base_url:?}: {e}")))?;
        let allowed = self.api_urls.iter().filter_map(|a| Url::parse(a).ok()).any(|a| {
            a.scheme() == url.scheme()
                && a.host() == url.host()
                && a.port_or_known_default() == url.port_or_known_default()
                && url.path().starts_with(a.path().trim_end_matches('/'))
        });
        if allowed {
            Ok(())
        } else {
            Err(EgressError(format!(
                "API URL {base_url} is not one of the allowed API URLs ({}; chart value egress.allowedApiUrls)",
                self.api_urls.join(", ")
            )))
        }
    }

    /// The offline postcode file at `path` when it is inside the allowed
    /// directory (symlinks and `..` resolved); refused when no directory is allowed.
    pub fn check_offline_path(&self, path: &Path) -> Result<PathBuf, EgressError> {
        if !self.enforce {
            return Ok(path.to_path_buf());
        }
        let Some(dir) = &self.offline_dir else {
            return Err(EgressError(
                "offline postcode files are not allowed (chart value egress.offlinePostcodesDir is empty)"
                    .into(),
            ));
        };
        let outside = || {
            EgressError(format!(
                "offline postcode file {} is not inside {} (chart value egress.offlinePostcodesDir)",
                path.display(),
                dir.display()
            ))
        };
        let lexically_inside = plain_path(path) && path.starts_with(dir);
        let dir = dir.canonicalize().map_err(|e| {
            if !lexically_inside {
                return outside();
            }
            EgressError(format!(
                "the allowed directory {} cannot be opened: {e} (chart value egress.offlinePostcodesDir; is its volume mounted?)",
                dir.display()
            ))
        })?;
        // A file that does not exist (or cannot be reached) is said so, but
        // only when its path lies lexically inside the directory: outside it,
        // whether a path exists is none of the import's business.
        let real = path.canonicalize().map_err(|e| {
            if plain_path(path) && path.starts_with(&dir) {
                EgressError(format!("offline postcode file {}: {e}", path.display()))
            } else {
                outside()
            }
        })?;
        if real.starts_with(&dir) && real.is_file() {
            Ok(real)
        } else {
            Err(outside())
        }
    }

    /// The check of [`EgressPolicy::check_offline_path`] made where the file
    /// cannot be seen (the upload API, for a path in the Job pods): the path
    /// is absolute, has no `..`, and lies under the allowed directory. The
    /// enricher checks the real file again.
    pub fn check_offline_path_lexically(&self, path: &Path) -> Result<(), EgressError> {
        if !self.enforce {
            return Ok(());
        }
        let Some(dir) = &self.offline_dir else {
            return Err(EgressError(
                "offline postcode files are not allowed (chart value egress.offlinePostcodesDir is empty)"
                    .into(),
            ));
        };
        if plain_path(path) && path.starts_with(dir) && path != dir {
            Ok(())
        } else {
            Err(EgressError(format!(
                "offline postcode file {} is not inside {} (chart value egress.offlinePostcodesDir)",
                path.display(),
                dir.display()
            )))
        }
    }

    /// An HTTP client for sources: connects only to addresses
    /// [`EgressPolicy::check_ip`] passes (checked on the addresses DNS gave
    /// for the connection being made), re-checks every redirect hop, ignores
    /// proxy variables (the connection made is the one checked).
    pub fn source_client(&self) -> reqwest::Client {
        let builder =
            reqwest::Client::builder().user_agent(concat!("postcode-operator/", env!("CARGO_PKG_VERSION")));
        if !self.enforce {
            return builder.build().expect("TLS backend available");
        }
        let policy = Arc::new(self.clone());
        let redirect_policy = policy.clone();
        builder
            .no_proxy()
            .dns_resolver(CheckedResolver { policy })
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= MAX_REDIRECTS {
                    return attempt.error(EgressError(format!("more than {MAX_REDIRECTS} redirects")));
                }
                match redirect_policy.check_source_url(attempt.url()) {
                    Ok(()) => attempt.follow(),
                    Err(e) => {
                        let e = EgressError(format!("redirect to {}: {}", attempt.url(), e.0));
                        attempt.error(e)
                    }
                }
            }))
            .build()
            .expect("TLS backend available")
    }
}

/// An absolute path of plain names only (no `.`, `..`): what it names can be
/// told from its text.
fn plain_path(path: &Path) -> bool {
    path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, std::path::Component::RootDir | std::path::Component::Normal(_)))
}

/// The [`EgressError`] somewhere in an error's source chain (a refused
/// connection or redirect inside a `reqwest::Error`).
pub fn egress_error_in<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a EgressError> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(found) = err.downcast_ref::<EgressError>() {
            return Some(found);
        }
        cur = err.source();
    }
    None
}

/// Resolves with the system resolver, then refuses the name when any address
/// it resolves to is refused (a name with one private address among public
/// ones could be connected to the private one).
struct CheckedResolver {
    policy: Arc<EgressPolicy>,
}

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let fixed = policy.hosts.iter().find(|(n, _)| *n == host);
            let addrs: Vec<SocketAddr> = match fixed {
                Some((_, ips)) => ips.iter().map(|ip| SocketAddr::new(*ip, 0)).collect(),
                None => tokio::net::lookup_host((host.as_str(), 0)).await?.collect(),
            };
            for a in &addrs {
                policy
                    .check_ip(a.ip())
                    .map_err(|e| EgressError(format!("{host} resolves to {}", e.0)))?;
            }
            let addrs: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enforced() -> EgressPolicy {
        EgressPolicy::enforced(
            Vec::new(),
            Vec::new(),
            vec![DEFAULT_ALLOWED_API_URLS.into()],
            None,
        )
    }

    #[test]
    fn non_public_addresses_are_refused_and_public_ones_pass() {
        let p = enforced();
        for bad in [
            "127.0.0.1",
            "169.254.169.254",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "fe80::1",
            "fd00::1",
            "::",
            "64:ff9b::a00:1",
        ] {
            assert!(p.check_ip(bad.parse().unwrap()).is_err(), "{bad}");
        }
        for good in ["1.1.1.1", "151.101.0.1", "2a00:1450:4009:81f::200e"] {
            assert!(p.check_ip(good.parse().unwrap()).is_ok(), "{good}");
        }
    }

    #[test]
    fn allowed_and_denied_cidrs_override_the_built_in_ranges() {
        let p = EgressPolicy::enforced(
            vec!["10.1.0.0/16".parse().unwrap()],
            vec!["1.1.1.0/24".parse().unwrap(), "10.1.2.0/24".parse().unwrap()],
            Vec::new(),
            None,
        );
        assert!(p.check_ip("10.1.0.5".parse().unwrap()).is_ok());
        assert!(p.check_ip("10.2.0.5".parse().unwrap()).is_err());
        assert!(p.check_ip("1.1.1.1".parse().unwrap()).is_err());
        assert!(
            p.check_ip("10.1.2.3".parse().unwrap()).is_err(),
            "deny wins over allow"
        );
    }

    #[test]
    fn source_urls_must_be_http_with_a_public_literal_host() {
        let p = enforced();
        let check = |u: &str| p.check_source_url(&Url::parse(u).unwrap());
        assert!(check("https://example.org/x.csv").is_ok());
        assert!(check("file:///etc/passwd").is_err());
        assert!(check("http://169.254.169.254/latest/meta-data/").is_err());
        assert!(check("http://2130706433/").is_err(), "decimal 127.0.0.1");
        assert!(check("http://[::ffff:7f00:1]/").is_err());
        assert!(EgressPolicy::unrestricted()
            .check_source_url(&Url::parse("file:///x").unwrap())
            .is_ok());
    }

    #[test]
    fn api_urls_must_match_an_allowed_base_url() {
        let p = enforced();
        assert!(p.check_api_url("https://api.postcodes.io").is_ok());
        assert!(p.check_api_url("https://api.postcodes.io/").is_ok());
        assert!(p.check_api_url("https://api.postcodes.io:443").is_ok());
        for bad in [
            "http://api.postcodes.io",
            "https://api.postcodes.io.evil.example",
            "https://api.postcodes.io:8443",
            "http://10.0.0.1",
            "https://user@api.postcodes.io.example",
            "not a url",
        ] {
            assert!(p.check_api_url(bad).is_err(), "{bad}");
        }
        let any = EgressPolicy::enforced(Vec::new(), Vec::new(), vec!["*".into()], None);
        assert!(any.check_api_url("http://10.0.0.1").is_ok());
    }

    /// A pod whose allowed directory is not mounted: a path outside it is
    /// still "not inside"; a path inside it says the directory is missing.
    #[test]
    fn an_unmounted_allowed_directory_is_named_only_for_paths_inside_it() {
        let p = EgressPolicy::enforced(Vec::new(), Vec::new(), Vec::new(), Some("/no-such-dir-x".into()));
        let out = p.check_offline_path(Path::new("/etc/passwd")).unwrap_err().0;
        assert!(out.contains("is not inside /no-such-dir-x"), "{out}");
        let inside = p
            .check_offline_path(Path::new("/no-such-dir-x/nspl.csv"))
            .unwrap_err()
            .0;
        assert!(
            inside.contains("the allowed directory /no-such-dir-x cannot be opened"),
            "{inside}"
        );
    }

    #[test]
    fn offline_files_must_be_inside_the_allowed_directory() {
        let root = std::env::temp_dir().join(format!("egress-offline-{}", std::process::id()));
        let allowed = root.join("allowed");
        std::fs::create_dir_all(&allowed).unwrap();
        std::fs::write(allowed.join("nspl.csv"), "x").unwrap();
        std::fs::write(root.join("secret.csv"), "x").unwrap();
        std::os::unix::fs::symlink(root.join("secret.csv"), allowed.join("link.csv")).unwrap();
        let p = EgressPolicy::enforced(Vec::new(), Vec::new(), Vec::new(), Some(allowed.clone()));
        assert!(p.check_offline_path(&allowed.join("nspl.csv")).is_ok());
        assert!(p.check_offline_path(&allowed.join("../secret.csv")).is_err());
        assert!(
            p.check_offline_path(&allowed.join("link.csv")).is_err(),
            "a symlink out"
        );
        let missing = p.check_offline_path(&allowed.join("missing.csv")).unwrap_err().0;
        assert!(
            missing.contains("missing.csv") && missing.contains("No such file"),
            "a missing file inside is said to be missing: {missing}"
        );
        let outside = p
            .check_offline_path(&allowed.join("../missing.csv"))
            .unwrap_err()
            .0;
        assert!(
            outside.contains("is not inside") && !outside.contains("No such file"),
            "outside, existence is not told: {outside}"
        );
        assert!(
            p.check_offline_path(&allowed).is_err(),
            "a directory is not a file"
        );
        assert!(enforced().check_offline_path(&allowed.join("nspl.csv")).is_err());
        let lex = EgressPolicy::enforced(Vec::new(), Vec::new(), Vec::new(), Some("/data".into()));
        assert!(lex
            .check_offline_path_lexically(Path::new("/data/nspl.csv"))
            .is_ok());
        for bad in [
            "/data/../etc/passwd",
            "/etc/passwd",
            "data/nspl.csv",
            "/data",
            "/database.csv",
        ] {
            assert!(lex.check_offline_path_lexically(Path::new(bad)).is_err(), "{bad}");
        }
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// A one-route HTTP server on 127.0.0.1: every request is answered with
    /// `response` (raw HTTP/1.1). Returns its port.
    async fn serve(response: String) -> u16 {
        serve_on("127.0.0.1", response).await
    }

    /// [`serve`] on another loopback address (Linux routes all of 127/8 to lo).
    async fn serve_on(ip: &str, response: String) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let response = response.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let _ = sock.read(&mut buf).await;
                    let _ = sock.write_all(response.as_bytes()).await;
                });
            }
        });
        port
    }

    fn ok_body(body: &str) -> String {
        format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    }

    fn redirect_to(location: &str) -> String {
        format!(
            "HTTP/1.1 302 Found\r\nlocation: {location}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        )
    }

    async fn fetch(p: &EgressPolicy, url: &str) -> Result<String, String> {
        let u = Url::parse(url).unwrap();
        p.check_source_url(&u).map_err(|e| e.to_string())?;
        match p.source_client().get(u).send().await {
            Ok(r) if r.status().is_success() => Ok(r.text().await.unwrap()),
            Ok(r) => Err(format!("HTTP {}", r.status())),
            Err(e) => {
                Err(egress_error_in(&e).map_or_else(|| format!("not the policy: {e:?}"), ToString::to_string))
            }
        }
    }

    #[tokio::test]
    async fn a_name_resolving_to_loopback_is_refused_on_the_connection_made() {
        let port = serve(ok_body("lat,lon\n")).await;
        // `localhost` goes through the resolver (an IP literal would not): the
        // check is on the address the connection would use.
        let err = fetch(&enforced(), &format!("http://localhost:{port}/x.csv"))
            .await
            .unwrap_err();
        assert!(
            err.contains("localhost resolves to") && err.contains("loopback"),
            "{err}"
        );
        let err = fetch(&enforced(), &format!("http://127.0.0.1:{port}/x.csv"))
            .await
            .unwrap_err();
        assert!(err.contains("127.0.0.1 is a loopback address"), "{err}");
        // The same server, allowed, answers: the refusal was the policy's.
        let allowed = EgressPolicy::enforced(
            vec!["127.0.0.1/32".parse().unwrap()],
            Vec::new(),
            Vec::new(),
            None,
        );
        assert_eq!(
            fetch(&allowed, &format!("http://127.0.0.1:{port}/x.csv"))
                .await
                .unwrap(),
            "lat,lon\n"
        );
    }

    #[tokio::test]
    async fn every_redirect_hop_is_checked() {
        let target = serve(ok_body("secret\n")).await;
        let allowed = EgressPolicy::enforced(
            vec!["127.0.0.1/32".parse().unwrap()],
            Vec::new(),
            Vec::new(),
            None,
        );
        for location in [
            "http://169.254.169.254/latest/meta-data/".to_string(),
            "http://10.0.0.1/".to_string(),
            format!("http://[::1]:{target}/"),
        ] {
            let port = serve(redirect_to(&location)).await;
            let err = fetch(&allowed, &format!("http://127.0.0.1:{port}/x.csv"))
                .await
                .unwrap_err();
            assert!(
                err.contains("refused by the egress policy: redirect to"),
                "{location}: {err}"
            );
        }
        // reqwest follows no redirect to another scheme: the reader sees the 302.
        let port = serve(redirect_to("file:///etc/passwd")).await;
        let err = fetch(&allowed, &format!("http://127.0.0.1:{port}/x.csv"))
            .await
            .unwrap_err();
        assert_eq!(err, "HTTP 302 Found");
        // A redirect from an allowed host (127.0.0.2) to a name that resolves
        // to a refused address (localhost: 127.0.0.1).
        let only_2 = EgressPolicy::enforced(
            vec!["127.0.0.2/32".parse().unwrap()],
            Vec::new(),
            Vec::new(),
            None,
        );
        let port = serve_on("127.0.0.2", redirect_to(&format!("http://localhost:{target}/"))).await;
        let err = fetch(&only_2, &format!("http://127.0.0.2:{port}/x.csv"))
            .await
            .unwrap_err();
        assert!(err.contains("localhost resolves to"), "{err}");
        // An allowed hop is followed.
        let port = serve(redirect_to(&format!("http://127.0.0.1:{target}/"))).await;
        assert_eq!(
            fetch(&allowed, &format!("http://127.0.0.1:{port}/x.csv"))
                .await
                .unwrap(),
            "secret\n"
        );
    }

    /// A public-looking name whose DNS answer is a private address (here
    /// through [`EgressPolicy::with_host`], as a hostile DNS record would
    /// answer) is refused before any connection, over `https` as over `http`,
    /// directly or as a redirect target; the same name answered with an
    /// allowed address is fetched.
    #[tokio::test]
    async fn a_name_whose_dns_answers_a_private_address_is_refused() {
        let target = serve(ok_body("lat,lon\n")).await;
        let private: IpAddr = "10.0.0.1".parse().unwrap();
        let loopback: IpAddr = "127.0.0.1".parse().unwrap();
        let p = enforced()
            .with_host("files.example.test", &[private])
            .with_host("Mixed.Example.Test", &["93.184.215.14".parse().unwrap(), private]);
        for url in [
            "https://files.example.test/trips.csv",
            "http://files.example.test/trips.csv",
            "https://mixed.example.test/trips.csv",
        ] {
            let err = fetch(&p, url).await.unwrap_err();
            assert!(
                err.contains("refused by the egress policy")
                    && err.contains("example.test resolves to 10.0.0.1 is a private address"),
                "{url}: {err}"
            );
        }
        let allowed = EgressPolicy::enforced(
            vec!["127.0.0.1/32".parse().unwrap()],
            Vec::new(),
            Vec::new(),
            None,
        )
        .with_host("files.example.test", &[loopback])
        .with_host("evil.example.test", &[private]);
        let url = format!("http://files.example.test:{target}/trips.csv");
        assert_eq!(fetch(&allowed, &url).await.unwrap(), "lat,lon\n");
        let port = serve(redirect_to("https://evil.example.test/")).await;
        let err = fetch(&allowed, &format!("http://127.0.0.1:{port}/x.csv"))
            .await
            .unwrap_err();
        assert!(err.contains("evil.example.test resolves to 10.0.0.1"), "{err}");
    }
}
