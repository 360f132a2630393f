//! The SQL of a resource's documents: reads by key and by batch, deletes, the writes for each
//! precondition, and the restamp; identifiers always quoted, keys and bodies always bind
//! parameters. Runs no query itself.

use std::collections::BTreeMap;

use serde_json::value::RawValue;
use serde_json::Value;

use super::definition::{
    BodyError, Column, KeyParam, KeyType, Param, Precondition, Resource, Shape, WriteSql,
};
use super::quote::{join, quote_literal};
use crate::model::JsonText;

/// Equality as the catalog defines it, whatever the session's `search_path` holds. These
/// statements run with the session's `search_path` (they fire the app's own triggers, which
/// may rely on it), and an operator planted in a schema on it whose argument types fit
/// better (`=(varchar, text)` beside the catalog's `text = text`) would be chosen over the
/// catalog's: the class of CVE-2018-1058. Functions are qualified for the same reason
/// (`pg_catalog.to_jsonb` against a planted `to_jsonb(the_table)`). Casts and type names
/// need nothing: `pg_catalog` is searched first and a type name has no overloads.
const EQ: &str = "OPERATOR(pg_catalog.=)";

/// `jsonb - text` as the catalog defines it (see [`EQ`]).
const MINUS: &str = "OPERATOR(pg_catalog.-)";

impl Resource {
    /// `SELECT version, document` by key (`$1`): built once, served by [`Resource::get_sql`].
    pub(super) fn select_by_key_sql(&self) -> String {
        format!(
            "SELECT coalesce(t.{ver}, 0), {doc} FROM {table} AS t WHERE t.{key} {EQ} $1::{kt}",
            ver = self.version.quoted,
            doc = self.doc_expr(),
            table = self.table,
            key = self.key.quoted,
            kt = self.key_sql_type(),
        )
    }

    /// `SELECT key as text, version, document` of every key in `$1` (an array of the key
    /// column's type): the one query of a batch get.
    pub fn get_many_sql(&self) -> String {
        format!(
            "SELECT t.{key}::text, {ret} FROM {table} AS t WHERE t.{key} {EQ} ANY($1::{kt}[])",
            key = self.key.quoted,
            ret = self.returning(),
            table = self.table,
            kt = self.key_sql_type(),
        )
    }

    /// `DELETE` by key (`$1`), and when conditional only at one of the versions `$2` (an
    /// `int8[]`), returning the old version.
    pub fn delete_sql(&self, if_version: bool) -> String {
        let mut sql = format!(
            "DELETE FROM {table} AS t WHERE t.{key} {EQ} $1::{kt}",
            table = self.table,
            key = self.key.quoted,
            kt = self.key_sql_type(),
        );
        if if_version {
            sql.push_str(&format!(
                " AND coalesce(t.{}, 0) {EQ} ANY($2::int8[])",
                self.version.quoted
            ));
        }
        sql.push_str(&format!(
            " RETURNING coalesce(t.{}, 0)",
            self.version.quoted
        ));
        sql
    }

    /// Turns a client's body into the JSON bound as the document, and the SQL that writes it.
    ///
    /// For a table, the body must be an object whose fields are columns; the version column
    /// and generated columns are dropped (so a document read can be written back); the key
    /// column is set from the URL and must agree with the body if present there. A PUT
    /// replaces the whole row: columns not in the body take their default (NULL without one).
    ///
    /// # Errors
    /// [`BodyError`] (422 for the client) when the body does not fit the table.
    pub fn prepare_write(
        &self,
        key: &KeyParam,
        body: &JsonText,
        pre: &Precondition,
    ) -> Result<(String, WriteSql), BodyError> {
        match &self.shape {
            Shape::Kv => Ok((body.as_str().to_string(), self.kv_write_sql(pre))),
            Shape::Table { columns, readonly } => {
                // Only the top level is parsed: each column's value stays raw JSON text, for
                // Postgres to convert (however deep it nests).
                let fields: Vec<(String, &RawValue)> = serde_json::from_str::<
                    BTreeMap<String, &RawValue>,
                >(body.as_str())
                .map_err(|_| {
                    BodyError::Invalid(format!("a {:?} document must be a JSON object", self.name))
                })?
                .into_iter()
                .collect();
                let (doc, set) = self.table_doc(columns, readonly, key, fields)?;
                Ok((doc, self.table_write_sql(columns, &set, pre)))
            }
        }
    }

    /// The row to write as one JSON object text: the body's columns (raw), the URL's key.
    fn table_doc<'c>(
        &self,
        columns: &'c [Column],
        readonly: &[String],
        key: &KeyParam,
        fields: Vec<(String, &RawValue)>,
    ) -> Result<(String, Vec<&'c Column>), BodyError> {
        let key_json = match key {
            KeyParam::Text(s) => Value::String(s.clone()),
            KeyParam::Int(i) => Value::from(*i),
        };
        let mut given: Vec<(String, String)> = Vec::new();
        for (name, raw) in fields {
            if name == self.key.name {
                // A key is a number or a string: parsing it whole is shallow.
                let value: Option<Value> = serde_json::from_str(raw.get()).ok();
                let agrees = match (key, &value) {
                    (KeyParam::Int(i), Some(Value::Number(n))) => n.as_i64() == Some(*i),
                    (KeyParam::Text(s), Some(Value::String(v))) => s == v,
                    _ => false,
                };
                if !agrees {
                    let shown: String = raw.get().chars().take(64).collect();
                    return Err(BodyError::Invalid(format!(
                        "key column {:?} is {shown} in the body but {key_json} in the URL",
                        self.key.name
                    )));
                }
            } else if columns.iter().any(|c| c.name == name) {
                given.push((name, raw.get().to_string()));
            } else if name != self.version.name && !readonly.contains(&name) {
                return Err(BodyError::NotAColumn(name, self.name.clone()));
            }
        }
        given.push((self.key.name.clone(), key_json.to_string()));
        let mut doc = String::from("{");
        for (i, (name, raw)) in given.iter().enumerate() {
            if i > 0 {
                doc.push(',');
            }
            doc.push_str(&Value::String(name.clone()).to_string());
            doc.push(':');
            doc.push_str(raw);
        }
        doc.push('}');
        let set = columns
            .iter()
            .filter(|c| given.iter().any(|(n, _)| *n == c.name))
            .collect();
        Ok((doc, set))
    }

    fn kv_write_sql(&self, pre: &Precondition) -> WriteSql {
        use Param::*;
        let ret = self.returning();
        let (t, k, kt) = (&self.table, &self.key.quoted, self.key_sql_type());
        let ver = &self.version.quoted;
        match pre {
            Precondition::None => WriteSql {
                sql: format!(
                    "INSERT INTO {t} AS t ({k}, value) VALUES ($1::{kt}, $2::text::jsonb) \
                     ON CONFLICT ({k}) DO UPDATE SET value = EXCLUDED.value RETURNING {ret}, (t.xmax {EQ} 0)"
                ),
                params: vec![Key, Doc],
            },
            Precondition::Absent => WriteSql {
                sql: format!(
                    "INSERT INTO {t} AS t ({k}, value) VALUES ($1::{kt}, $2::text::jsonb) \
                     ON CONFLICT ({k}) DO NOTHING RETURNING {ret}, true"
                ),
                params: vec![Key, Doc],
            },
            Precondition::Exists => WriteSql {
                sql: format!(
                    "UPDATE {t} AS t SET value = $2::text::jsonb WHERE t.{k} {EQ} $1::{kt} RETURNING {ret}, false"
                ),
                params: vec![Key, Doc],
            },
            Precondition::Versions(_) => WriteSql {
                sql: format!(
                    "UPDATE {t} AS t SET value = $2::text::jsonb WHERE t.{k} {EQ} $1::{kt} \
                     AND coalesce(t.{ver}, 0) {EQ} ANY($3::int8[]) RETURNING {ret}, false"
                ),
                params: vec![Key, Doc, Versions],
            },
        }
    }

    /// PUT replaces the whole row: columns in `set` take the body's values, every other
    /// writable column its default (NULL when it has none).
    fn table_write_sql(&self, columns: &[Column], set: &[&Column], pre: &Precondition) -> WriteSql {
        use Param::*;
        let ret = self.returning();
        let (t, k, kt) = (&self.table, &self.key.quoted, self.key_sql_type());
        let ver = &self.version.quoted;
        let given = join(set.iter().map(|c| c.quoted.clone()));
        let is_key = |c: &&Column| c.name == self.key.name;
        let given_non_key: Vec<&Column> = set.iter().copied().filter(|c| !is_key(c)).collect();
        let absent: Vec<&Column> = columns
            .iter()
            .filter(|c| !is_key(c) && !set.iter().any(|s| s.name == c.name))
            .collect();
        let all_non_key: Vec<&Column> = columns.iter().filter(|c| !is_key(c)).collect();
        let source = format!("pg_catalog.jsonb_populate_record(NULL::{t}, $1::text::jsonb)");
        let insert = format!("INSERT INTO {t} AS t ({given}) SELECT {given} FROM {source}");
        // EXCLUDED is the proposed row, defaults included: it replaces every column. A row
        // with no column besides its key is still rewritten, so it takes a new version.
        let upsert_set = if all_non_key.is_empty() {
            format!("{k} = EXCLUDED.{k}")
        } else {
            let cols = join(all_non_key.iter().map(|c| c.quoted.clone()));
            let excluded = join(all_non_key.iter().map(|c| format!("EXCLUDED.{}", c.quoted)));
            format!("({cols}) = ROW({excluded})")
        };
        let mut assignments = Vec::new();
        if !given_non_key.is_empty() {
            let cols = join(given_non_key.iter().map(|c| c.quoted.clone()));
            assignments.push(format!("({cols}) = (SELECT {cols} FROM {source})"));
        }
        assignments.extend(absent.iter().map(|c| format!("{} = DEFAULT", c.quoted)));
        if assignments.is_empty() {
            assignments.push(format!("{k} = t.{k}"));
        }
        let update_set = assignments.join(", ");
        // The UPDATE forms bind the document only when they read from it.
        let doc_params = |rest: &[Param]| {
            let mut p = if given_non_key.is_empty() {
                vec![]
            } else {
                vec![Doc]
            };
            p.extend_from_slice(rest);
            p
        };
        let (key_at, ver_at) = if given_non_key.is_empty() {
            (1, 2)
        } else {
            (2, 3)
        };
        match pre {
            Precondition::None => WriteSql {
                sql: format!(
                    "{insert} ON CONFLICT ({k}) DO UPDATE SET {upsert_set} RETURNING {ret}, (t.xmax {EQ} 0)"
                ),
                params: vec![Doc],
            },
            Precondition::Absent => WriteSql {
                sql: format!("{insert} ON CONFLICT ({k}) DO NOTHING RETURNING {ret}, true"),
                params: vec![Doc],
            },
            Precondition::Exists => WriteSql {
                sql: format!(
                    "UPDATE {t} AS t SET {update_set} WHERE t.{k} {EQ} ${key_at}::{kt} RETURNING {ret}, false"
                ),
                params: doc_params(&[Key]),
            },
            Precondition::Versions(_) => WriteSql {
                sql: format!(
                    "UPDATE {t} AS t SET {update_set} WHERE t.{k} {EQ} ${key_at}::{kt} \
                     AND coalesce(t.{ver}, 0) {EQ} ANY(${ver_at}::int8[]) RETURNING {ret}, false"
                ),
                params: doc_params(&[Key, Versions]),
            },
        }
    }

    /// `UPDATE` that changes nothing but the version (the stamp trigger takes a fresh one)
    /// of the row keyed `$1`, returning `version, document`: how a write whose version came
    /// out lower than a cached copy is made newest again.
    pub fn restamp_sql(&self) -> String {
        format!(
            "UPDATE {table} AS t SET {key} = t.{key} WHERE t.{key} {EQ} $1::{kt} RETURNING {ret}",
            table = self.table,
            key = self.key.quoted,
            kt = self.key_sql_type(),
            ret = self.returning(),
        )
    }

    /// `version, document` of the written row.
    fn returning(&self) -> String {
        // A row not written since syncar was installed has no version yet: it is version 0,
        // older than anything syncar hands out (the install adds the column without a
        // default, so that it rewrites nothing).
        format!(
            "coalesce(t.{}, 0), {}",
            self.version.quoted,
            self.doc_expr()
        )
    }

    /// The document as canonical JSON text, as every tier stores it.
    fn doc_expr(&self) -> String {
        match self.shape {
            Shape::Kv => "t.value::text".into(),
            Shape::Table { .. } => format!(
                "(pg_catalog.to_jsonb(t.*) {MINUS} {}::text)::text",
                quote_literal(&self.version.name)
            ),
        }
    }

    fn key_sql_type(&self) -> &'static str {
        match self.key_type {
            KeyType::Text => "text",
            KeyType::Int => "int8",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TtlConfig;

    fn users() -> Resource {
        Resource::table(
            "users".into(),
            TtlConfig::default(),
            "public",
            "users",
            Column::new("id"),
            KeyType::Int,
            Column::new("version"),
            vec![Column::new("id"), Column::new("name"), Column::new("age")],
            vec!["created".into()],
        )
    }

    #[test]
    fn table_documents_take_their_key_from_the_url() {
        let r = users();
        let key = r.parse_key("7").unwrap();
        let body = JsonText::parse(br#"{"name": "ann", "version": 3, "created": "x"}"#).unwrap();
        let (doc, sql) = r.prepare_write(&key, &body, &Precondition::None).unwrap();
        let doc: Value = serde_json::from_str(&doc).unwrap();
        assert_eq!(doc, serde_json::json!({"id": 7, "name": "ann"}));
        assert!(
            sql.sql.contains(r#"("id", "name")"#),
            "only the given columns are written: {}",
            sql.sql
        );
        assert_eq!(sql.params, vec![Param::Doc]);
    }

    #[test]
    fn table_documents_are_checked_against_columns_and_key() {
        let r = users();
        let key = r.parse_key("7").unwrap();
        let err = |body: &str| {
            let body = JsonText::parse(body.as_bytes()).unwrap();
            r.prepare_write(&key, &body, &Precondition::None)
                .unwrap_err()
                .to_string()
        };
        assert!(err("[1]").contains("JSON object"));
        assert!(err(r#"{"nope": 1}"#).contains("not a column"));
        assert!(err(r#"{"id": 8}"#).contains("in the URL"));
        assert!(err(r#"{"id": [[[[8]]]]}"#).contains("in the URL"));
        assert!(r
            .parse_key("x")
            .unwrap_err()
            .to_string()
            .contains("integer keys"));
    }
}
