//! The schema as versioned migrations, applied in order under an advisory
//! lock, each in its own transaction with its version row.

use sqlx::{PgPool, Row};

use super::PgError;

/// Migrations in order; version `i + 1` is `MIGRATIONS[i]`.
const MIGRATIONS: &[(&str, &str)] = &[(
    "seen_init",
    include_str!("../../migrations/0001_seen_init.sql"),
)];

/// The newest schema version this build knows.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// Any constant shared by every seen process: concurrent `migrate` calls
/// queue on it instead of racing to create the same tables.
const MIGRATION_LOCK: i64 = 0x5EE1_5C4E_4D41;

const VERSION_TABLE: &str = "CREATE TABLE IF NOT EXISTS seen_schema_version (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)";

/// What [`super::Postgres::migrate`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Migrated {
    /// The version found before (0 on an empty database).
    pub from: i32,
    /// The version now.
    pub to: i32,
}

/// Bring the schema up to [`SCHEMA_VERSION`]; a no-op when it is there.
pub(super) async fn migrate(pool: &PgPool) -> Result<Migrated, PgError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *tx)
        .await?;
    sqlx::query(VERSION_TABLE).execute(&mut *tx).await?;
    let from = current(&mut tx).await?;
    check_not_newer(from)?;
    for (i, (name, sql)) in MIGRATIONS.iter().enumerate().skip(from as usize) {
        sqlx::raw_sql(sql).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO seen_schema_version (version, name) VALUES ($1, $2)")
            .bind(i as i32 + 1)
            .bind(*name)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(Migrated {
        from,
        to: SCHEMA_VERSION.max(from),
    })
}

/// Check that the schema is installed and not newer than this build.
pub(super) async fn check(pool: &PgPool) -> Result<(), PgError> {
    let exists: bool = sqlx::query("SELECT to_regclass('seen_schema_version') IS NOT NULL")
        .fetch_one(pool)
        .await?
        .try_get(0)?;
    if !exists {
        return Err(PgError::SchemaMissing);
    }
    let mut conn = pool.acquire().await?;
    let found = current(&mut conn).await?;
    check_not_newer(found)?;
    if found < SCHEMA_VERSION {
        return Err(PgError::SchemaOutdated {
            found,
            expected: SCHEMA_VERSION,
        });
    }
    Ok(())
}

async fn current(conn: &mut sqlx::PgConnection) -> Result<i32, PgError> {
    let v: Option<i32> = sqlx::query("SELECT max(version) FROM seen_schema_version")
        .fetch_one(conn)
        .await?
        .try_get(0)?;
    Ok(v.unwrap_or(0))
}

fn check_not_newer(found: i32) -> Result<(), PgError> {
    if found > SCHEMA_VERSION {
        return Err(PgError::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(())
}
