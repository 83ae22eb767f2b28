//! Installing and removing the observer's tables and triggers.
//!
//! Everything lives in one PostgreSQL schema (`gantry_observer` unless told otherwise):
//! - `changes`: the change log. A row trigger on every watched table writes one row per changed
//!   row — entity, operation, before and after images as JSONB, the writing transaction's
//!   64-bit id (`xid8`, from `pg_current_xact_id()`) and the time of the change. It is the
//!   source of truth; see [`crate::capture`] for how it is read.
//! - `checkpoints`: per observer set, how far the change log has been delivered, and the
//!   fencing epoch of the process that may advance it.
//! - a statement trigger per watched table that sends one `NOTIFY <schema>` per statement: a
//!   wake-up hint for listeners, never the data (a listener that misses it finds the rows on its
//!   next poll).
//!
//! [`install`] is idempotent: tables are versioned migrations recorded in
//! `<schema>.schema_migrations`, functions are replaced, and each watched table's triggers are
//! recreated; triggers on tables no longer watched are dropped. It runs in one transaction under
//! an advisory lock, so concurrent installs apply one after the other. [`uninstall`] drops the
//! schema, and with its trigger functions every trigger (`CASCADE`).

use std::collections::BTreeSet;

use tokio_postgres::Client;

use crate::config::Entity;
use crate::{Error, ident};

/// The schema used unless told otherwise.
pub const DEFAULT_SCHEMA: &str = "gantry_observer";

/// Versioned table migrations; `{s}` is the quoted schema.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE {s}.changes (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    xid        xid8        NOT NULL DEFAULT pg_current_xact_id(),
    entity     text        NOT NULL,
    op         text        NOT NULL,
    before     jsonb,
    after      jsonb,
    changed_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX changes_xid ON {s}.changes (xid);
CREATE TABLE {s}.checkpoints (
    observer_set text        PRIMARY KEY,
    lo           xid8        NOT NULL,
    hi           xid8        NOT NULL,
    last_id      bigint      NOT NULL,
    epoch        bigint      NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
"#,
    r#"
CREATE TABLE {s}.breakers (
    process    text        NOT NULL,
    endpoint   text        NOT NULL,
    state      text        NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (process, endpoint)
);
"#,
];

/// What [`install`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// Migrations applied now (0 when the tables were up to date).
    pub migrations_applied: usize,
    /// Tables watched now (entity names).
    pub watched: Vec<String>,
    /// Tables no longer watched whose triggers were dropped.
    pub unwatched: Vec<String>,
}

fn capture_trigger(schema: &str) -> String {
    format!("{schema}_capture")
}

fn notify_trigger(schema: &str) -> String {
    format!("{schema}_notify")
}

/// Creates or updates the observer's schema in the database, and triggers on `entities`.
pub async fn install(
    client: &mut Client,
    schema: &str,
    entities: &BTreeSet<Entity>,
) -> Result<Installed, Error> {
    if schema.is_empty() {
        return Err(Error::Config("the observer schema name is empty".into()));
    }
    let s = ident(schema);
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
        &[&format!("gantry-observer-install:{schema}")],
    )
    .await?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {s};
         CREATE TABLE IF NOT EXISTS {s}.schema_migrations (
             version    integer     PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         );"
    ))
    .await?;
    let applied: i32 = tx
        .query_one(
            &format!("SELECT COALESCE(max(version), 0) FROM {s}.schema_migrations"),
            &[],
        )
        .await?
        .get(0);
    let applied = usize::try_from(applied).unwrap_or(0);
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        tx.batch_execute(&sql.replace("{s}", &s)).await?;
        let version = i32::try_from(i + 1).unwrap_or(i32::MAX);
        tx.execute(
            &format!("INSERT INTO {s}.schema_migrations (version) VALUES ($1)"),
            &[&version],
        )
        .await?;
    }
    let channel = schema.replace('\'', "''");
    tx.batch_execute(&format!(
        "CREATE OR REPLACE FUNCTION {s}.capture() RETURNS trigger LANGUAGE plpgsql AS $fn$
         BEGIN
             INSERT INTO {s}.changes (entity, op, before, after) VALUES (
                 TG_ARGV[0], TG_OP,
                 CASE WHEN TG_OP IN ('UPDATE', 'DELETE') THEN to_jsonb(OLD) END,
                 CASE WHEN TG_OP IN ('INSERT', 'UPDATE') THEN to_jsonb(NEW) END);
             RETURN NULL;
         END $fn$;
         CREATE OR REPLACE FUNCTION {s}.notify() RETURNS trigger LANGUAGE plpgsql AS $fn$
         BEGIN
             PERFORM pg_notify('{channel}', '');
             RETURN NULL;
         END $fn$;"
    ))
    .await?;

    // Triggers on tables no longer watched.
    let existing = tx
        .query(
            "SELECT DISTINCT n.nspname, c.relname FROM pg_trigger t
             JOIN pg_class c ON c.oid = t.tgrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE t.tgname = $1",
            &[&capture_trigger(schema)],
        )
        .await?;
    let mut unwatched = Vec::new();
    for row in existing {
        let entity = Entity {
            schema: row.get(0),
            table: row.get(1),
        };
        if !entities.contains(&entity) {
            drop_triggers(&tx, schema, &entity).await?;
            unwatched.push(entity.name());
        }
    }

    for entity in entities {
        let exists: bool = tx
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&entity.sql()])
            .await?
            .get(0);
        if !exists {
            return Err(Error::Config(format!(
                "entity {}: no such table {}.{}",
                entity.name(),
                entity.schema,
                entity.table
            )));
        }
        drop_triggers(&tx, schema, entity).await?;
        let name = entity.name().replace('\'', "''");
        tx.batch_execute(&format!(
            "CREATE TRIGGER {capture} AFTER INSERT OR UPDATE OR DELETE ON {table}
                 FOR EACH ROW EXECUTE FUNCTION {s}.capture('{name}');
             CREATE TRIGGER {notify} AFTER INSERT OR UPDATE OR DELETE ON {table}
                 FOR EACH STATEMENT EXECUTE FUNCTION {s}.notify();",
            capture = ident(&capture_trigger(schema)),
            notify = ident(&notify_trigger(schema)),
            table = entity.sql(),
        ))
        .await?;
    }
    tx.commit().await?;
    Ok(Installed {
        migrations_applied: MIGRATIONS.len().saturating_sub(applied),
        watched: entities.iter().map(Entity::name).collect(),
        unwatched,
    })
}

async fn drop_triggers(
    tx: &tokio_postgres::Transaction<'_>,
    schema: &str,
    entity: &Entity,
) -> Result<(), Error> {
    tx.batch_execute(&format!(
        "DROP TRIGGER IF EXISTS {} ON {table}; DROP TRIGGER IF EXISTS {} ON {table};",
        ident(&capture_trigger(schema)),
        ident(&notify_trigger(schema)),
        table = entity.sql(),
    ))
    .await?;
    Ok(())
}

/// Removes the observer's schema: the change log, checkpoints and every trigger. Returns false
/// when it was not installed.
pub async fn uninstall(client: &mut Client, schema: &str) -> Result<bool, Error> {
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
        &[&format!("gantry-observer-install:{schema}")],
    )
    .await?;
    let present: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[&schema],
        )
        .await?
        .get(0);
    if present {
        tx.batch_execute(&format!("DROP SCHEMA {} CASCADE", ident(schema)))
            .await?;
    }
    tx.commit().await?;
    Ok(present)
}
