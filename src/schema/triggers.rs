//! The trigger functions, generated per resource with its column names written in. Builds
//! SQL text only; [`super::migrate`] installs it.

use super::capture::MESSAGE_PREFIX;
use super::names::{
    CHANGES_TABLE, FLUSH_ABOVE_KEYS, LEGACY_FUNCTIONS, NOTIFY_CHANNEL, VERSION_SEQUENCE,
};
use crate::config::ResourceConfig;
use crate::resource::{quote_ident, quote_literal};

/// The name of one of a resource's trigger functions: `{prefix}_{resource}`, shortened with a
/// hash of the resource's name where that would pass Postgres' 63-byte limit.
pub(super) fn function_name(prefix: &str, resource: &str) -> String {
    let name = format!("{prefix}_{resource}");
    // `syncar_stamp_version`, for a resource named `version`, is an earlier release's
    // generic function, which tables no longer configured may still call.
    if name.len() <= 63 && !LEGACY_FUNCTIONS.contains(&name.as_str()) {
        return name;
    }
    // FNV-1a: stable across releases and platforms, unlike std's hasher.
    let hash = resource.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    // Resource names are ASCII, so any byte index is a char boundary.
    format!("{}_{hash:08x}", &name[..name.len().min(63 - 9)])
}

// The trigger functions are generated per resource, with the resource's own column names in
// them: generic ones taking names as arguments had to go through `to_jsonb` of the whole row,
// and cost plain-SQL writers about twice as much (BENCHMARKS.md, hot path, "Triggers cost plain-SQL writers").

/// BEFORE INSERT OR UPDATE: every row written, by anyone, takes a new version.
///
/// # Schema changes
/// The function names the version column, and PL/pgSQL resolves names when it runs: after
/// the column is renamed, `NEW.version` fails with `undefined_column` (or, retyped, with
/// `datatype_mismatch`; retyped to integer, past 2^31 versions, with
/// `numeric_value_out_of_range`), which would fail the writer's statement. The fast path is
/// kept in a block that catches exactly those, and the
/// fallback finds the column by its attribute number (`version_attnum`, fixed for the
/// column's life) and sets it through `jsonb_populate_record`, only if it is a bigint of
/// the table the function was made for (`table_oid`: a dump and restore renumbers the
/// columns and gives the table a new OID; a number must never stamp one of the
/// customer's). A column that is gone leaves
/// the row unstamped: the writer's statement never fails because of syncar. (Entering the
/// block costs a subtransaction start, about 0.3 µs a row here.)
pub(super) fn stamp_function_body(
    schema: &str,
    r: &ResourceConfig,
    version_attnum: i16,
    table_oid: u32,
) -> String {
    format!(
        "
DECLARE
  col name;
BEGIN
  BEGIN
    NEW.{col} := {next};
  EXCEPTION WHEN undefined_column OR datatype_mismatch OR cannot_coerce
                 OR numeric_value_out_of_range THEN
    SELECT a.attname INTO col FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = TG_RELID AND TG_RELID = {table_oid}::pg_catalog.oid AND a.attnum = {version_attnum}
       AND NOT a.attisdropped
       AND a.atttypid = 'pg_catalog.int8'::pg_catalog.regtype::pg_catalog.oid;
    IF FOUND THEN
      BEGIN
        NEW := pg_catalog.jsonb_populate_record(NEW, pg_catalog.jsonb_build_object(col, {next}));
      EXCEPTION WHEN OTHERS THEN
        NULL; -- retyped to what takes no number: left unstamped, the resource unavailable
      END;
    END IF;
  END;
  RETURN NEW;
END
",
        col = quote_ident(&r.version_column),
        next = next_version(schema),
    )
}

/// What the announcing trigger function does with a statement's changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Announce {
    /// Append them to the changes log (`changes_log`).
    Log,
    /// Append them to the log and NOTIFY each (`notify`).
    Notify,
    /// Emit a logical decoding message for what the WAL cannot say by itself (`wal`): a
    /// delete's version, a moved key when the key is not in the replica identity, a
    /// TRUNCATE's version. Inserts and updates reach the relay through the WAL alone.
    Wal,
}

/// AFTER INSERT, UPDATE or DELETE, once per statement: announce which keys the statement
/// changed, at which versions (see [`Announce`]). A delete takes a fresh version for its
/// tombstone; an update that moves a row to another key also announces the old key as
/// deleted. The rows come from the statement's transition tables, so a statement changing
/// many rows is announced with one insert (or one message).
///
/// # Schema changes
/// The body names the key and version columns. When a statement finds them renamed,
/// dropped or retyped under it, the whole announcement is replaced by a resource-wide flush
/// (with `wal`, a `{"resource", "flush": true}` message the relay gives a version of its
/// own): coarser, never wrong, and the writer's statement still succeeds. Only the errors a
/// changed table raises are caught (42703, 42P01, 42883, 42804, 0A000, 42846).
pub(super) fn announce_function_body(schema: &str, r: &ResourceConfig, mode: Announce) -> String {
    let key = quote_ident(&r.key);
    let next = next_version(schema);
    // A NULL key (a nullable unique column) names no document: nothing to announce. A NULL
    // version (the stamp disabled on its own, or a row never stamped that a writer changed
    // with it disabled) is announced at a fresh one: the log's version is NOT NULL, and the
    // writer's statement must not fail for it.
    let puts = format!(
        "SELECT COALESCE(n.{ver}, {next}) AS version, n.{key}::text AS key, 'put' AS op \
         FROM syncar_new n WHERE n.{key} IS NOT NULL",
        ver = quote_ident(&r.version_column)
    );
    let deletes = format!(
        "SELECT {next} AS version, o.{key}::text AS key, 'delete' AS op FROM syncar_old o \
         WHERE o.{key} IS NOT NULL"
    );
    // Keys that no new row has: deleted by this update. (Set semantics: two rows swapping
    // keys delete nothing.) A moved row's tombstone is the newer version: the row was
    // stamped by the BEFORE ROW trigger, before this statement trigger calls nextval.
    let moved_only =
        format!("{deletes} AND NOT EXISTS (SELECT 1 FROM syncar_new n WHERE n.{key} OPERATOR(pg_catalog.=) o.{key})");
    let moved = format!("{puts} UNION ALL {moved_only}");
    let (insert, update, delete) = match mode {
        Announce::Wal => (
            "    NULL;".to_string(),
            emit_deletes(schema, r, &moved_only),
            emit_deletes(schema, r, &deletes),
        ),
        _ => (
            send_bounded(schema, r, mode, &puts),
            send_bounded(schema, r, mode, &moved),
            send_bounded(schema, r, mode, &deletes),
        ),
    };
    // The fallback names no column of the table: a resource-wide flush. With `wal` the
    // version is taken (and ignored by the relay) so that syncar's own DELETE, which reads the
    // delete's version with currval(), never reads an older one.
    let fallback = flush(
        schema,
        r,
        mode,
        &format!("'flush', true, 'version', {next}"),
    );
    format!(
        "
DECLARE
  r record;
  payload text;
  n bigint;
BEGIN
  BEGIN
  IF TG_OP = 'INSERT' THEN
{insert}
  ELSIF TG_OP = 'UPDATE' THEN
{update}
  ELSE
{delete}
  END IF;
  EXCEPTION WHEN undefined_column OR undefined_table OR undefined_function
    OR datatype_mismatch OR feature_not_supported OR cannot_coerce THEN
  -- The table changed under this function (its key or version column renamed, dropped or
  -- retyped): announce a flush of the resource, which names no column. Anything else (a
  -- role without USAGE on the sequence...) still fails loudly, as it must: an unannounced
  -- change would leave caches stale.
{fallback}
  END;
  RETURN NULL;
END
"
    )
}

/// AFTER TRUNCATE, once per statement: a resource-wide flush at a version the TRUNCATE
/// takes (every row gone; rows inserted after it take later versions), logged (and with
/// `notify` announced) or, with `wal`, emitted as a logical decoding message.
pub(super) fn truncate_function_body(schema: &str, r: &ResourceConfig, mode: Announce) -> String {
    let next = next_version(schema);
    let body = flush(schema, r, mode, &format!("'truncate', {next}"));
    format!(
        "
DECLARE
  r record;
  payload text;
BEGIN
{body}
  RETURN NULL;
END
"
    )
}

/// The statements announcing a flush of the whole resource at a version they take: logged
/// (and with `notify` announced) as a `flush`, or with `wal` a logical decoding message
/// `{"resource", <wal_fields>}`.
fn flush(schema: &str, r: &ResourceConfig, mode: Announce, wal_fields: &str) -> String {
    match mode {
        Announce::Wal => format!(
            "    PERFORM pg_catalog.pg_logical_emit_message(true, {prefix}, pg_catalog.json_build_object('resource', \
             {resource}, {wal_fields})::text);",
            prefix = quote_literal(MESSAGE_PREFIX),
            resource = quote_literal(&r.name),
        ),
        _ => send(
            schema,
            r,
            mode == Announce::Notify,
            &format!(
                "SELECT {} AS version, NULL::pg_catalog.text AS key, 'flush' AS op",
                next_version(schema)
            ),
            None,
        ),
    }
}

/// One transactional logical decoding message naming every deleted key of the statement
/// and the version its delete took: `{"resource", "deletes": [[key, version], ...]}`. The
/// relay reads it at the transaction's commit, beside the pgoutput rows. Nothing is emitted
/// for a statement that deleted nothing; a flush of the resource for one that changed more
/// than [`FLUSH_ABOVE_KEYS`] rows (the relay flushes it too).
fn emit_deletes(schema: &str, r: &ResourceConfig, deletes: &str) -> String {
    let next = next_version(schema);
    format!(
        "    IF (SELECT pg_catalog.count(*) FROM syncar_old) > {FLUSH_ABOVE_KEYS} THEN
{flush}
    ELSE
      PERFORM pg_catalog.pg_logical_emit_message(true, {prefix}, pg_catalog.json_build_object('resource', \
         {resource}, 'deletes', pg_catalog.json_agg(pg_catalog.json_build_array(d.key, d.version)))::text) \
         FROM ({deletes}) d HAVING pg_catalog.count(*) > 0;
    END IF;",
        flush = flush(
            schema,
            r,
            Announce::Wal,
            &format!("'flush', true, 'version', {next}")
        ),
        prefix = quote_literal(MESSAGE_PREFIX),
        resource = quote_literal(&r.name),
    )
}

/// [`send`] for a statement's changes; with `notify`, bounded: past [`FLUSH_ABOVE_KEYS`] of
/// them, one flush of the resource after those already sent. A whole-table UPDATE or DELETE
/// would otherwise queue a notification per key, which past Postgres' 8 GB queue fails the
/// customer's commit; the bound is a counter in the loop. The changes log is not bounded: a
/// row per key makes a bulk statement slower, never fail, and bounding it (a `LIMIT` on its
/// insert) cost a single-row UPDATE 4 % more instructions (`make bench-stamp`).
fn send_bounded(schema: &str, r: &ResourceConfig, mode: Announce, changes: &str) -> String {
    if mode != Announce::Notify {
        return send(schema, r, false, changes, None);
    }
    let next = next_version(schema);
    let overflow = flush(
        schema,
        r,
        mode,
        &format!("'flush', true, 'version', {next}"),
    );
    send(schema, r, true, changes, Some(&overflow))
}

/// The statements logging (and with `notify` announcing) the changes `changes` selects
/// (`version`, `key`, `op`). A NOTIFY payload that would pass Postgres' 8000-byte limit
/// becomes a resource-wide `flush` instead of failing the writer's transaction; the log has
/// no such limit. With `overflow` (and `notify`), the loop runs `overflow` and stops once
/// past [`FLUSH_ABOVE_KEYS`] changes (the function declares `n`).
fn send(
    schema: &str,
    r: &ResourceConfig,
    notify: bool,
    changes: &str,
    overflow: Option<&str>,
) -> String {
    let log = format!("{}.{CHANGES_TABLE}", quote_ident(schema));
    let resource = quote_literal(&r.name);
    if !notify {
        return format!(
            "    INSERT INTO {log} (version, resource, key, op)
      SELECT c.version, {resource}, c.key, c.op FROM ({changes}) c;"
        );
    }
    let channel = quote_literal(NOTIFY_CHANNEL);
    let payload = |key: &str, op: &str| {
        format!(
            "pg_catalog.json_build_object('resource', {resource}, 'key', {key}, 'version', r.version, \
             'op', {op}, 'ts_us', (extract(epoch FROM pg_catalog.clock_timestamp()) * 1000000::pg_catalog.numeric)::pg_catalog.int8)::pg_catalog.text"
        )
    };
    let (start, bound) = match overflow {
        Some(overflow) => (
            "    n := 0;\n".to_string(),
            format!(
                "      n := n + 1;
      IF n > {FLUSH_ABOVE_KEYS} THEN
{overflow}
        EXIT;
      END IF;
"
            ),
        ),
        None => (String::new(), String::new()),
    };
    format!(
        "{start}    FOR r IN {changes} LOOP
{bound}      payload := {};
      IF pg_catalog.octet_length(payload) <= 7900 THEN
        INSERT INTO {log} (version, resource, key, op) VALUES (r.version, {resource}, r.key, r.op);
      ELSE
        payload := {};
        INSERT INTO {log} (version, resource, key, op) VALUES (r.version, {resource}, NULL, 'flush');
      END IF;
      PERFORM pg_catalog.pg_notify({channel}, payload);
    END LOOP;",
        payload("r.key", "r.op"),
        payload("NULL", "'flush'"),
    )
}

/// A call taking the next version: `pg_catalog.nextval` of syncar's sequence as a regclass
/// constant, every name schema-qualified. The triggers run as whoever writes, under the
/// writer's `search_path`: an unqualified `nextval('...')` would prefer a `nextval(text)`
/// that anyone with CREATE on a schema of that path had planted, and run it as the writer
/// (the class of CVE-2018-1058). The other calls in the bodies are qualified the same way,
/// and literals compared with catalog columns carry their exact types, so that no operator
/// planted elsewhere matches better.
pub(super) fn next_version(schema: &str) -> String {
    format!(
        "pg_catalog.nextval({}::pg_catalog.regclass)",
        quote_literal(&format!("{}.{VERSION_SEQUENCE}", quote_ident(schema)))
    )
}

/// `body` between dollar quotes whose tag it does not contain (column names are written into
/// it, and may hold anything).
pub(super) fn dollar_quote(body: &str) -> String {
    let tag = (0..)
        .map(|n| format!("$fn{n}$"))
        .find(|tag| !body.contains(tag.as_str()))
        .expect("some tag is free");
    format!("{tag}{body}{tag}")
}

#[cfg(test)]
mod tests {
    use super::{dollar_quote, function_name};

    #[test]
    fn function_names_fit_postgres_limit_and_stay_distinct() {
        assert_eq!(function_name("syncar_stamp", "users"), "syncar_stamp_users");
        let long = "a".repeat(63);
        let longer = format!("{long}b");
        let (x, y) = (
            function_name("syncar_announce", &long),
            function_name("syncar_announce", &longer),
        );
        assert!(x.len() <= 63 && y.len() <= 63, "{x} {y}");
        assert_ne!(x, y);
        assert_eq!(x, function_name("syncar_announce", &long), "stable");
        let clash = function_name("syncar_stamp", "version");
        assert!(
            clash.starts_with("syncar_stamp_version_"),
            "not an earlier release's generic function: {clash}"
        );
    }

    #[test]
    fn a_body_holding_the_dollar_tag_gets_another() {
        assert_eq!(dollar_quote("x"), "$fn0$x$fn0$");
        assert_eq!(dollar_quote("a $fn0$ b"), "$fn1$a $fn0$ b$fn1$");
    }
}
