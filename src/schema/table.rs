//! Tables as the catalog describes them: columns, the key's index, the replica identity.
//! Reads the catalog; changes nothing.

use tokio_postgres::GenericClient;

use super::error::SchemaError;
use crate::config::ResourceConfig;
use crate::resource::{quote_ident, KeyType};

/// A table as the catalog describes it.
pub(super) struct TableInfo {
    pub(super) oid: u32,
    pub(super) columns: Vec<ColumnInfo>,
    /// Whether the key column has a unique index of its own (ON CONFLICT needs one).
    pub(super) unique_key: bool,
    /// What logical decoding sends of an old row (the `wal` source).
    pub(super) identity: Identity,
}

/// Whether index `i` of table `c` (`pg_index i`, `pg_class c`) is the replica identity's:
/// the primary key by default, if immediate (Postgres uses no DEFERRABLE one), or the index
/// named by REPLICA IDENTITY USING INDEX. Shared by the catalog and `schema::republish`.
pub(super) const IDENTITY_INDEX: &str = "((c.relreplident = 'd' AND i.indisprimary \
     AND i.indimmediate) OR (c.relreplident = 'i' AND i.indisreplident))";

/// A table's replica identity, as far as the `wal` source cares (Postgres docs, `ALTER TABLE
/// ... REPLICA IDENTITY`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Identity {
    /// None (no primary key, or `NOTHING`): a table in a publication then refuses UPDATE
    /// and DELETE, so the `wal` source cannot publish it.
    Missing,
    /// The old key reaches the WAL when it changes.
    IncludesKey,
    /// An identity without the key column: a moved key must be announced by a trigger.
    ExcludesKey,
}

pub(super) struct ColumnInfo {
    /// The attribute number: fixed for the column's life, whatever it is renamed to.
    pub(super) num: i16,
    pub(super) name: String,
    pub(super) type_oid: u32,
    pub(super) type_name: String,
    /// Generated or identity-always: shown in documents, never written.
    pub(super) readonly: bool,
}

const TEXT_OID: u32 = 25;
const VARCHAR_OID: u32 = 1043;
const INT2_OID: u32 = 21;
const INT4_OID: u32 = 23;
pub(super) const INT8_OID: u32 = 20;

/// Checks the key column: a supported type with a unique index of its own.
pub(super) fn key_column(info: &TableInfo, r: &ResourceConfig) -> Result<KeyType, SchemaError> {
    let Some(col) = info.columns.iter().find(|c| c.name == r.key) else {
        return Err(SchemaError::Invalid(format!(
            "resource {:?}: table {}.{} has no column {:?}",
            r.name, r.schema, r.table, r.key
        )));
    };
    let key_type = match col.type_oid {
        TEXT_OID | VARCHAR_OID => KeyType::Text,
        INT2_OID | INT4_OID | INT8_OID => KeyType::Int,
        _ => {
            return Err(SchemaError::Invalid(format!(
                "resource {:?}: key column {:?} is {}; supported are text, varchar, smallint, integer and bigint",
                r.name, r.key, col.type_name
            )))
        }
    };
    if !info.unique_key {
        // What to run, spelled out: the table is the user's, so syncar's migration does not
        // add the index itself.
        let table = format!("{}.{}", quote_ident(&r.schema), quote_ident(&r.table));
        let key = quote_ident(&r.key);
        return Err(SchemaError::Invalid(format!(
            "resource {:?}: key column {:?} of {}.{} has no unique index of its own (a primary \
             key or unique index on that column alone, without a WHERE), which every write \
             needs (with the wal source, a table without a primary key also needs a replica \
             identity: ALTER TABLE {table} REPLICA IDENTITY FULL): add one, e.g. ALTER TABLE \
             {table} ADD PRIMARY KEY ({key}), or on a table in use CREATE UNIQUE INDEX \
             CONCURRENTLY ON {table} ({key})",
            r.name, r.key, r.schema, r.table
        )));
    }
    Ok(key_type)
}

/// Whether `r`'s table can serve as a resource: it exists, is not partitioned, its key
/// column fits ([`key_column`]) and its version column, if present, is bigint (migrate adds
/// a missing one). Each failure is [`SchemaError::Invalid`], naming the resource: a problem of
/// this one resource, which the others do not share.
///
/// # Errors
/// [`SchemaError::Invalid`] as above; [`SchemaError::Postgres`] when a lookup fails.
pub(super) async fn fit(
    client: &impl GenericClient,
    r: &ResourceConfig,
) -> Result<(TableInfo, KeyType), SchemaError> {
    let info = describe_table(client, r).await?;
    if let Some(c) = info.columns.iter().find(|c| c.name == r.version_column) {
        if c.type_oid != INT8_OID {
            return Err(SchemaError::Invalid(format!(
                "resource {:?}: column {:?} of table {}.{} is {}, but a version column must be bigint",
                r.name, r.version_column, r.schema, r.table, c.type_name
            )));
        }
    }
    let key_type = key_column(&info, r)?;
    Ok((info, key_type))
}

pub(super) async fn table_oid(
    client: &impl GenericClient,
    schema: &str,
    name: &str,
    kind: &str,
) -> Result<Option<u32>, SchemaError> {
    let row = client
        .query_opt(
            "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind::text = ANY(string_to_array($3, ','))",
            &[&schema, &name, &kind.replace('r', "r,p")],
        )
        .await
        .map_err(|source| SchemaError::Postgres {
            doing: "looking up tables",
            source,
        })?;
    Ok(row.map(|r| r.get(0)))
}

pub(super) async fn describe_table(
    client: &impl GenericClient,
    r: &ResourceConfig,
) -> Result<TableInfo, SchemaError> {
    let pg = |source| SchemaError::Postgres {
        doing: "describing a table",
        source,
    };
    let Some(oid) = table_oid(client, &r.schema, &r.table, "r").await? else {
        return Err(SchemaError::Invalid(format!(
            "resource {:?}: table {}.{} does not exist",
            r.name, r.schema, r.table
        )));
    };
    // Changes are logged by statement-level triggers, which Postgres fires only on the table
    // a statement names: writes naming a partition would bypass its parent's, and writes
    // naming the parent its partitions'. Refused rather than half-covered.
    let kind = client
        .query_one(
            "SELECT relkind::text = 'p' OR relispartition, relpersistence::text, \
                    EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhparent = c.oid), \
                    pg_catalog.row_security_active(c.oid) \
             FROM pg_class c WHERE c.oid = $1",
            &[&oid],
        )
        .await
        .map_err(pg)?;
    if kind.get::<_, bool>(0) {
        return Err(SchemaError::Invalid(format!(
            "resource {:?}: table {}.{} is partitioned or a partition, which syncar does not \
             support yet (a write naming a partition would not be logged)",
            r.name, r.schema, r.table
        )));
    }
    // A table with inheritance children (`CREATE TABLE ... INHERITS`) returns their rows to a
    // read that names it, while their writes fire none of the triggers syncar installs on it
    // and are not in its publication: a copy of a child's row would never be evicted.
    if kind.get::<_, bool>(2) {
        return Err(SchemaError::Invalid(format!(
            "resource {:?}: table {}.{} has inheritance children (CREATE TABLE ... INHERITS): \
             a read of it returns their rows too, but their writes fire none of syncar's \
             triggers on it and are not relayed, so no cached copy of them could be trusted; \
             served once it has none (ALTER TABLE <child> NO INHERIT {}.{})",
            r.name, r.schema, r.table, r.schema, r.table
        )));
    }
    // Row-level security that applies to this role filters what it reads: a cached copy,
    // or a 404, would be this role's view of the table, served to every reader (Redis is
    // shared with instances whose roles may see every row).
    if kind.get::<_, bool>(3) {
        return Err(SchemaError::Invalid(format!(
            "resource {:?}: row-level security filters what this instance's role reads of \
             table {}.{}, so what it cached would be that role's view of the table, not the \
             table; served once it does not (a role with BYPASSRLS, the table's owner without \
             FORCE ROW LEVEL SECURITY, or ALTER TABLE {}.{} DISABLE ROW LEVEL SECURITY)",
            r.name, r.schema, r.table, r.schema, r.table
        )));
    }
    // An unlogged table is emptied by crash recovery and is empty on a promoted standby,
    // with no trigger firing: every cached copy would outlive its row. Postgres refuses to
    // publish one (the `wal` source could not relay it either); Debezium cannot capture it.
    if kind.get::<_, String>(1) != "p" {
        return Err(SchemaError::Invalid(format!(
            "resource {:?}: table {}.{} is UNLOGGED (or temporary): a crash or a failover \
             empties it without any trigger firing, so no cached copy of its rows could be \
             trusted; served once it is logged (ALTER TABLE {}.{} SET LOGGED; syncar then \
             installs on it where it never did, with postgres.migrate_on_start, else run \
             `syncar migrate`)",
            r.name, r.schema, r.table, r.schema, r.table
        )));
    }
    let rows = client
        .query(
            "SELECT a.attnum, a.attname::text, a.atttypid, format_type(a.atttypid, a.atttypmod), \
                    (a.attgenerated::text <> '' OR a.attidentity::text = 'a') \
             FROM pg_attribute a WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .map_err(pg)?;
    let columns: Vec<ColumnInfo> = rows
        .iter()
        .map(|row| ColumnInfo {
            num: row.get(0),
            name: row.get(1),
            type_oid: row.get(2),
            type_name: row.get(3),
            readonly: row.get(4),
        })
        .collect();
    let key_num = columns.iter().find(|c| c.name == r.key).map(|c| c.num);
    let unique_key = match key_num {
        Some(num) => client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = $1 AND i.indisunique \
                 AND i.indimmediate AND i.indisvalid \
                 AND i.indnkeyatts = 1 AND i.indkey[0] = $2 AND i.indpred IS NULL AND i.indexprs IS NULL)",
                &[&oid, &num],
            )
            .await
            .map_err(pg)?
            .get(0),
        None => false,
    };
    // The replica identity's index (the primary key by default, or the one named by
    // REPLICA IDENTITY USING INDEX), and its columns. A DEFERRABLE primary key is none:
    // Postgres uses only an immediate one (and ON CONFLICT refuses a deferrable index as its
    // arbiter, hence `indimmediate` on the key's index above too).
    let row = client
        .query_one(
            &format!(
            "SELECT c.relreplident::text, \
                    (SELECT pg_catalog.array_agg(a.attname::text ORDER BY a.attnum) FROM pg_index i \
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey::int2[]) \
                     WHERE i.indrelid = c.oid AND {IDENTITY_INDEX}) \
             FROM pg_class c WHERE c.oid = $1"
            ),
            &[&oid],
        )
        .await
        .map_err(pg)?;
    let (kind, index_columns): (String, Option<Vec<String>>) = (row.get(0), row.get(1));
    let identity = match (kind.as_str(), index_columns) {
        ("f", _) => Identity::IncludesKey,
        ("d" | "i", Some(cols)) if cols.contains(&r.key) => Identity::IncludesKey,
        ("d" | "i", Some(_)) => Identity::ExcludesKey,
        _ => Identity::Missing,
    };
    Ok(TableInfo {
        oid,
        columns,
        unique_key,
        identity,
    })
}
