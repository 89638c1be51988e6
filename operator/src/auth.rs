//! Who may use the upload API, decided the Kubernetes way (as kube-rbac-proxy
//! and aggregated API servers do): the caller's bearer token is authenticated
//! with a `TokenReview`, and each action is authorized with a
//! `SubjectAccessReview` on the caller's behalf (user, groups, uid, extra) —
//! `create postcodeimports` to upload, `get` to read status or results,
//! `delete` to delete. What a person may do through the endpoint is what RBAC
//! lets them do with kubectl.
//!
//! Answers are cached for a short time (`UPLOAD_AUTH_CACHE_S`) under the
//! SHA-256 of the token: the raw token is never stored or logged.
//!
//! The other modes: `token` (one shared static token, `UPLOAD_TOKEN`) and
//! `none` (anyone who reaches the port; the chart allows it only behind a
//! ClusterIP Service).

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use axum::http::{header, HeaderMap};
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec, UserInfo},
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
};
use kube::{api::PostParams, Api, Client};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;

/// How the upload API authenticates and authorizes (`UPLOAD_AUTH`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthMode {
    /// TokenReview + SubjectAccessReview (the default).
    Kubernetes,
    /// One shared bearer token.
    Token(String),
    /// No authentication at all.
    None,
}

impl AuthMode {
    /// The mode from `UPLOAD_AUTH` and `UPLOAD_TOKEN`; errors say what to set.
    pub fn from_settings(mode: &str, token: &str) -> anyhow::Result<Self> {
        match mode {
            "kubernetes" => Ok(Self::Kubernetes),
            "token" if token.is_empty() => {
                anyhow::bail!("UPLOAD_AUTH=token needs the shared token in UPLOAD_TOKEN")
            }
            "token" => Ok(Self::Token(token.to_string())),
            "none" => Ok(Self::None),
            other => anyhow::bail!("UPLOAD_AUTH={other:?}: use kubernetes, token or none"),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Kubernetes => "kubernetes",
            Self::Token(_) => "token",
            Self::None => "none",
        }
    }
}

/// An action on an import, as RBAC names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verb {
    Create,
    Get,
    List,
    Delete,
}

impl Verb {
    fn as_str(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Get => "get",
            Self::List => "list",
            Self::Delete => "delete",
        }
    }
}

/// The authenticated caller of a request.
#[derive(Clone, Debug)]
pub enum Caller {
    /// A Kubernetes user (from a TokenReview), with the token's hash.
    User { user: UserInfo, token_sha: [u8; 32] },
    /// The holder of the shared token, or anyone in mode `none`.
    Trusted,
}

impl Caller {
    /// The user name, for messages and logs.
    pub fn name(&self) -> String {
        match self {
            Self::User { user, .. } => user.username.clone().unwrap_or_default(),
            Self::Trusted => "(trusted)".into(),
        }
    }
}

type DecisionKey = ([u8; 32], Verb, String, Option<String>);
/// Cached answers: until when, and the answer.
type Cache<K, V> = Mutex<HashMap<K, (Instant, V)>>;

/// Authenticates callers and authorizes their actions; caches answers.
pub struct Authorizer {
    mode: AuthMode,
    client: Client,
    ttl: Duration,
    /// TokenReview answers by the token's SHA-256.
    users: Cache<[u8; 32], Option<UserInfo>>,
    /// SubjectAccessReview answers (allowed, reason).
    decisions: Cache<DecisionKey, (bool, String)>,
}

/// Entries kept before expired ones are swept.
const SWEEP_AT: usize = 10_000;

fn cached<K: std::hash::Hash + Eq + Clone, V: Clone>(map: &Cache<K, V>, key: &K) -> Option<V> {
    let map = map.lock().unwrap();
    map.get(key)
        .filter(|(until, _)| *until > Instant::now())
        .map(|(_, v)| v.clone())
}

fn remember<K: std::hash::Hash + Eq, V>(map: &Cache<K, V>, ttl: Duration, key: K, v: V) {
    if ttl.is_zero() {
        return;
    }
    let mut map = map.lock().unwrap();
    if map.len() >= SWEEP_AT {
        let now = Instant::now();
        map.retain(|_, (until, _)| *until > now);
    }
    map.insert(key, (Instant::now() + ttl, v));
}

/// The bearer token of a request, if it sent one.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

impl Authorizer {
    pub fn new(mode: AuthMode, client: Client, ttl: Duration) -> Self {
        tracing::info!(
            mode = mode.name(),
            cache_s = ttl.as_secs_f64(),
            "upload API authentication"
        );
        Self {
            mode,
            client,
            ttl,
            users: Mutex::default(),
            decisions: Mutex::default(),
        }
    }

    /// Who sent the request: 401 without a token or with one the API server
    /// does not accept (kubernetes mode), 401/403 for the shared token.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let token = bearer(headers);
        match &self.mode {
            AuthMode::None => Ok(Caller::Trusted),
            AuthMode::Token(expected) => match token {
                None => Err(ApiError::unauthorized(
                    "send the upload token as `Authorization: Bearer <token>`",
                )),
                Some(t) if bool::from(t.as_bytes().ct_eq(expected.as_bytes())) => Ok(Caller::Trusted),
                Some(_) => Err(ApiError::forbidden(
                    "the bearer token is not the upload token: check the token you were given",
                )),
            },
            AuthMode::Kubernetes => {
                let token = token.ok_or_else(|| {
                    ApiError::unauthorized(
                        "send a Kubernetes bearer token as `Authorization: Bearer <token>` \
                         (e.g. `kubectl create token <serviceaccount>`)",
                    )
                })?;
                let sha: [u8; 32] = Sha256::digest(token.as_bytes()).into();
                let user = match cached(&self.users, &sha) {
                    Some(u) => u,
                    None => {
                        let u = self.token_review(token).await?;
                        remember(&self.users, self.ttl, sha, u.clone());
                        u
                    }
                };
                match user {
                    Some(user) => Ok(Caller::User { user, token_sha: sha }),
                    None => Err(ApiError::unauthorized(
                        "the Kubernetes API server does not accept this token (expired, revoked, \
                         or its ServiceAccount deleted): get a new one",
                    )),
                }
            }
        }
    }

    /// The user a token belongs to, `None` when it is not authenticated.
    async fn token_review(&self, token: &str) -> Result<Option<UserInfo>, ApiError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: None,
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| ApiError::internal(format!("TokenReview failed: {e}")))?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated == Some(true) {
            Ok(status.user)
        } else {
            if let Some(err) = status.error.filter(|e| !e.is_empty()) {
                tracing::info!("upload API: token not authenticated: {err}");
            }
            Ok(None)
        }
    }

    /// Whether `caller` may `verb` postcodeimports (named `name`) in `ns`, and
    /// the API server's reason (cached for the cache's time). Errors only when
    /// the SubjectAccessReview itself fails.
    pub async fn allowed(
        &self,
        caller: &Caller,
        verb: Verb,
        ns: &str,
        name: Option<&str>,
    ) -> Result<(bool, String), ApiError> {
        let Caller::User { user, token_sha } = caller else {
            return Ok((true, String::new()));
        };
        let key = (*token_sha, verb, ns.to_string(), name.map(str::to_string));
        if let Some(d) = cached(&self.decisions, &key) {
            return Ok(d);
        }
        let d = self.access_review(user, verb, ns, name).await?;
        remember(&self.decisions, self.ttl, key, d.clone());
        Ok(d)
    }

    /// 403 unless `caller` may `verb` postcodeimports (named `name`) in `ns`.
    pub async fn authorize(
        &self,
        caller: &Caller,
        verb: Verb,
        ns: &str,
        name: Option<&str>,
    ) -> Result<(), ApiError> {
        let (allowed, reason) = self.allowed(caller, verb, ns, name).await?;
        if allowed {
            return Ok(());
        }
        let who = caller.name();
        let what = match name {
            Some(n) => format!("{} postcodeimports/{n}", verb.as_str()),
            None => format!("{} postcodeimports", verb.as_str()),
        };
        let why = if reason.is_empty() {
            String::new()
        } else {
            format!(" ({reason})")
        };
        Err(ApiError::forbidden(format!(
            "{who} may not {what} in namespace {ns}{why}: ask for a Role granting `{}` on \
             postcodeimports.postcodes.dev in {ns}, bound to you with a RoleBinding",
            verb.as_str()
        )))
    }

    /// Whether the API server allows `user` the action, and its reason.
    async fn access_review(
        &self,
        user: &UserInfo,
        verb: Verb,
        ns: &str,
        name: Option<&str>,
    ) -> Result<(bool, String), ApiError> {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username.clone(),
                groups: user.groups.clone(),
                uid: user.uid.clone(),
                extra: user.extra.clone(),
                resource_attributes: Some(ResourceAttributes {
                    group: Some("postcodes.dev".into()),
                    resource: Some("postcodeimports".into()),
                    verb: Some(verb.as_str().into()),
                    namespace: Some(ns.to_string()),
                    name: name.map(str::to_string),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let api: Api<SubjectAccessReview> = Api::all(self.client.clone());
        let answer = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| ApiError::internal(format!("SubjectAccessReview failed: {e}")))?;
        let status = answer.status.unwrap_or_default();
        Ok((status.allowed, status.reason.unwrap_or_default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_are_chosen_explicitly() {
        assert_eq!(
            AuthMode::from_settings("kubernetes", "").unwrap(),
            AuthMode::Kubernetes
        );
        assert_eq!(AuthMode::from_settings("none", "").unwrap(), AuthMode::None);
        assert_eq!(
            AuthMode::from_settings("token", "t").unwrap(),
            AuthMode::Token("t".into())
        );
        assert!(AuthMode::from_settings("token", "").is_err());
        assert!(AuthMode::from_settings("off", "").is_err());
    }

    #[test]
    fn bearer_tokens_are_read_from_the_authorization_header() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }

    #[test]
    fn cache_entries_expire() {
        let m: Cache<u8, bool> = Mutex::default();
        remember(&m, Duration::from_millis(30), 1, true);
        assert_eq!(cached(&m, &1), Some(true));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(cached(&m, &1), None);
        remember(&m, Duration::ZERO, 2, true);
        assert_eq!(cached(&m, &2), None, "a zero TTL caches nothing");
    }
}
