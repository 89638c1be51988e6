//! Access control of the upload API against the test cluster's real
//! kube-apiserver (`.ci/controlplane.sh`, RBAC authorization, ServiceAccount
//! tokens from the TokenRequest API): the operator authenticates each bearer
//! token with a TokenReview and authorizes each action with a
//! SubjectAccessReview on the caller's behalf. And how an internal error is
//! answered: a generic message and a request id, never the database's text.
#![allow(clippy::too_many_lines)] // the 80-line limit is for non-test code

mod common;

use std::time::{Duration, Instant};

use common::{kube_harness::*, operator::Operator, *};
use k8s_openapi::api::{
    authentication::v1::{TokenRequest, TokenRequestSpec},
    core::v1::{Secret, ServiceAccount},
    rbac::v1::{Role, RoleBinding},
};
use kube::{
    api::{ApiResource, DeleteParams, DynamicObject, PostParams},
    Api, Client,
};
use postcodes_io_test_server::{Faults, TestServer};
use serde_json::{json, Value};

/// The Job ServiceAccount (JOB_SERVICE_ACCOUNT's default).
const JOB_SA: &str = "postcode-operator-job";

fn imports_api(client: &Client, ns: &str) -> Api<DynamicObject> {
    let ar = ApiResource {
        group: "postcodes.dev".into(),
        version: "v1alpha1".into(),
        api_version: "postcodes.dev/v1alpha1".into(),
        kind: "PostcodeImport".into(),
        plural: "postcodeimports".into(),
    };
    Api::namespaced_with(client.clone(), ns, &ar)
}

async fn database_secret(client: &Client, ns: &str, db: &str) {
    let secret: Secret = serde_json::from_value(
        json!({"metadata": {"name": "postcode-operator-database"}, "stringData": {"url": db}}),
    )
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
}

/// Creates ServiceAccount `name` in `ns` and returns a token for it (TokenRequest).
async fn service_account_token(client: &Client, ns: &str, name: &str) -> String {
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    sas.create(&PostParams::default(), &sa).await.unwrap();
    let req = TokenRequest {
        spec: TokenRequestSpec {
            expiration_seconds: Some(3600),
            ..Default::default()
        },
        ..Default::default()
    };
    sas.create_token_request(name, &PostParams::default(), &req)
        .await
        .unwrap()
        .status
        .expect("the TokenRequest's status")
        .token
}

/// A Role `name` in `ns` granting `verbs` on postcodeimports, bound to
/// ServiceAccount `sa` of `ns`.
async fn grant(client: &Client, ns: &str, name: &str, sa: &str, verbs: &[&str]) {
    let pp = PostParams::default();
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": name},
        "rules": [{"apiGroups": ["postcodes.dev"], "resources": ["postcodeimports"], "verbs": verbs}],
    }))
    .unwrap();
    Api::<Role>::namespaced(client.clone(), ns)
        .create(&pp, &role)
        .await
        .unwrap();
    let rb: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": ns}],
    }))
    .unwrap();
    Api::<RoleBinding>::namespaced(client.clone(), ns)
        .create(&pp, &rb)
        .await
        .unwrap();
}

/// `POST /v1/imports?{query}` of a CSV: status and body. (The request is
/// built at once, so the future borrows nothing.)
fn upload(
    op: &Operator,
    query: &str,
    token: Option<&str>,
    body: Vec<u8>,
) -> impl std::future::Future<Output = (u16, Value)> {
    let mut r = reqwest::Client::new()
        .post(format!("{}/v1/imports?{query}", op.url))
        .header("content-type", "text/csv")
        .body(body);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    async move {
        let resp = r.send().await.unwrap();
        let code = resp.status().as_u16();
        (code, resp.json().await.unwrap_or(Value::Null))
    }
}

/// `GET {path}` on the upload API: status and body text.
fn get_as(op: &Operator, path: &str, token: &str) -> impl std::future::Future<Output = (u16, String)> {
    let r = reqwest::Client::new()
        .get(format!("{}{path}", op.url))
        .bearer_auth(token);
    async move {
        let resp = r.send().await.unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    }
}

const SMALL: &[u8] = b"lat,lon\n51.5,-0.1\n";

/// Repeats `attempt` until it gives `want` (a status code), for up to `within`.
async fn until_status<F, Fut>(within: Duration, what: &str, want: u16, mut attempt: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = (u16, Value)>,
{
    let deadline = Instant::now() + within;
    loop {
        let (code, body) = attempt().await;
        if code == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still {code} {body} after {within:?}, wanted {want}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_api_follows_kubernetes_rbac() {
    let client = test_client().await;
    let a = fresh_namespace(&client).await;
    let b = fresh_namespace(&client).await;
    let db = fresh_pg().await;
    database_secret(&client, &a, &db).await;
    create_job_service_account(&client, &a, JOB_SA).await;
    let server = TestServer::start(nspl(), Faults::default()).await.unwrap();
    let op = Operator::start(
        &a,
        &db,
        &[("UPLOAD_AUTH", "kubernetes"), ("UPLOAD_AUTH_CACHE_S", "1")],
    );
    let api_url = server.url().replace("127.0.0.1", "localhost");

    // create in `a`: may upload there, and nowhere else
    let uploader = service_account_token(&client, &a, "uploader").await;
    grant(&client, &a, "uploader", "uploader", &["create"]).await;
    let trips = std::fs::read(repo().join("samples/trips.csv")).unwrap();
    let q = format!("name=trips&namespace={a}&shards=2&apiUrl={api_url}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let created = loop {
        // (RBAC is followed within moments of the RoleBinding's creation)
        let (code, body) = upload(&op, &q, Some(&uploader), trips.clone()).await;
        if code == 201 {
            break body;
        }
        assert!(Instant::now() < deadline, "upload to a: {code} {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(created["namespace"], json!(a), "{created}");
    for ns in [b.as_str(), "kube-system"] {
        let (code, body) = upload(&op, &format!("namespace={ns}"), Some(&uploader), SMALL.to_vec()).await;
        assert_eq!(code, 403, "upload to {ns}: {body}");
        let msg = body["error"].as_str().unwrap_or_default();
        assert!(
            msg.contains("create") && msg.contains(ns) && msg.contains("RoleBinding"),
            "a 403 says what is missing: {msg}"
        );
    }
    // may not read what it uploaded: only `create` was granted
    let (code, body) = get_as(&op, &format!("/v1/imports/{a}/trips"), &uploader).await;
    assert_eq!(code, 403, "{body}");

    // no token, a token that is no token
    let (code, body) = upload(&op, &format!("namespace={a}"), None, SMALL.to_vec()).await;
    assert_eq!(code, 401, "{body}");
    let (code, body) = upload(
        &op,
        &format!("namespace={a}"),
        Some("not-a-token"),
        SMALL.to_vec(),
    )
    .await;
    assert_eq!(code, 401, "{body}");

    // the token of a ServiceAccount deleted since: 401
    let ghost = service_account_token(&client, &a, "ghost").await;
    grant(&client, &a, "ghost", "ghost", &["create"]).await;
    Api::<ServiceAccount>::namespaced(client.clone(), &a)
        .delete("ghost", &DeleteParams::default())
        .await
        .unwrap();
    until_status(Duration::from_secs(30), "deleted ServiceAccount", 401, || {
        upload(&op, &format!("namespace={a}"), Some(&ghost), SMALL.to_vec())
    })
    .await;

    // get only: reads status and results, may not upload or delete
    let reader = service_account_token(&client, &a, "reader").await;
    grant(&client, &a, "reader", "reader", &["get"]).await;
    until_status(Duration::from_secs(30), "status with get", 200, || {
        let read = get_as(&op, &format!("/v1/imports/{a}/trips"), &reader);
        async move {
            let (code, body) = read.await;
            (code, Value::String(body))
        }
    })
    .await;
    let (code, body) = upload(&op, &format!("namespace={a}"), Some(&reader), SMALL.to_vec()).await;
    assert_eq!(code, 403, "{body}");
    let resp = reqwest::Client::new()
        .delete(format!("{}/v1/imports/{a}/trips", op.url))
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403, "{}", resp.text().await.unwrap());
    let imports = imports_api(&client, &a);
    let done = wait_for(&imports, "trips", Duration::from_secs(300), |o| {
        matches!(
            o.data.pointer("/status/phase").and_then(Value::as_str),
            Some("Succeeded" | "Failed")
        )
    })
    .await;
    assert_eq!(
        done.data.pointer("/status/phase"),
        Some(&json!("Succeeded")),
        "{:#}",
        done.data["status"]
    );
    let (code, csv) = get_as(&op, &format!("/v1/imports/{a}/trips/results.csv"), &reader).await;
    assert_eq!(code, 200, "{csv}");
    assert_eq!(csv.lines().count(), 49, "header and the 48 trips:\n{csv}");

    // RBAC changes are followed: grant → 201, revoke → 403 once the cache expired
    let late = service_account_token(&client, &a, "late").await;
    let small_q = format!("namespace={a}&apiUrl={api_url}");
    let (code, body) = upload(&op, &small_q, Some(&late), SMALL.to_vec()).await;
    assert_eq!(code, 403, "nothing granted yet: {body}");
    grant(&client, &a, "late", "late", &["create"]).await;
    until_status(Duration::from_secs(30), "after the grant", 201, || {
        upload(&op, &small_q, Some(&late), SMALL.to_vec())
    })
    .await;
    Api::<RoleBinding>::namespaced(client.clone(), &a)
        .delete("late", &DeleteParams::default())
        .await
        .unwrap();
    until_status(Duration::from_secs(30), "after the revocation", 403, || {
        upload(&op, &small_q, Some(&late), SMALL.to_vec())
    })
    .await;

    let log = op.log();
    for t in [&uploader, &ghost, &reader, &late] {
        assert!(!log.contains(t.as_str()), "a token leaked into the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_internal_error_answers_a_request_id_and_not_the_database_error() {
    let client = test_client().await;
    let ns = fresh_namespace(&client).await;
    let db = fresh_pg().await;
    database_secret(&client, &ns, &db).await;
    let op = Operator::start(&ns, &db, &[]);
    // migrated: /readyz is 200
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while http
        .get(format!("{}/readyz", op.metrics_url))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .ok()
        != Some(200)
    {
        assert!(Instant::now() < deadline, "not ready:\n{}", op.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let store = pipeline::store::Store::connect(&db).await.unwrap();
    let pipeline::store::Store::Postgres(pool) = &store else {
        unreachable!()
    };
    sqlx::query("DROP TABLE uploads CASCADE")
        .execute(pool)
        .await
        .unwrap();

    let resp = http
        .post(format!("{}/v1/imports?namespace={ns}", op.url))
        .header("content-type", "text/csv")
        .body(SMALL.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 500);
    let header_id = resp
        .headers()
        .get("x-request-id")
        .expect("x-request-id")
        .to_str()
        .unwrap()
        .to_string();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["requestId"], json!(header_id), "{body}");
    let text = body.to_string();
    for leak in ["uploads", "relation", "does not exist", "postgres", "sqlx"] {
        assert!(!text.contains(leak), "the answer leaks {leak:?}: {text}");
    }
    // the operator's log has the cause under that id
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = op.log();
        if let Some(line) = log.lines().find(|l| l.contains(&header_id)) {
            assert!(line.contains("uploads"), "the log names the cause: {line}");
            break;
        }
        assert!(Instant::now() < deadline, "request id not in the log:\n{log}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// chromedriver (Debian's `chromium-driver`) on a free port, killed on drop.
struct ChromeDriver {
    child: std::process::Child,
    url: String,
}

impl ChromeDriver {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        use std::os::unix::process::CommandExt;
        let child = std::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            // its own process group: dropped, it is killed with its Chromiums
            .process_group(0)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("chromedriver (Debian package chromium-driver; .ci/with-services.sh installs it)");
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// A headless Chromium session saving downloads in `downloads`.
    async fn session(&self, downloads: &std::path::Path) -> fantoccini::Client {
        let caps = json!({"goog:chromeOptions": {
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,1900"],
            "prefs": {"download.default_directory": downloads, "download.prompt_for_download": false},
        }});
        let Value::Object(caps) = caps else { unreachable!() };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // (chromedriver listens moments after it starts)
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match fantoccini::ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&self.url)
                .await
            {
                Ok(c) => return c,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("chromedriver not ready: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("no Chromium session: {e}"),
            }
        }
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group this driver leads.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// The web page at `/`, driven in headless Chromium as a person would use
/// it: types a ServiceAccount token, chooses `samples/trips.csv`, uploads,
/// watches the import reach Succeeded, sees it in the list and the picture,
/// downloads the results — which are the `results.csv` endpoint's, byte for
/// byte. Screenshots before and after are kept in `target/test-artefacts/`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_page_uploads_follows_and_downloads_an_import() {
    use fantoccini::Locator;
    let client = test_client().await;
    let ns = fresh_namespace(&client).await;
    let db = fresh_pg().await;
    database_secret(&client, &ns, &db).await;
    create_job_service_account(&client, &ns, JOB_SA).await;
    let server = TestServer::start(nspl(), Faults::default()).await.unwrap();
    let op = Operator::start(
        &ns,
        &db,
        &[("UPLOAD_AUTH", "kubernetes"), ("UPLOAD_AUTH_CACHE_S", "1")],
    );
    let analyst = service_account_token(&client, &ns, "analyst").await;
    grant(&client, &ns, "analyst", "analyst", &["create", "get", "list"]).await;
    let artefacts = repo().join("target/test-artefacts");
    std::fs::create_dir_all(&artefacts).unwrap();
    let downloads = temp_dir("web-downloads");

    let driver = ChromeDriver::start();
    let c = driver.session(&downloads).await;
    c.goto(&format!("{}/", op.url)).await.unwrap();
    assert_eq!(c.title().await.unwrap(), "postcode-operator");
    let trips = repo().join("samples/trips.csv");
    let api_url = server.url().replace("127.0.0.1", "localhost");
    for (id, value) in [
        ("#token", analyst.as_str()),
        ("#file", trips.to_str().unwrap()),
        ("#namespace", ns.as_str()),
        ("#shards", "2"),
        ("#apiUrl", api_url.as_str()),
    ] {
        c.find(Locator::Css(id))
            .await
            .unwrap()
            .send_keys(value)
            .await
            .unwrap();
    }
    let name = c.find(Locator::Css("#name")).await.unwrap();
    assert_eq!(
        name.prop("value").await.unwrap().as_deref(),
        Some("trips"),
        "named after the file"
    );
    std::fs::write(
        artefacts.join("web-page-before.png"),
        c.screenshot().await.unwrap(),
    )
    .unwrap();

    // RBAC follows the RoleBinding within moments: upload until it is taken
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        c.find(Locator::Css("#upload"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        let state = c
            .wait()
            .at_most(Duration::from_secs(60))
            .for_element(Locator::XPath(
                "//*[@id='upload-state'][starts-with(., 'stored')] | //*[@id='upload-error'][string-length(.) > 0]",
            ))
            .await
            .unwrap();
        let said = state.text().await.unwrap();
        if said.starts_with("stored") {
            break;
        }
        assert!(
            Instant::now() < deadline && said.starts_with("403"),
            "upload: {said}"
        );
        c.execute("document.getElementById('upload-error').textContent = ''", vec![])
            .await
            .unwrap();
    }
    let phase = c
        .wait()
        .at_most(Duration::from_secs(300))
        .for_element(Locator::XPath(
            "//*[@id='phase'][. = 'Succeeded' or . = 'Failed']",
        ))
        .await
        .unwrap();
    let errors = c
        .find(Locator::Css("#errors"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(phase.text().await.unwrap(), "Succeeded", "{errors}");
    assert_eq!(errors, "", "a successful import shows no problem");
    let cell = |id: &'static str| {
        let c = c.clone();
        async move { c.find(Locator::Id(id)).await.unwrap().text().await.unwrap() }
    };
    assert_eq!(cell("rows-total").await, "48");
    assert_eq!(cell("rows-pending").await, "0");
    assert_ne!(cell("api-requests").await, "–");
    assert_eq!(
        c.find_all(Locator::Css("#shards-table tbody tr"))
            .await
            .unwrap()
            .len(),
        2,
        "a row per shard"
    );
    // the picture as drawn once the import finished, every row accounted for
    let legend = c
        .wait()
        .at_most(Duration::from_secs(30))
        .for_element(Locator::XPath("//*[@id='map-legend'][@data-phase='Succeeded']"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        legend.contains("enriched") && legend.contains("of 48 rows drawn"),
        "{legend}"
    );
    // the list shows it
    c.find(Locator::Css("#refresh"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.wait()
        .at_most(Duration::from_secs(30))
        .for_element(Locator::XPath("//table[@id='imports']//td[. = 'trips']"))
        .await
        .unwrap();

    c.find(Locator::Css("#download"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let saved = downloads.join("trips.enriched.csv");
    let deadline = Instant::now() + Duration::from_secs(60);
    // (a download has no event to await from here: the file appears whole,
    // Chromium renames it from .crdownload when done)
    while !saved.exists() {
        assert!(
            Instant::now() < deadline,
            "nothing downloaded to {}",
            downloads.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    std::fs::write(
        artefacts.join("web-page-after.png"),
        c.screenshot().await.unwrap(),
    )
    .unwrap();
    c.close().await.unwrap();

    let (code, endpoint) = get_as(&op, &format!("/v1/imports/{ns}/trips/results.csv"), &analyst).await;
    assert_eq!(code, 200, "{endpoint}");
    assert_eq!(std::fs::read_to_string(&saved).unwrap(), endpoint);
    assert_eq!(endpoint.lines().count(), 49);
}
