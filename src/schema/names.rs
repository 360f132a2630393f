//! The names of syncar's objects in Postgres, and which triggers each source needs.

/// The channel the notify trigger sends on. Payloads are JSON:
/// `{"resource", "key", "version", "op": "put"|"delete"|"flush", "ts_us"}`. `flush` (with a
/// null key) replaces a payload that would exceed Postgres' 8000-byte limit: drop the whole
/// resource. `ts_us` is the trigger's wall clock in microseconds, as close to commit as SQL
/// gets.
pub const NOTIFY_CHANNEL: &str = "syncar_invalidations";
/// The one sequence every version comes from.
pub const VERSION_SEQUENCE: &str = "syncar_version_seq";

/// `SELECT last_value` of the version sequence in `schema`: no version handed out so far is
/// above it (what vouches for a version a message names, see `model::SequenceBound`).
pub fn last_value_sql(schema: &str) -> String {
    format!(
        "SELECT last_value FROM {}.{}",
        crate::resource::quote_ident(schema),
        crate::resource::quote_ident(VERSION_SEQUENCE)
    )
}
/// Generic trigger functions of earlier releases, replaced by per-resource ones and dropped
/// by the migration once no trigger uses them.
pub(super) const LEGACY_FUNCTIONS: [&str; 3] =
    ["syncar_notify", "syncar_stamp_version", "syncar_send"];
/// The changes log: every announced change, kept `feeds.changes_retention` for replay after an
/// outage. `at` is the writer's clock when its trigger ran.
pub const CHANGES_TABLE: &str = "syncar_changes";
pub(super) const STAMP_TRIGGER: &str = "syncar_stamp_version";
/// Keys of one resource changed by one statement (the `wal` source's delete triggers) or one
/// transaction (the relay) above which the resource is flushed instead of each key being
/// invalidated. A bulk statement (an UPDATE or DELETE of a whole table) would otherwise make
/// the trigger write one logical message naming every key (past about 40 million keys
/// larger than Postgres' 1 GB limit for a value, which would fail the customer's
/// statement), hold every key in the relay's memory until the commit, and keep Redis and
/// every instance busy with it, one script call per 256 keys, while every other table's
/// changes wait behind it. A flush is one message; it empties every instance's whole L1 (as
/// a TRUNCATE does), which refills on demand.
pub const FLUSH_ABOVE_KEYS: usize = 10_000;
/// The optional extension holding the C version stamp (`ext/syncar_stamp`), and its one
/// function's name.
pub(super) const STAMP_EXTENSION: &str = "syncar_stamp";
/// The statement-level triggers that announce what a statement changed, one per event:
/// Postgres allows transition tables only on single-event triggers. Which of them a table
/// has depends on the source, see [`wanted_triggers`].
pub(super) const LOG_TRIGGERS: [&str; 4] = [
    "syncar_log_insert",
    "syncar_log_update",
    "syncar_log_delete",
    "syncar_log_truncate",
];
/// The row-level AFTER trigger of earlier releases, replaced by [`LOG_TRIGGERS`].
pub(super) const LEGACY_NOTIFY_TRIGGER: &str = "syncar_notify";
/// `pg_trigger.tgtype` bits.
pub(super) const TG_ROW: i16 = 1;
pub(super) const TG_BEFORE: i16 = 2;
pub(super) const TG_INSERT: i16 = 4;
pub(super) const TG_DELETE: i16 = 8;
pub(super) const TG_UPDATE: i16 = 16;
pub(super) const TG_TRUNCATE: i16 = 32;
/// Key of the advisory lock held while migrating ("syncar" in ASCII).
pub(super) const MIGRATION_LOCK: i64 = 0x73796e636172;

/// The triggers a table needs for `source`: the version stamp always; with `changes_log`
/// and `notify` every log trigger; with `wal` only what the WAL cannot say by itself (a
/// delete's version, a TRUNCATE's version, and, when the key is not in the table's replica
/// identity, keys moved by an UPDATE).
pub(super) fn wanted_triggers(
    source: crate::config::PostgresSource,
    key_outside_identity: bool,
) -> Vec<&'static str> {
    let mut names = vec![STAMP_TRIGGER];
    match source {
        crate::config::PostgresSource::Wal => {
            if key_outside_identity {
                names.push(LOG_TRIGGERS[1]);
            }
            names.extend([LOG_TRIGGERS[2], LOG_TRIGGERS[3]]);
        }
        _ => names.extend(LOG_TRIGGERS),
    }
    names
}
