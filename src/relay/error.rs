//! Why a relay term ended: the one error type of the relay's boundary, logged (scrubbed)
//! by the election loop before it retries. Knows nothing of what the loop does about it.

use pgwire_replication::PgWireError;

use crate::db::DbError;
use crate::l2::L2Error;
use crate::resource::NotReady;
use crate::schema::SchemaError;
use crate::tls::TlsError;

use super::pgoutput::DecodeError;

/// A guard's failure, boxed: whatever error type the tiers' guards report.
type GuardError = Box<dyn std::error::Error + Send + Sync>;

/// Why a relay term ended (anything but a shutdown). Every variant keeps its cause as its
/// `source`; `telemetry::error_chain` gives the whole story for the log.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The plain Postgres connection (checks, versions, heartbeats) could not be opened.
    #[error("connecting to postgres failed")]
    Connect(#[source] DbError),
    /// A query of syncar's state, the slot or the replication views failed.
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// One of the relay's own statements failed (`doing` says which).
    #[error("{doing} failed")]
    Postgres {
        doing: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    /// A Redis command failed (`doing` says which).
    #[error("{doing} failed")]
    Redis {
        doing: &'static str,
        #[source]
        source: L2Error,
    },
    /// The schema records another source (a migration ran since, or `syncar uninstall`):
    /// a slot created now would retain WAL for nobody.
    #[error("the schema is migrated for postgres_source {0:?}, not wal: not relaying")]
    NotWal(Option<String>),
    /// Redis could not be shown to hold nothing older than it should.
    #[error("securing redis failed")]
    SecureRedis(#[source] GuardError),
    /// Postgres could not be shown not to have gone back in time.
    #[error("securing postgres failed")]
    SecurePostgres(#[source] GuardError),
    /// The replication URL's TLS settings cannot be used.
    #[error("the postgres url's tls settings cannot be used")]
    UrlTls(#[source] TlsError),
    /// The replication URL does not parse.
    #[error("the postgres url does not parse")]
    Url(#[source] tokio_postgres::Error),
    /// The replication connection failed (`doing` says at which step).
    #[error("{doing} failed")]
    Replication {
        doing: &'static str,
        #[source]
        source: PgWireError,
    },
    /// START_REPLICATION did not answer within `postgres.connect_timeout + feeds.lease`.
    #[error("START_REPLICATION timed out")]
    StartTimedOut,
    /// Postgres refused the slot as in use (SQLSTATE 55006): the previous relay's stream
    /// has not let go of it yet.
    #[error("another relay still streams the slot")]
    SlotInUse(#[source] PgWireError),
    /// The replication stream closed.
    #[error("the replication stream ended")]
    StreamEnded,
    /// The slot lost its WAL (`max_slot_wal_keep_size`).
    #[error("the replication slot was invalidated")]
    SlotInvalidated,
    /// The slot was dropped under the relay.
    #[error("the replication slot is gone")]
    SlotGone,
    /// The stream carried bytes that are not pgoutput.
    #[error("decoding the stream failed")]
    Decode(#[source] DecodeError),
    /// Another instance holds the relay lease now.
    #[error("lost the relay lease to another instance")]
    LeaseLost,
    /// The subscription instances watch to tell this relay alive closed: they would take
    /// it for dead.
    #[error("the relay's alive subscription closed")]
    AliveClosed,
    /// The subscription to the instances' reports of what they applied closed.
    #[error("the subscription to the instances' reports closed")]
    ReportsClosed,
    /// The catalog is not loaded (replaced by one that failed to load).
    #[error(transparent)]
    Catalog(NotReady),
    /// A message for the instances could not be encoded.
    #[error("encoding a message failed")]
    Encode(#[source] serde_json::Error),
}
