//! API tokens: each a name, a hash of its secret (never the secret), its scopes, an
//! optional sandbox pattern, expiry and limits.

use rusqlite::{OptionalExtension, Row, params};

use crate::{Store, StoreError, is_unique_violation};

/// One API token as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRecord {
    /// Public id (the token's first part).
    pub id: String,
    /// Name (unique).
    pub name: String,
    /// SHA-256 of the secret, hex.
    pub secret_hash: String,
    /// Scopes, comma-separated.
    pub scopes: String,
    /// Sandbox pattern, if limited.
    pub sandbox: Option<String>,
    /// Created, ms since epoch.
    pub created_at: i64,
    /// Who created it.
    pub created_by: String,
    /// Expires, ms since epoch.
    pub expires_at: Option<i64>,
    /// Last used, ms since epoch.
    pub last_used_at: Option<i64>,
    /// Requests a second, if not the default.
    pub rate_per_second: Option<f64>,
    /// Concurrent execs, if not the default.
    pub max_execs: Option<u32>,
}

const COLS: &str = "id, name, secret_hash, scopes, sandbox, created_at, created_by, expires_at, last_used_at, rate_per_second, max_execs";

fn row(r: &Row<'_>) -> rusqlite::Result<TokenRecord> {
    Ok(TokenRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        secret_hash: r.get(2)?,
        scopes: r.get(3)?,
        sandbox: r.get(4)?,
        created_at: r.get(5)?,
        created_by: r.get(6)?,
        expires_at: r.get(7)?,
        last_used_at: r.get(8)?,
        rate_per_second: r.get(9)?,
        max_execs: r.get(10)?,
    })
}

impl Store {
    /// Stores a new token; [`StoreError::Conflict`] if its name (or id) is taken.
    pub fn insert_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                &format!("INSERT INTO tokens ({COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"),
                params![
                    t.id,
                    t.name,
                    t.secret_hash,
                    t.scopes,
                    t.sandbox,
                    t.created_at,
                    t.created_by,
                    t.expires_at,
                    t.last_used_at,
                    t.rate_per_second,
                    t.max_execs
                ],
            )
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::Conflict(format!("a token named {:?}", t.name))
                } else {
                    e.into()
                }
            })?;
            Ok(())
        })
    }

    /// Every token, by name.
    pub fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare(&format!("SELECT {COLS} FROM tokens ORDER BY name"))?;
            Ok(st.query_map([], row)?.collect::<Result<_, _>>()?)
        })
    }

    /// The token with this id.
    pub fn token_by_id(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.with(|c| {
            Ok(c.query_row(
                &format!("SELECT {COLS} FROM tokens WHERE id = ?1"),
                [id],
                row,
            )
            .optional()?)
        })
    }

    /// Deletes the token of this name; whether there was one.
    pub fn delete_token(&self, name: &str) -> Result<bool, StoreError> {
        self.with(|c| Ok(c.execute("DELETE FROM tokens WHERE name = ?1", [name])? > 0))
    }

    /// Records a use of a token (at most one write a minute per token).
    pub fn touch_token(&self, id: &str, now_ms: i64) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE tokens SET last_used_at = ?2
                 WHERE id = ?1 AND (last_used_at IS NULL OR last_used_at < ?2 - 60000)",
                params![id, now_ms],
            )?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(id: &str, name: &str) -> TokenRecord {
        TokenRecord {
            id: id.into(),
            name: name.into(),
            secret_hash: "h".into(),
            scopes: "read".into(),
            sandbox: Some("ci-*".into()),
            created_at: 1,
            created_by: "root".into(),
            expires_at: None,
            last_used_at: None,
            rate_per_second: Some(2.5),
            max_execs: Some(3),
        }
    }

    #[test]
    fn tokens_are_stored_unique_and_deleted() {
        let s = Store::open_in_memory().unwrap();
        s.insert_token(&token("a1", "ci")).unwrap();
        assert!(matches!(
            s.insert_token(&token("a2", "ci")),
            Err(StoreError::Conflict(_))
        ));
        assert_eq!(s.token_by_id("a1").unwrap(), Some(token("a1", "ci")));
        s.touch_token("a1", 100_000).unwrap();
        assert_eq!(
            s.token_by_id("a1").unwrap().unwrap().last_used_at,
            Some(100_000)
        );
        assert_eq!(s.tokens().unwrap().len(), 1);
        assert!(s.delete_token("ci").unwrap());
        assert!(!s.delete_token("ci").unwrap());
        assert_eq!(s.token_by_id("a1").unwrap(), None);
    }
}
