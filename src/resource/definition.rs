//! What a resource is: its table, key and version columns, how documents map to rows, the
//! kinds of keys, and the types its SQL is built from (conditions on a write, the prepared
//! statement, why a body does not fit). The SQL text itself is built in `sql.rs`, the ETag
//! in `etag.rs`; neither knows anything of caches.

use crate::config::TtlConfig;

use super::quote::quote_ident;

/// One resource: a table, its key and version columns, and how documents map to rows.
#[derive(Debug)]
pub struct Resource {
    /// The name in `/v1/{resource}/...`.
    pub name: String,
    /// How long each tier keeps its documents.
    pub ttl: TtlConfig,
    /// How a document maps to a row.
    pub shape: Shape,
    /// `"schema"."table"`, quoted.
    pub(super) table: String,
    /// The schema and table, unquoted (as logical decoding names them).
    pub(super) schema_name: String,
    pub(super) table_name: String,
    pub(super) key: Column,
    pub(super) key_type: KeyType,
    pub(super) version: Column,
    /// `SELECT version, document` by key.
    pub(super) get_sql: String,
    /// Which rendering of the table's rows documents are (see
    /// [`super::TableShape::epoch`]): 0 until the table's shape changes.
    pub(super) shape_epoch: i64,
}

/// How a document maps to a row.
#[derive(Debug)]
pub enum Shape {
    /// The built-in `kv`: the document is the `value` jsonb column, whatever JSON it holds.
    Kv,
    /// A configured table: the document is the row as a JSON object without the version
    /// column. `columns` are the ones a write may set; `readonly` the generated and
    /// identity-always ones, which documents show and writes silently skip.
    Table {
        columns: Vec<Column>,
        readonly: Vec<String>,
    },
}

/// A column name, raw and quoted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    /// As Postgres names it.
    pub name: String,
    /// Quoted for SQL.
    pub quoted: String,
}

/// The kind of key column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyType {
    /// text or varchar
    Text,
    /// smallint, integer or bigint
    Int,
}

/// A client's key, checked against the key column's kind, ready to bind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyParam {
    /// A key of a text column, as given.
    Text(String),
    /// A key of an integer column, parsed (`07` and `7` are one key).
    Int(i64),
}

/// A client's key that does not fit the key column (400 `invalid_key` for the client).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("resource {resource:?} has integer keys; {key:?} is not one")]
pub struct KeyError {
    /// The resource named.
    pub resource: String,
    /// The key given.
    pub key: String,
}

impl std::fmt::Display for KeyParam {
    /// The canonical text of a key: what the notify trigger sends and the caches are keyed by.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyParam::Text(s) => f.write_str(s),
            KeyParam::Int(i) => write!(f, "{i}"),
        }
    }
}

/// Conditions on a write, from `If-Match` / `If-None-Match`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Precondition {
    None,
    /// `If-Match: "N"`, or a list of ETags (`"N", "M"`): only if the current version is one
    /// of them. Only the versions of ETags that can be current are kept (see
    /// `http::request::precondition`): empty, the write never happens.
    Versions(Vec<i64>),
    /// `If-Match: *`: only if the document exists.
    Exists,
    /// `If-None-Match: *`: only if the document does not exist.
    Absent,
}

/// Why a body does not fit a resource's table (422 for the client).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// A field that is no column of the table as this catalog knows it: a mistake, or a
    /// column added since the catalog was read (the write is then retried once after the
    /// catalog is read again).
    #[error("{0:?} is not a column of resource {1:?}")]
    NotAColumn(String, String),
    /// Anything else: not an object, a key that disagrees with the URL.
    #[error("{0}")]
    Invalid(String),
}

/// A prepared write: the SQL text and which parameters it binds, in order.
#[derive(Debug)]
pub struct WriteSql {
    /// The statement, returning `version, document, inserted`.
    pub sql: String,
    /// What `$1`, `$2`... bind, in order.
    pub params: Vec<Param>,
}

/// One parameter of a [`WriteSql`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    /// The document's key, as its [`KeyParam`].
    Key,
    /// The document as JSON text.
    Doc,
    /// The versions `If-Match` names, an `int8[]`.
    Versions,
}

impl Column {
    /// The column `name`, quoted once.
    pub fn new(name: &str) -> Self {
        Column {
            name: name.to_string(),
            quoted: quote_ident(name),
        }
    }
}

impl Resource {
    /// The built-in `kv` resource on `schema.syncar_kv`.
    pub fn kv(schema: &str, ttl: TtlConfig) -> Self {
        Resource::build(
            crate::config::KV_RESOURCE.into(),
            ttl,
            Shape::Kv,
            schema,
            "syncar_kv",
            Column::new("key"),
            KeyType::Text,
            Column::new("version"),
        )
    }

    /// A configured table. `columns` are the writable columns, key included; `readonly` the
    /// generated and identity-always ones.
    #[allow(clippy::too_many_arguments)] // each is one fact from the catalog
    pub fn table(
        name: String,
        ttl: TtlConfig,
        schema: &str,
        table: &str,
        key: Column,
        key_type: KeyType,
        version: Column,
        columns: Vec<Column>,
        readonly: Vec<String>,
    ) -> Self {
        Resource::build(
            name,
            ttl,
            Shape::Table { columns, readonly },
            schema,
            table,
            key,
            key_type,
            version,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        name: String,
        ttl: TtlConfig,
        shape: Shape,
        schema: &str,
        table: &str,
        key: Column,
        key_type: KeyType,
        version: Column,
    ) -> Self {
        let mut r = Resource {
            name,
            ttl,
            shape,
            table: format!("{}.{}", quote_ident(schema), quote_ident(table)),
            schema_name: schema.to_string(),
            table_name: table.to_string(),
            key,
            key_type,
            version,
            get_sql: String::new(),
            shape_epoch: 0,
        };
        // Built once: every read of a document by key runs it.
        r.get_sql = r.select_by_key_sql();
        r
    }

    /// Checks a client's key against the key column's kind.
    ///
    /// # Errors
    /// [`KeyError`] (for the client) when an integer key is not an integer.
    pub fn parse_key(&self, key: &str) -> Result<KeyParam, KeyError> {
        match self.key_type {
            KeyType::Text => Ok(KeyParam::Text(key.to_string())),
            KeyType::Int => key.parse::<i64>().map(KeyParam::Int).map_err(|_| KeyError {
                resource: self.name.clone(),
                key: key.to_string(),
            }),
        }
    }

    /// `"schema"."table"`, quoted.
    pub fn qualified_table(&self) -> &str {
        &self.table
    }

    /// The key column's name.
    pub fn key_column(&self) -> &str {
        &self.key.name
    }

    /// The version column's name.
    pub fn version_column(&self) -> &str {
        &self.version.name
    }

    /// `SELECT version, document` by key (`$1`).
    pub fn get_sql(&self) -> &str {
        &self.get_sql
    }
}
