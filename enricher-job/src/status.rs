//! The shard's progress in its `PostcodeImport`'s status: the `status.shards`
//! entry keyed by this shard's index, written by server-side apply under the
//! field manager `enricher-<shard>` (so the operator's own status writes and
//! the other shards' entries are left alone).

use std::{
    sync::{atomic::AtomicI64, Arc},
    time::Duration,
};

use kube::api::{Api, Patch, PatchParams};
use pipeline::store::Store;
use postcode_resource::{PostcodeImport, PostcodeImportStatus, ShardStatus, API_VERSION};

/// At most this often per shard (etcd and watchers see a few writes a minute).
const STATUS_INTERVAL: Duration = Duration::from_secs(15);

/// Writes this shard's progress into the import's status, when running as a
/// Kubernetes Job (`REPORT_STATUS=true`, `IMPORT_NAMESPACE`, `IMPORT_NAME`).
#[derive(Clone)]
pub struct StatusReporter {
    api: Api<PostcodeImport>,
    name: String,
    shard: i32,
    /// Requests retried by this run of the shard, kept up to date by the enricher.
    pub retries: Arc<AtomicI64>,
}

impl StatusReporter {
    /// A reporter for `shard`, or `None` outside Kubernetes (or when the API
    /// server cannot be reached: progress is then only logged).
    pub async fn from_env(shard: i32) -> Option<Self> {
        if std::env::var("REPORT_STATUS").ok().as_deref() != Some("true") {
            return None;
        }
        let (Ok(ns), Ok(name)) = (std::env::var("IMPORT_NAMESPACE"), std::env::var("IMPORT_NAME")) else {
            tracing::warn!("REPORT_STATUS set without IMPORT_NAMESPACE/IMPORT_NAME; not reporting progress");
            return None;
        };
        let client = match kube::Client::try_default().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("cannot reach Kubernetes to report progress: {e}");
                return None;
            }
        };
        Some(Self {
            api: Api::namespaced(client, &ns),
            name,
            shard,
            retries: Default::default(),
        })
    }

    /// Writes the shard's entry with `phase` (`Running`, `Succeeded`, `QuotaExhausted`).
    pub async fn report(&self, store: &Store, import_id: i64, phase: &str) {
        let counts = match store.shard_counts(import_id).await {
            Ok(c) => c.into_iter().find(|c| c.shard == self.shard).unwrap_or_default(),
            Err(e) => {
                tracing::warn!("progress not reported: {e}");
                return;
            }
        };
        let status = PostcodeImportStatus {
            shards: vec![ShardStatus {
                index: self.shard as u32,
                phase: Some(phase.into()),
                rows: Some(counts.rows),
                done: Some(counts.done),
                retries: Some(self.retries.load(std::sync::atomic::Ordering::Relaxed)),
            }],
            ..PostcodeImportStatus::default()
        };
        let patch =
            serde_json::json!({"apiVersion": API_VERSION, "kind": "PostcodeImport", "status": status});
        let pp = PatchParams::apply(&format!("enricher-{}", self.shard)).force();
        if let Err(e) = self.api.patch_status(&self.name, &pp, &Patch::Apply(patch)).await {
            tracing::warn!("progress not reported: {e}");
        }
    }

    /// Reports `Running` every [`STATUS_INTERVAL`] until aborted.
    pub fn spawn_periodic(&self, store: Store, import_id: i64) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(STATUS_INTERVAL);
            loop {
                tick.tick().await;
                me.report(&store, import_id, "Running").await;
            }
        })
    }
}
