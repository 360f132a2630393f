//! Resources: what a `/v1/{resource}/...` name maps to in Postgres, and the SQL that reads and
//! writes its documents. Identifiers come only from the configuration and the catalog and are
//! always quoted; keys and bodies are always bind parameters. Runs no query itself.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde_json::value::RawValue;
use serde_json::Value;

use crate::config::{PostgresSource, TtlConfig};
use crate::locks::{MutexExt, RwLockExt};
use crate::model::{CacheKey, JsonText};

/// The resources this instance serves, resolved against the live schema.
#[derive(Debug, Default)]
pub struct Catalog {
    resources: HashMap<String, Arc<Resource>>,
    /// How changes are captured, as the schema was migrated for.
    pub capture: Capture,
    /// Configured resources left out, by name, with why (their table does not exist or does
    /// not fit): requests to them answer 503 `resource_unavailable` with the reason.
    unavailable: HashMap<String, String>,
    /// Each configured resource's table fingerprint when this catalog was read (see
    /// `schema::shape`): a live one that differs means the table changed since.
    pub shapes: Shapes,
}

/// A table's shape as syncar knows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableShape {
    /// The live fingerprint, an md5 in hex; `None` when the table does not exist.
    pub fingerprint: Option<String>,
    /// The version at which the shape documents are now rendered in was announced (the state
    /// table's `shape_epoch:{resource}`); 0 for the shape syncar was installed on. It tells
    /// two renderings of one row version apart in ETags.
    pub epoch: i64,
}

/// Each configured resource's [`TableShape`], by resource name.
pub type Shapes = HashMap<String, TableShape>;

/// The Postgres source the schema serves, resolved from `feeds.postgres_source` against the
/// server (`auto` becomes `wal` or `changes_log`), and the names the `wal` source uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capture {
    /// Never [`PostgresSource::Auto`].
    pub source: PostgresSource,
    /// Why this source, for the log and `/readyz`.
    pub reason: String,
    /// The replication slot (`wal` only).
    pub slot: String,
    /// The publication (`wal` only).
    pub publication: String,
}

impl Default for Capture {
    fn default() -> Self {
        Capture {
            source: PostgresSource::ChangesLog,
            reason: "configured".into(),
            slot: String::new(),
            publication: String::new(),
        }
    }
}

impl Catalog {
    pub fn new(resources: impl IntoIterator<Item = Resource>) -> Self {
        Catalog {
            resources: resources
                .into_iter()
                .map(|r| (r.name.clone(), Arc::new(r)))
                .collect(),
            capture: Capture::default(),
            unavailable: HashMap::new(),
            shapes: HashMap::new(),
        }
    }

    /// The same catalog, read when the tables had `shapes`.
    pub fn with_shapes(mut self, shapes: Shapes) -> Self {
        self.shapes = shapes;
        self
    }

    /// Whether `name` is a configured resource, served or left out.
    pub fn knows(&self, name: &str) -> bool {
        self.resources.contains_key(name) || self.unavailable.contains_key(name)
    }

    /// The same catalog, with `unavailable` (name, reason) left out.
    pub fn with_unavailable(mut self, unavailable: Vec<(String, String)>) -> Self {
        self.unavailable.extend(unavailable);
        self
    }

    /// Why the configured resource `name` is left out, if it is.
    pub fn unavailable(&self, name: &str) -> Option<&str> {
        self.unavailable.get(name).map(String::as_str)
    }

    /// Every resource's name, left-out ones included: what a reset of every generation must
    /// cover (a left-out resource's Redis entries outlive its absence).
    pub fn all_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .resources
            .keys()
            .chain(self.unavailable.keys())
            .cloned()
            .collect();
        names.sort_unstable();
        names
    }

    /// Every configured resource left out, with why, sorted by name.
    pub fn all_unavailable(&self) -> Vec<(&str, &str)> {
        let mut all: Vec<_> = self
            .unavailable
            .iter()
            .map(|(n, r)| (n.as_str(), r.as_str()))
            .collect();
        all.sort_unstable();
        all
    }

    /// The same catalog, captured as `capture` says.
    pub fn with_capture(mut self, capture: Capture) -> Self {
        self.capture = capture;
        self
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Resource>> {
        self.resources.get(name)
    }

    /// Every resource.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Resource>> {
        self.resources.values()
    }

    /// The resource stored in `schema.table`, if any.
    pub fn by_table(&self, schema: &str, table: &str) -> Option<&Arc<Resource>> {
        self.resources
            .values()
            .find(|r| r.schema_name == schema && r.table_name == table)
    }
}

/// The catalog once the schema task has migrated and loaded it; until then, why not. A
/// table whose shape changed makes the schema task load it again and [`CatalogCell::replace`]
/// it; requests that began before keep the one they took.
///
/// # Concurrency
/// Read on every request under a read lock held for one `Arc` clone; replaced rarely.
#[derive(Debug)]
pub struct CatalogCell {
    catalog: RwLock<Option<Arc<Catalog>>>,
    /// Why the catalog is not loaded yet, for `/readyz` and 503s.
    not_ready: Mutex<String>,
    /// Wakes the schema task to compare the tables' live shapes with the catalog's.
    recheck: tokio::sync::Notify,
    /// Recheck requests made so far, and the last one a finished check covered.
    requested: AtomicU64,
    rechecked: tokio::sync::watch::Sender<u64>,
}

/// The catalog is not loaded yet: Postgres is unreachable, the schema is not migrated, or a
/// configured table does not fit. Callers answer 503 `starting` with the reason.
#[derive(Clone, Debug, thiserror::Error)]
#[error("not ready: {0}")]
pub struct NotReady(pub String);

impl CatalogCell {
    /// Empty, not ready for `reason`.
    pub fn new(reason: &str) -> Self {
        CatalogCell {
            catalog: RwLock::new(None),
            not_ready: Mutex::new(reason.to_string()),
            recheck: tokio::sync::Notify::new(),
            requested: AtomicU64::new(0),
            rechecked: tokio::sync::watch::channel(0).0,
        }
    }

    /// The resources, once loaded.
    ///
    /// # Errors
    /// [`NotReady`] with the last reason they are not.
    pub fn get(&self) -> Result<Arc<Catalog>, NotReady> {
        match &*self.catalog.read_locked() {
            Some(c) => Ok(c.clone()),
            None => Err(NotReady(self.not_ready.locked().clone())),
        }
    }

    /// Whether the catalog is loaded.
    pub fn is_loaded(&self) -> bool {
        self.catalog.read_locked().is_some()
    }

    /// Publishes the first loaded catalog; later calls change nothing (see
    /// [`CatalogCell::replace`]).
    pub fn set(&self, catalog: Catalog) {
        let mut slot = self.catalog.write_locked();
        if slot.is_none() {
            *slot = Some(Arc::new(catalog));
        }
    }

    /// Publishes a catalog read again after a table changed.
    pub fn replace(&self, catalog: Catalog) {
        *self.catalog.write_locked() = Some(Arc::new(catalog));
    }

    /// Records why the catalog could not be loaded yet.
    pub fn not_ready(&self, reason: String) {
        *self.not_ready.locked() = reason;
    }

    /// Asks the schema task to compare the tables' shapes with the catalog's (a flush was
    /// heard, or a statement found a column missing). Requests made while one check runs are
    /// folded into the next. Returns the request's number.
    pub fn request_recheck(&self) -> u64 {
        let n = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        self.recheck.notify_one();
        n
    }

    /// Waits for a recheck request (the schema task).
    pub async fn recheck_requested(&self) {
        self.recheck.notified().await;
    }

    /// The number of the last recheck request made so far: what a check that reads the
    /// tables from now on covers.
    pub fn requests_made(&self) -> u64 {
        self.requested.load(Ordering::SeqCst)
    }

    /// Records that the check covering requests up to `covered` ran (the schema task),
    /// waking [`CatalogCell::recheck_and_wait`].
    pub fn rechecked(&self, covered: u64) {
        self.rechecked.send_modify(|n| *n = (*n).max(covered));
    }

    /// Requests a recheck and waits, at most `limit`, until a check that read the tables
    /// after this call has run. Returns whether one did.
    pub async fn recheck_and_wait(&self, limit: std::time::Duration) -> bool {
        let mut done = self.rechecked.subscribe();
        let wanted = self.request_recheck();
        tokio::time::timeout(limit, done.wait_for(|n| *n >= wanted))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// One document of one resource, as a request names it: what routing resolves once and every
/// tier uses (the SQL binds `key`, the caches use `ck`).
#[derive(Clone, Debug)]
pub struct DocRef {
    pub resource: Arc<Resource>,
    /// The key as the bind parameter of the key column's type.
    pub key: KeyParam,
    /// `resource:key`, from the parsed key: `07` and `7` name one row, so one cache entry.
    pub ck: CacheKey,
}

impl DocRef {
    /// The document `key` (already percent-decoded) of `resource`.
    ///
    /// # Errors
    /// A message for the client when the key does not fit the key column (an integer key
    /// that is not an integer).
    pub fn new(resource: &Arc<Resource>, key: &str) -> Result<DocRef, String> {
        let param = resource.parse_key(key)?;
        let ck = match &param {
            KeyParam::Text(text) => CacheKey::new(&resource.name, text),
            KeyParam::Int(_) => CacheKey::new(&resource.name, &param.to_string()),
        };
        Ok(DocRef {
            resource: resource.clone(),
            key: param,
            ck,
        })
    }
}

/// One resource: a table, its key and version columns, and how documents map to rows.
#[derive(Debug)]
pub struct Resource {
    pub name: String,
    pub ttl: TtlConfig,
    pub shape: Shape,
    /// `"schema"."table"`, quoted.
    table: String,
    /// The schema and table, unquoted (as logical decoding names them).
    schema_name: String,
    table_name: String,
    key: Column,
    key_type: KeyType,
    version: Column,
    /// `SELECT version, document` by key.
    get_sql: String,
    /// Which rendering of the table's rows documents are (see
    /// [`TableShape::epoch`]): 0 until the table's shape changes.
    shape_epoch: i64,
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
    pub name: String,
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
    Text(String),
    Int(i64),
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
    pub sql: String,
    pub params: Vec<Param>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    Key,
    Doc,
    /// The versions `If-Match` names, an `int8[]`.
    Versions,
}

impl Column {
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
        r.get_sql = format!(
            "SELECT coalesce(t.{ver}, 0), {doc} FROM {table} AS t WHERE t.{key} = $1::{kt}",
            ver = r.version.quoted,
            doc = r.doc_expr(),
            table = r.table,
            key = r.key.quoted,
            kt = r.key_sql_type(),
        );
        r
    }

    /// The same resource, its documents rendered in the shape announced at `epoch`.
    pub fn with_shape_epoch(mut self, epoch: i64) -> Self {
        self.shape_epoch = epoch;
        self
    }

    /// The ETag of this resource's document at `version`, as a header value without its
    /// quotes: the version alone while the table has the shape syncar was installed on,
    /// `{version}-{epoch}` once it changed shape, so that one ETag never names two renderings
    /// of one row version (a column added changes every document, not any version).
    pub fn etag(&self, version: i64) -> String {
        match self.shape_epoch {
            0 => version.to_string(),
            epoch => format!("{version}-{epoch}"),
        }
    }

    /// Which rendering of the table's rows this resource serves (0: the original).
    pub fn shape_epoch(&self) -> i64 {
        self.shape_epoch
    }

    /// Checks a client's key against the key column's kind.
    ///
    /// # Errors
    /// A message for the client when an integer key is not an integer.
    pub fn parse_key(&self, key: &str) -> Result<KeyParam, String> {
        match self.key_type {
            KeyType::Text => Ok(KeyParam::Text(key.to_string())),
            KeyType::Int => key.parse::<i64>().map(KeyParam::Int).map_err(|_| {
                format!(
                    "resource {:?} has integer keys; {key:?} is not one",
                    self.name
                )
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

    /// `SELECT key as text, version, document` of every key in `$1` (an array of the key
    /// column's type): the one query of a batch get.
    pub fn get_many_sql(&self) -> String {
        format!(
            "SELECT t.{key}::text, {ret} FROM {table} AS t WHERE t.{key} = ANY($1::{kt}[])",
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
            "DELETE FROM {table} AS t WHERE t.{key} = $1::{kt}",
            table = self.table,
            key = self.key.quoted,
            kt = self.key_sql_type(),
        );
        if if_version {
            sql.push_str(&format!(
                " AND coalesce(t.{}, 0) = ANY($2::int8[])",
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
                     ON CONFLICT ({k}) DO UPDATE SET value = EXCLUDED.value RETURNING {ret}, (t.xmax = 0)"
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
                    "UPDATE {t} AS t SET value = $2::text::jsonb WHERE t.{k} = $1::{kt} RETURNING {ret}, false"
                ),
                params: vec![Key, Doc],
            },
            Precondition::Versions(_) => WriteSql {
                sql: format!(
                    "UPDATE {t} AS t SET value = $2::text::jsonb WHERE t.{k} = $1::{kt} \
                     AND coalesce(t.{ver}, 0) = ANY($3::int8[]) RETURNING {ret}, false"
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
        let source = format!("jsonb_populate_record(NULL::{t}, $1::text::jsonb)");
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
                    "{insert} ON CONFLICT ({k}) DO UPDATE SET {upsert_set} RETURNING {ret}, (t.xmax = 0)"
                ),
                params: vec![Doc],
            },
            Precondition::Absent => WriteSql {
                sql: format!("{insert} ON CONFLICT ({k}) DO NOTHING RETURNING {ret}, true"),
                params: vec![Doc],
            },
            Precondition::Exists => WriteSql {
                sql: format!(
                    "UPDATE {t} AS t SET {update_set} WHERE t.{k} = ${key_at}::{kt} RETURNING {ret}, false"
                ),
                params: doc_params(&[Key]),
            },
            Precondition::Versions(_) => WriteSql {
                sql: format!(
                    "UPDATE {t} AS t SET {update_set} WHERE t.{k} = ${key_at}::{kt} \
                     AND coalesce(t.{ver}, 0) = ANY(${ver_at}::int8[]) RETURNING {ret}, false"
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
            "UPDATE {table} AS t SET {key} = t.{key} WHERE t.{key} = $1::{kt} RETURNING {ret}",
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
                "(to_jsonb(t.*) - {})::text",
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

fn join(items: impl Iterator<Item = String>) -> String {
    items.collect::<Vec<_>>().join(", ")
}

/// A Postgres identifier, quoted: `a"b` becomes `"a""b"`.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A Postgres string literal (standard_conforming_strings on): `it's` becomes `'it''s'`.
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn identifiers_and_literals_are_quoted() {
        assert_eq!(quote_ident(r#"we"ird"#), r#""we""ird""#);
        assert_eq!(quote_literal("it's"), "'it''s'");
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
        assert!(r.parse_key("x").unwrap_err().contains("integer keys"));
    }
}
