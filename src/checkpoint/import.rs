//! Moving off a per-event PostgreSQL guard: load an existing
//! `processed_events(event_id, processed_at, ...)` table into the store, so
//! nothing it already processed is processed again.

use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use sqlx::Row;

use super::{Loader, PgError, Postgres};
use crate::Engine;

/// The table to import and its columns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportTable {
    /// Table name, optionally schema-qualified (`schema.table`).
    pub table: String,
    /// Column holding the event id (any type with a text form).
    pub id_column: String,
    /// Column holding when the event was processed (`timestamptz`).
    pub processed_at_column: String,
}

impl Default for ImportTable {
    fn default() -> Self {
        ImportTable {
            table: "processed_events".into(),
            id_column: "event_id".into(),
            processed_at_column: "processed_at".into(),
        }
    }
}

/// What an import did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Rows read: those processed within the TTL.
    pub rows: u64,
    /// Ids marked that the store did not have.
    pub imported: u64,
    /// Rows whose id was null, empty or too long (skipped, counted).
    pub invalid: u64,
    /// Wall time.
    pub duration: Duration,
}

/// `name` (or `schema.name`) as a quoted SQL identifier.
fn quote_ident(name: &str) -> Result<String, PgError> {
    let parts: Vec<&str> = name.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) || parts.len() > 2 {
        return Err(PgError::Config(format!(
            "{name:?} is not a table or column name"
        )));
    }
    Ok(parts
        .iter()
        .map(|p| format!("\"{}\"", p.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join("."))
}

impl Postgres {
    /// Mark every id of `source` processed within the engine's TTL, each
    /// expiring at its `processed_at` plus the TTL. `progress(rows, total)`
    /// is called as rows arrive. Repeatable: ids already marked are left
    /// alone.
    pub async fn import(
        &self,
        engine: &Engine,
        source: &ImportTable,
        progress: impl Fn(u64, u64),
    ) -> Result<ImportReport, PgError> {
        let table = quote_ident(&source.table)?;
        let id = quote_ident(&source.id_column)?;
        let at = quote_ident(&source.processed_at_column)?;
        let ttl = engine.ttl().as_secs() as i64;
        let filter = format!("FROM {table} WHERE {at} > now() - $1 * interval '1 second'");
        let count = format!("SELECT count(*) {filter}");
        let select = format!("SELECT {id}::text, floor(extract(epoch FROM {at}))::bigint {filter}");
        let progress = &progress;
        self.hosts
            .run("import", |pool| {
                let (count, select) = (count.clone(), select.clone());
                async move {
                    let started = Instant::now();
                    let total: i64 = sqlx::query(&count)
                        .bind(ttl)
                        .fetch_one(&pool)
                        .await?
                        .try_get(0)?;
                    progress(0, total as u64);
                    let mut report = ImportReport::default();
                    let mut rows = sqlx::query(&select).bind(ttl).fetch(&pool);
                    let mut loader = Loader::new(engine);
                    while let Some(row) = rows.try_next().await? {
                        report.rows += 1;
                        let id: Option<String> = row.try_get(0)?;
                        let processed_at: Option<i64> = row.try_get(1)?;
                        let fp = id.as_deref().map(|id| engine.fingerprint(id));
                        let (Some(Ok(fp)), Some(at)) = (fp, processed_at) else {
                            report.invalid += 1;
                            continue;
                        };
                        let expiry = (at.max(0) as u64).saturating_add(ttl as u64);
                        if loader.push(fp, expiry)? {
                            progress(report.rows, total as u64);
                        }
                    }
                    report.imported = loader.finish()?;
                    progress(report.rows, total as u64);
                    report.duration = started.elapsed();
                    Ok(report)
                }
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_not_spliced() {
        assert_eq!(
            quote_ident("processed_events").unwrap(),
            "\"processed_events\""
        );
        assert_eq!(quote_ident("app.events").unwrap(), "\"app\".\"events\"");
        assert_eq!(
            quote_ident("x\"; DROP TABLE y; --").unwrap(),
            "\"x\"\"; DROP TABLE y; --\""
        );
        assert!(quote_ident("").is_err());
        assert!(quote_ident("a..b").is_err());
    }
}
