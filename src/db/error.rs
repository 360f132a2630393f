//! The one place a Postgres error gets its meaning for clients: [`DbError`], what
//! [`classify`] makes of a `tokio_postgres::Error` by its SQLSTATE, and whether a connection
//! died under a statement. Decides nothing about retrying; callers do.

use tokio_postgres::error::SqlState;

/// A failed Postgres call, classified for the client. Cloneable, so one load's error can be
/// shared by every reader waiting on it.
#[derive(Clone, Debug, thiserror::Error)]
pub enum DbError {
    /// Postgres cannot be reached or is overloaded: retry later (503).
    #[error("postgres unavailable: {0}")]
    Unavailable(String),
    /// The document does not fit the table: wrong type, constraint, bad value (422).
    #[error("{0}")]
    Rejected(String),
    /// Another row already holds a unique value this document has (409).
    #[error("{0}")]
    Conflict(String),
    /// The table changed under the resource: a column or the table named by syncar's SQL is
    /// gone, or a type no longer fits (503 after one retry on the catalog read again).
    #[error("the table changed under syncar: {0}")]
    SchemaChanged(String),
    /// The body names a field that is no column of the table as the catalog knows it (422
    /// after one retry on the catalog read again: the column may be new).
    #[error("{0}")]
    UnknownColumn(String),
    /// A write asked to wait for every instance, and the relay is not a synchronous
    /// standby (see [`crate::db::relay_waited_for`]); rolled back (503 `not_synchronous`).
    #[error("{0}")]
    NotSynchronous(String),
    /// Anything else: a bug (500).
    #[error("postgres error: {0}")]
    Internal(String),
}

/// The schema read, or a change of shape announced, through the pool failed
/// ([`crate::db::Db::table_shapes`], `announce_shape_changes`, `load_catalog`).
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// No pooled connection, or its transaction failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The schema could not be read, or is no longer migrated.
    #[error(transparent)]
    Schema(#[from] crate::schema::SchemaError),
}

/// The one place a Postgres error gets its meaning for clients, by its SQLSTATE (a code,
/// or its class where every code of the class means the same here).
pub fn classify(e: tokio_postgres::Error) -> DbError {
    let class = |c: &str| {
        metrics::counter!(crate::telemetry::POSTGRES_ERRORS, "class" => c.to_string()).increment(1)
    };
    let Some(db) = e.as_db_error() else {
        class("unavailable");
        return DbError::Unavailable(e.to_string());
    };
    let code = db.code();
    let sqlstate = code.code();
    let reason = match db.detail() {
        Some(detail) => format!("{} ({detail})", db.message()),
        None => db.message().to_string(),
    };
    if [
        SqlState::UNDEFINED_COLUMN,
        SqlState::UNDEFINED_TABLE,
        SqlState::UNDEFINED_FUNCTION,
        SqlState::DATATYPE_MISMATCH,
        SqlState::UNDEFINED_FILE,
    ]
    .contains(code)
    {
        // 42703, 42P01, 42883, 42804: syncar's SQL names what the catalog said, and the
        // table no longer has it (a column renamed or dropped, the table renamed, a type
        // changed so that an operator or cast is gone). 58P01: a trigger's library does not
        // load (the C stamp on a server without it), which the recheck mends.
        class("schema_changed");
        DbError::SchemaChanged(format!("{reason} [{sqlstate}]"))
    } else if [
        SqlState::INVALID_SQL_STATEMENT_NAME,
        SqlState::DUPLICATE_PSTATEMENT,
    ]
    .contains(code)
        || (*code == SqlState::PROTOCOL_VIOLATION && db.routine() == Some("exec_bind_message"))
    {
        // 26000 "prepared statement sN does not exist", 42P05 "already exists", 08P01 from
        // binding ("bind message supplies 2 parameters, but prepared statement requires 1";
        // told by the server's routine, which is never translated): syncar's statements
        // met a session that is not the one they were prepared on. syncar runs no SQL-level
        // PREPARE or DEALLOCATE of its own.
        class("pooler");
        DbError::Unavailable(format!("{reason} [{sqlstate}]: {}", super::POOLER_HINT))
    } else if *code == SqlState::UNIQUE_VIOLATION {
        class("rejected");
        DbError::Conflict(reason)
    } else if *code == SqlState::STATEMENT_TOO_COMPLEX {
        // 54001 "stack depth limit exceeded": a document nested deeper than Postgres' parser
        // goes (its limit is max_stack_depth); nothing syncar could serve back either.
        class("rejected");
        DbError::Rejected(format!(
            "{reason}: the document nests deeper than Postgres accepts (its max_stack_depth \
             setting bounds the depth; about 10 000 levels at the default 2MB)"
        ))
    } else {
        match SqlClass::of(code) {
            SqlClass::DataException | SqlClass::IntegrityConstraintViolation => {
                class("rejected");
                DbError::Rejected(reason)
            }
            SqlClass::ConnectionException
            | SqlClass::InsufficientResources
            | SqlClass::OperatorIntervention
            | SqlClass::TransactionRollback => {
                class("unavailable");
                DbError::Unavailable(reason)
            }
            SqlClass::Other => {
                class("internal");
                DbError::Internal(format!("{reason} [{sqlstate}]"))
            }
        }
    }
}

impl DbError {
    /// Whether the failure may come from a table that changed since the catalog was read:
    /// worth one retry once the catalog has been read again.
    pub fn may_be_schema_change(&self) -> bool {
        matches!(self, DbError::SchemaChanged(_) | DbError::UnknownColumn(_))
    }
}

impl From<crate::resource::BodyError> for DbError {
    fn from(e: crate::resource::BodyError) -> Self {
        match e {
            crate::resource::BodyError::NotAColumn(..) => DbError::UnknownColumn(e.to_string()),
            crate::resource::BodyError::Invalid(m) => DbError::Rejected(m),
        }
    }
}

/// Whether `e` says the connection itself is gone (closed, reset, the backend terminated or
/// shutting down), as opposed to the statement failing.
pub(super) fn connection_lost(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.as_db_error() {
        // 57P01 admin_shutdown, 57P02 crash_shutdown, 57P03 cannot_connect_now; 08xxx
        // connection exceptions.
        Some(db) => {
            let code = db.code();
            [
                SqlState::ADMIN_SHUTDOWN,
                SqlState::CRASH_SHUTDOWN,
                SqlState::CANNOT_CONNECT_NOW,
            ]
            .contains(code)
                || SqlClass::of(code) == SqlClass::ConnectionException
        }
        // No server error at all: the socket failed.
        None => true,
    }
}

/// The classes of SQLSTATE codes syncar tells apart (Postgres docs, Appendix A, "PostgreSQL
/// Error Codes"): a code's class is its first two characters, by the SQL standard, and
/// every code of these classes means the same to a client. `tokio_postgres` names codes,
/// not classes, so this is the one place a code is read as text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SqlClass {
    /// 08: the connection failed or is gone.
    ConnectionException,
    /// 22: a value does not fit its type or domain.
    DataException,
    /// 23: a constraint refused the row.
    IntegrityConstraintViolation,
    /// 40: a serialization failure or a deadlock; the transaction was rolled back.
    TransactionRollback,
    /// 53: out of disk, memory or connections.
    InsufficientResources,
    /// 57: the server is shutting down, or cancelled the statement.
    OperatorIntervention,
    /// Every other class.
    Other,
}

impl SqlClass {
    fn of(code: &SqlState) -> SqlClass {
        match code.code().get(..2) {
            Some("08") => SqlClass::ConnectionException,
            Some("22") => SqlClass::DataException,
            Some("23") => SqlClass::IntegrityConstraintViolation,
            Some("40") => SqlClass::TransactionRollback,
            Some("53") => SqlClass::InsufficientResources,
            Some("57") => SqlClass::OperatorIntervention,
            _ => SqlClass::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio_postgres::error::SqlState;

    use super::SqlClass;

    #[test]
    fn a_code_is_read_by_its_class() {
        for (code, class) in [
            (SqlState::CONNECTION_FAILURE, SqlClass::ConnectionException),
            (
                SqlState::INVALID_TEXT_REPRESENTATION,
                SqlClass::DataException,
            ),
            (
                SqlState::NOT_NULL_VIOLATION,
                SqlClass::IntegrityConstraintViolation,
            ),
            (
                SqlState::T_R_DEADLOCK_DETECTED,
                SqlClass::TransactionRollback,
            ),
            (
                SqlState::TOO_MANY_CONNECTIONS,
                SqlClass::InsufficientResources,
            ),
            (SqlState::QUERY_CANCELED, SqlClass::OperatorIntervention),
            (SqlState::UNDEFINED_COLUMN, SqlClass::Other),
        ] {
            assert_eq!(SqlClass::of(&code), class, "{}", code.code());
        }
    }
}
