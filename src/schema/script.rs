//! The SQL a migration would run, written down instead of run (`syncar migrate
//! --print-sql`): [`Script`] and its blocks as one SQL file, and the [`Sink`] every
//! statement of a migration goes through. Decides no statement itself.

use tokio_postgres::GenericClient;

use super::error::SchemaError;
use super::lock::LOCK_TIMEOUT;

/// The SQL a migration would run, in the transactions it would run it in (see
/// [`plan`](super::plan)).
#[derive(Debug, Default)]
pub struct Script {
    /// Each a transaction of its own, or a statement that must run outside one (creating a
    /// replication slot), with a comment saying what it is for.
    pub blocks: Vec<Block>,
}

/// One unit of a [`Script`].
#[derive(Debug)]
pub struct Block {
    /// What it is for, one line.
    pub comment: String,
    /// Whether its statements run in one transaction (with a short `lock_timeout`, as
    /// `migrate` runs them).
    pub transaction: bool,
    /// Its statements, in order (one entry may hold several, joined by `; `).
    pub statements: Vec<String>,
}

/// `text` on one line, for an SQL comment: a table name holding a newline must not start a
/// line of its own in the script (psql would run a `\` command there).
pub fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Where the migration's statements go.
pub(super) enum Sink {
    /// Run on the connection (`migrate`).
    Postgres,
    /// Written down ([`plan`](super::plan)): the transaction is read-only, and rolled back.
    Script(Script),
}

impl Script {
    /// Whether the schema is up to date (nothing to run).
    pub fn is_empty(&self) -> bool {
        self.blocks.iter().all(|b| b.statements.is_empty())
    }

    /// The script as one SQL file for psql or a migration tool (Flyway, Liquibase, Alembic,
    /// sqitch): each transaction between `BEGIN` and `COMMIT` with `SET LOCAL lock_timeout`
    /// (a lock request that waits makes every later query of that table wait behind it: on
    /// a lock timeout, run it again later), every statement ending in `;`.
    pub fn to_sql(&self) -> String {
        let mut out = String::new();
        for block in self.blocks.iter().filter(|b| !b.statements.is_empty()) {
            out.push_str(&format!("-- {}\n", one_line(&block.comment)));
            if !block.transaction {
                out.push_str("SET synchronous_commit = local;\n");
            }
            if block.transaction {
                // As `migrate` runs it: never holding a table's readers behind a lock wait
                // for long, never waiting for a synchronous standby (the relay among them).
                out.push_str(&format!(
                    "BEGIN;\nSET LOCAL lock_timeout = '{}ms';\nSET LOCAL synchronous_commit = local;\n",
                    LOCK_TIMEOUT.as_millis()
                ));
            }
            for statement in &block.statements {
                out.push_str(statement.trim_end_matches(';'));
                out.push_str(";\n");
            }
            if block.transaction {
                out.push_str("COMMIT;\n");
            }
            out.push('\n');
        }
        out
    }
}

impl Sink {
    /// Whether this is a plan: statements are written down, not run.
    pub(super) fn is_plan(&self) -> bool {
        matches!(self, Sink::Script(_))
    }

    /// Starts a new block of the script (nothing when running).
    pub(super) fn block(&mut self, comment: impl Into<String>, transaction: bool) {
        if let Sink::Script(script) = self {
            script.blocks.push(Block {
                comment: comment.into(),
                transaction,
                statements: Vec::new(),
            });
        }
    }

    /// Runs `sql` (statements without parameters), or writes it into the current block.
    pub(super) async fn run(
        &mut self,
        client: &impl GenericClient,
        sql: String,
        doing: &'static str,
    ) -> Result<(), SchemaError> {
        match self {
            Sink::Postgres => client
                .batch_execute(&sql)
                .await
                .map_err(|source| SchemaError::Postgres { doing, source }),
            Sink::Script(script) => {
                if script.blocks.is_empty() {
                    script.blocks.push(Block {
                        comment: doing.into(),
                        transaction: true,
                        statements: Vec::new(),
                    });
                }
                script
                    .blocks
                    .last_mut()
                    .expect("a block")
                    .statements
                    .push(sql);
                Ok(())
            }
        }
    }

    /// Ends a transaction [`begin_locked`](super::lock::begin_locked) started: committed
    /// when running, rolled back when planning.
    pub(super) async fn commit(
        &self,
        tx: tokio_postgres::Transaction<'_>,
        doing: &'static str,
    ) -> Result<(), SchemaError> {
        let ended = match self {
            Sink::Postgres => tx.commit().await,
            Sink::Script(_) => tx.rollback().await,
        };
        ended.map_err(|source| SchemaError::Postgres { doing, source })
    }
}
