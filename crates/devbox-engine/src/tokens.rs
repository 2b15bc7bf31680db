//! API tokens: made, listed and revoked here (audited as token.create and token.revoke),
//! and checked for every request a remote caller makes. A token is `dbx_ID_SECRET`: the
//! id finds its record, the secret is compared by its SHA-256 (the only thing stored).

use std::sync::Arc;

use devbox_store::{StoreError, TokenRecord, now_ms};
use devbox_wire::{CreateTokenRequest, CreatedToken, Scope, TokenInfo};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::model::rfc3339;
use crate::{Caller, Engine, EngineError, Result};

/// Longest lifetime a token may be given (ten years).
const MAX_EXPIRY_SECONDS: u64 = 10 * 365 * 86_400;

/// What a valid token grants.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenGrant {
    /// Its id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// What it may do.
    pub scopes: Vec<Scope>,
    /// The sandboxes it may reach, if limited.
    pub sandbox: Option<String>,
    /// Its own rate, if any.
    pub rate_per_second: Option<f64>,
    /// Its own cap on concurrent execs, if any.
    pub max_execs: Option<u32>,
}

/// Why a presented token is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    /// Not a dev-box token at all.
    #[error("the bearer token is not a dev-box token (they look like dbx_ID_SECRET)")]
    Malformed,
    /// No token has this id and secret (never made, revoked, or a wrong secret).
    #[error(
        "the bearer token is not valid (revoked, or never made): ask for a new one (sandbox token create)"
    )]
    Unknown,
    /// The token has expired.
    #[error("the token {0:?} has expired: ask for a new one (sandbox token create)")]
    Expired(String),
}

fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut b = vec![0u8; bytes];
    getrandom::fill(&mut b).map_err(|e| {
        EngineError::internal(
            "random bytes for a token",
            std::io::Error::other(e.to_string()),
        )
    })?;
    Ok(hex::encode(b))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn valid_pattern(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 128
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '*' | '?'))
}

fn scopes_of(text: &str) -> Vec<Scope> {
    Scope::parse_list(text).unwrap_or_default()
}

fn info(t: &TokenRecord, now: i64) -> TokenInfo {
    TokenInfo {
        name: t.name.clone(),
        id: t.id.clone(),
        scopes: scopes_of(&t.scopes),
        sandbox: t.sandbox.clone(),
        created_at: rfc3339(t.created_at),
        created_by: t.created_by.clone(),
        expires_at: t.expires_at.map(rfc3339),
        expired: t.expires_at.is_some_and(|e| e <= now),
        last_used_at: t.last_used_at.map(rfc3339),
        rate_per_second: t.rate_per_second,
        max_execs: t.max_execs,
    }
}

impl Engine {
    /// Makes a token; its secret is in the answer and nowhere else.
    pub async fn create_token(
        self: &Arc<Self>,
        caller: &Caller,
        req: CreateTokenRequest,
    ) -> Result<CreatedToken> {
        if !valid_name(&req.name) {
            return Err(EngineError::InvalidRequest(format!(
                "token name {:?}: use 1 to 64 letters, digits, '-', '_' or '.'",
                req.name
            )));
        }
        if req.scopes.is_empty() {
            return Err(EngineError::InvalidRequest(
                "a token needs at least one scope: read, exec, approve or admin".into(),
            ));
        }
        if let Some(p) = &req.sandbox
            && !valid_pattern(p)
        {
            return Err(EngineError::InvalidRequest(format!(
                "sandbox pattern {p:?}: use letters, digits, '-', '_', '.', and '*' or '?' as wildcards (at most 128)"
            )));
        }
        if let Some(s) = req.expires_in_seconds
            && (s == 0 || s > MAX_EXPIRY_SECONDS)
        {
            return Err(EngineError::InvalidRequest(
                "expires_in_seconds must be between 1 and ten years".into(),
            ));
        }
        if let Some(r) = req.rate_per_second
            && !(r.is_finite() && r > 0.0 && r <= 100_000.0)
        {
            return Err(EngineError::InvalidRequest(
                "rate_per_second must be above 0 and at most 100000".into(),
            ));
        }
        if req.max_execs == Some(0) || req.max_execs.is_some_and(|m| m > 100_000) {
            return Err(EngineError::InvalidRequest(
                "max_execs must be between 1 and 100000".into(),
            ));
        }
        let mut scopes = req.scopes.clone();
        scopes.sort();
        scopes.dedup();
        let secret = random_hex(32)?;
        let now = now_ms();
        let rec = TokenRecord {
            id: random_hex(6)?,
            name: req.name.clone(),
            secret_hash: hash(&secret),
            scopes: scopes
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(","),
            sandbox: req.sandbox.clone(),
            created_at: now,
            created_by: caller.name().to_string(),
            expires_at: req
                .expires_in_seconds
                .map(|s| now.saturating_add((s as i64).saturating_mul(1000))),
            last_used_at: None,
            rate_per_second: req.rate_per_second,
            max_execs: req.max_execs,
        };
        let caller = caller.clone();
        self.blocking(move |e| {
            e.store.insert_token(&rec).map_err(|err| match err {
                StoreError::Conflict(_) => EngineError::AlreadyExists {
                    kind: "token",
                    name: rec.name.clone(),
                },
                other => other.into(),
            })?;
            let shown = info(&rec, now);
            e.audit(
                &caller,
                "token.create",
                None,
                serde_json::json!({
                    "name": rec.name,
                    "id": rec.id,
                    "scopes": shown.scopes,
                    "sandbox": rec.sandbox,
                    "expires_at": shown.expires_at,
                }),
            );
            Ok(CreatedToken {
                token: format!("dbx_{}_{secret}", rec.id),
                info: shown,
            })
        })
        .await
    }

    /// Every token (never a secret).
    pub async fn tokens(self: &Arc<Self>) -> Result<Vec<TokenInfo>> {
        self.blocking(|e| {
            let now = now_ms();
            Ok(e.store.tokens()?.iter().map(|t| info(t, now)).collect())
        })
        .await
    }

    /// Revokes a token: its next request is refused.
    pub async fn revoke_token(self: &Arc<Self>, caller: &Caller, name: &str) -> Result<()> {
        let (caller, name) = (caller.clone(), name.to_string());
        self.blocking(move |e| {
            if !e.store.delete_token(&name)? {
                return Err(EngineError::NotFound {
                    kind: "token",
                    name,
                    hint: "see `sandbox token ls` for the tokens that exist",
                });
            }
            e.audit(
                &caller,
                "token.revoke",
                None,
                serde_json::json!({ "name": name }),
            );
            Ok(())
        })
        .await
    }

    /// Checks a presented bearer token: what it grants, or why not.
    pub async fn authenticate(
        self: &Arc<Self>,
        token: &str,
    ) -> Result<std::result::Result<TokenGrant, TokenRefusal>> {
        let Some((id, secret)) = token
            .strip_prefix("dbx_")
            .and_then(|rest| rest.split_once('_'))
            .filter(|(id, secret)| {
                id.len() == 12
                    && secret.len() == 64
                    && id
                        .bytes()
                        .chain(secret.bytes())
                        .all(|b| b.is_ascii_hexdigit())
            })
        else {
            return Ok(Err(TokenRefusal::Malformed));
        };
        let (id, secret) = (id.to_string(), secret.to_string());
        self.blocking(move |e| {
            let Some(t) = e.store.token_by_id(&id)? else {
                return Ok(Err(TokenRefusal::Unknown));
            };
            if !bool::from(hash(&secret).as_bytes().ct_eq(t.secret_hash.as_bytes())) {
                return Ok(Err(TokenRefusal::Unknown));
            }
            let now = now_ms();
            if t.expires_at.is_some_and(|x| x <= now) {
                return Ok(Err(TokenRefusal::Expired(t.name)));
            }
            if let Err(err) = e.store.touch_token(&t.id, now) {
                tracing::warn!("recording a token's use: {err}");
            }
            Ok(Ok(TokenGrant {
                scopes: scopes_of(&t.scopes),
                id: t.id,
                name: t.name,
                sandbox: t.sandbox,
                rate_per_second: t.rate_per_second,
                max_execs: t.max_execs,
            }))
        })
        .await
    }
}
