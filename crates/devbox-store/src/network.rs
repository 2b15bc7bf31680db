//! Live network rules: a sandbox's allow and deny rules as changed since it was created
//! (`sandbox network allow|deny`), kept apart from its spec so that a reset can go back to
//! the spec's; and the blocked attempts recorded in the audit log.

use rusqlite::{OptionalExtension, params};

use crate::safety::{audit_row, finish_audit};
use crate::{AuditRecord, Store, StoreError};

impl Store {
    /// A sandbox's live rules (JSON), if they were changed from its spec's.
    pub fn network_rules(&self, sandbox_id: &str) -> Result<Option<String>, StoreError> {
        self.with(|c| {
            Ok(c.query_row(
                "SELECT rules FROM network_rules WHERE sandbox_id = ?1",
                [sandbox_id],
                |r| r.get(0),
            )
            .optional()?)
        })
    }

    /// Sets (`Some`) or drops (`None`: back to the spec's) a sandbox's live rules.
    pub fn set_network_rules(
        &self,
        sandbox_id: &str,
        rules: Option<&str>,
    ) -> Result<(), StoreError> {
        self.with(|c| {
            match rules {
                Some(r) => c.execute(
                    "INSERT INTO network_rules (sandbox_id, rules) VALUES (?1, ?2)
                     ON CONFLICT (sandbox_id) DO UPDATE SET rules = excluded.rules",
                    params![sandbox_id, r],
                )?,
                None => c.execute(
                    "DELETE FROM network_rules WHERE sandbox_id = ?1",
                    [sandbox_id],
                )?,
            };
            Ok(())
        })
    }

    /// The newest `limit` audit records of one action for a sandbox since `since_ms`,
    /// oldest first.
    pub fn audit_of_action(
        &self,
        sandbox: &str,
        action: &str,
        since_ms: i64,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT seq, time, actor, action, sandbox, detail, prev_hash, hash FROM audit
                 WHERE action = ?1 AND sandbox = ?2 AND time >= ?3 ORDER BY seq DESC LIMIT ?4",
            )?;
            let mut rows: Vec<AuditRecord> = st
                .query_map(params![action, sandbox, since_ms, limit as i64], audit_row)?
                .map(|r| r.map(finish_audit))
                .collect::<Result<_, _>>()?;
            rows.reverse();
            Ok(rows)
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::Store;

    #[test]
    fn rules_are_set_replaced_and_dropped() {
        let s = Store::open_in_memory().unwrap();
        assert_eq!(s.network_rules("a").unwrap(), None);
        s.set_network_rules("a", Some("{\"allow\":[]}")).unwrap();
        s.set_network_rules("a", Some("{\"allow\":[\"x.y\"]}"))
            .unwrap();
        assert_eq!(
            s.network_rules("a").unwrap().as_deref(),
            Some("{\"allow\":[\"x.y\"]}")
        );
        s.set_network_rules("a", None).unwrap();
        assert_eq!(s.network_rules("a").unwrap(), None);
    }

    #[test]
    fn blocked_attempts_by_sandbox() {
        let s = Store::open_in_memory().unwrap();
        for i in 0..5 {
            s.append_audit(
                "daemon",
                "network.blocked",
                Some("a"),
                &serde_json::json!({"i": i}),
            )
            .unwrap();
        }
        s.append_audit(
            "daemon",
            "network.blocked",
            Some("b"),
            &serde_json::json!({}),
        )
        .unwrap();
        s.append_audit("root", "network.allow", Some("a"), &serde_json::json!({}))
            .unwrap();
        let got = s.audit_of_action("a", "network.blocked", 0, 3).unwrap();
        let is: Vec<_> = got
            .iter()
            .map(|r| r.detail["i"].as_i64().unwrap())
            .collect();
        assert_eq!(is, [2, 3, 4]);
    }
}
