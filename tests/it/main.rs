//! Integration tests: one binary, so the servers start once. See `support` for how.

mod api;
mod cli;
mod cluster;
mod coherence;
mod dba;
mod ddl;
mod failover;
mod hostile;
mod lease;
mod pgbouncer;
mod restore;
mod schema;
mod sentinel;
mod stamp;
mod support;
mod tables;
mod tiers;
mod tls;
mod wal;
mod watch;
