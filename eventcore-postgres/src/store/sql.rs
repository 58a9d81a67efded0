//! The SQL of every operation (`src/sql/*.sql`), read once per store.

use crate::config::SchemaName;

/// The SQL of every operation, with the schema filled in once at construction.
pub(crate) struct Sql {
    pub(crate) read_streams: String,
    pub(crate) read_streams_after: String,
    pub(crate) read_all: String,
    pub(crate) peek_log: String,
    pub(crate) heads: String,
    pub(crate) append: String,
    pub(crate) append_one: String,
    pub(crate) append_many: String,
    pub(crate) idempotent_outcome: String,
    pub(crate) events_by_id: String,
    pub(crate) key_attempt: String,
    pub(crate) load_checkpoint: String,
    pub(crate) save_checkpoint: String,
    pub(crate) reset_checkpoint: String,
    pub(crate) park: String,
    pub(crate) parked: String,
    pub(crate) claim_checkpoint: String,
    pub(crate) lock_checkpoint: String,
    pub(crate) advance_checkpoint: String,
    pub(crate) load_snapshot: String,
    pub(crate) save_snapshot: String,
    pub(crate) delete_snapshot: String,
    pub(crate) delete_snapshots: String,
}

impl Sql {
    pub(super) fn for_schema(schema: &SchemaName) -> Self {
        let fill = |template: &str| {
            // The schema's name inside SQL string literals (lock keys), where the
            // functions use current_schema(). SchemaName allows no quote character.
            // Comment lines are for readers of the files: the server gets the statement
            // alone (and pg_stat_activity, which keeps the first 1 kB of each, shows it).
            template
                .lines()
                .filter(|line| !line.trim_start().starts_with("--"))
                .collect::<Vec<_>>()
                .join("\n")
                .replace("{schema}", &schema.quoted())
                .replace("{schema_name}", schema.as_str())
        };
        Sql {
            read_streams: fill(include_str!("../sql/read_streams.sql")),
            read_streams_after: fill(include_str!("../sql/read_streams_after.sql")),
            read_all: fill(include_str!("../sql/read_all.sql")),
            peek_log: fill(include_str!("../sql/peek_log.sql")),
            heads: fill(include_str!("../sql/heads.sql")),
            append: fill(include_str!("../sql/append.sql")),
            append_one: fill(include_str!("../sql/append_one.sql")),
            append_many: fill(include_str!("../sql/append_many.sql")),
            idempotent_outcome: fill(include_str!("../sql/idempotent_outcome.sql")),
            events_by_id: fill(include_str!("../sql/events_by_id.sql")),
            key_attempt: fill(include_str!("../sql/key_attempt.sql")),
            load_checkpoint: fill(include_str!("../sql/load_checkpoint.sql")),
            save_checkpoint: fill(include_str!("../sql/save_checkpoint.sql")),
            reset_checkpoint: fill(include_str!("../sql/reset_checkpoint.sql")),
            park: fill(include_str!("../sql/park.sql")),
            parked: fill(include_str!("../sql/parked.sql")),
            claim_checkpoint: fill(include_str!("../sql/claim_checkpoint.sql")),
            lock_checkpoint: fill(include_str!("../sql/lock_checkpoint.sql")),
            advance_checkpoint: fill(include_str!("../sql/advance_checkpoint.sql")),
            load_snapshot: fill(include_str!("../sql/load_snapshot.sql")),
            save_snapshot: fill(include_str!("../sql/save_snapshot.sql")),
            delete_snapshot: fill(include_str!("../sql/delete_snapshot.sql")),
            delete_snapshots: fill(include_str!("../sql/delete_snapshots.sql")),
        }
    }
}
