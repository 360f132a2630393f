//! The trigger functions, generated per resource with its column names written in. Builds
//! SQL text only; [`super::migrate`] installs it.

use super::{CHANGES_TABLE, LEGACY_FUNCTIONS, NOTIFY_CHANNEL, VERSION_SEQUENCE};
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
pub(super) fn stamp_function_body(schema: &str, r: &ResourceConfig) -> String {
    format!(
        "
BEGIN
  NEW.{col} := nextval({seq});
  RETURN NEW;
END
",
        col = quote_ident(&r.version_column),
        seq = quote_literal(&format!("{schema}.{VERSION_SEQUENCE}")),
    )
}

/// AFTER INSERT, UPDATE or DELETE, once per statement: log which keys the statement changed,
/// at which versions, and with the `notify` source announce each. A delete takes a fresh
/// version for its tombstone; an update that moves a row to another key also announces the
/// old key as deleted. The rows come from the statement's transition tables, so a statement
/// changing many rows logs them with one insert.
pub(super) fn announce_function_body(schema: &str, r: &ResourceConfig, notify: bool) -> String {
    let key = quote_ident(&r.key);
    let seq = quote_literal(&format!("{schema}.{VERSION_SEQUENCE}"));
    // A NULL key (a nullable unique column) names no document: nothing to announce.
    let puts = format!(
        "SELECT n.{ver} AS version, n.{key}::text AS key, 'put' AS op FROM syncar_new n \
         WHERE n.{key} IS NOT NULL",
        ver = quote_ident(&r.version_column)
    );
    let deletes = format!(
        "SELECT nextval({seq}) AS version, o.{key}::text AS key, 'delete' AS op FROM syncar_old o \
         WHERE o.{key} IS NOT NULL"
    );
    // Keys that no new row has: deleted by this update. (Set semantics: two rows swapping
    // keys delete nothing.) A moved row's tombstone is the newer version: the row was
    // stamped by the BEFORE ROW trigger, before this statement trigger calls nextval.
    let moved = format!(
        "{puts} UNION ALL {deletes} \
         AND NOT EXISTS (SELECT 1 FROM syncar_new n WHERE n.{key} = o.{key})"
    );
    format!(
        "
DECLARE
  r record;
  payload text;
BEGIN
  IF TG_OP = 'INSERT' THEN
{insert}
  ELSIF TG_OP = 'UPDATE' THEN
{update}
  ELSE
{delete}
  END IF;
  RETURN NULL;
END
",
        insert = send(schema, r, notify, &puts),
        update = send(schema, r, notify, &moved),
        delete = send(schema, r, notify, &deletes),
    )
}

/// The statements logging (and with `notify` announcing) the changes `changes` selects
/// (`version`, `key`, `op`). A NOTIFY payload that would pass Postgres' 8000-byte limit
/// becomes a resource-wide `flush` instead of failing the writer's transaction; the log has
/// no such limit.
fn send(schema: &str, r: &ResourceConfig, notify: bool, changes: &str) -> String {
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
            "json_build_object('resource', {resource}, 'key', {key}, 'version', r.version, \
             'op', {op}, 'ts_us', (extract(epoch FROM clock_timestamp()) * 1000000)::bigint)::text"
        )
    };
    format!(
        "    FOR r IN {changes} LOOP
      payload := {};
      IF octet_length(payload) <= 7900 THEN
        INSERT INTO {log} (version, resource, key, op) VALUES (r.version, {resource}, r.key, r.op);
      ELSE
        payload := {};
        INSERT INTO {log} (version, resource, key, op) VALUES (r.version, {resource}, NULL, 'flush');
      END IF;
      PERFORM pg_notify({channel}, payload);
    END LOOP;",
        payload("r.key", "r.op"),
        payload("NULL", "'flush'"),
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
