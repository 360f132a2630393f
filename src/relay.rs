//! The relay of the `wal` source: one instance per database, elected, streams the WAL
//! through the replication slot (logical decoding, pgoutput), applies each committed change
//! to Redis once and publishes it on one channel, where every instance hears it
//! ([`crate::feed::relayed`]). The WAL is in commit order and holds every writer's changes,
//! so nothing is polled and nothing but the version stamp runs on the writers' path. Meta's
//! memcache does the same with one tailer per database (mcsqueal, NSDI 2013).
//!
//! # Election
//! A lease in Redis (`{prefix}relay`, renewed every quarter of `feeds.relay_lease`) decides
//! who tries; the slot decides who streams: Postgres refuses a second consumer of an active
//! slot. Standbys only ask Redis, so idle instances send Postgres nothing. A relay that loses
//! its lease stops streaming; one that dies lets go of the slot when its socket closes (at
//! once after a kill, after `feeds.wal_sender_timeout` when it vanished silently).
//!
//! # Delivery
//! At least once: a transaction's position is acknowledged to Postgres only after its
//! changes are applied to Redis and published. After a failure the slot sends them again;
//! every tier takes only strictly newer versions, so a repeat changes nothing.
//!
//! # Gaps
//! A relay that loses its stream (or stops) publishes a `gap`: instances bypass L1 at once
//! instead of at the end of their lease. A relay that dies without a word is noticed by the
//! lease alone.
//!
//! # Heartbeats
//! The relay emits `pg_logical_emit_message(false, 'syncar', 'hb:…')` every
//! `feeds.heartbeat_interval` on a plain connection. It comes back through the stream after
//! everything committed before it, and is published with the time it took: instances count
//! their Postgres feed up only while such heartbeats arrive within the lease, so a dead
//! relay, a stuck slot or a lagging stream all mean L1 bypass within the lease.
//!
//! # The slot's epoch
//! The state table records the version taken when the slot was created
//! ([`crate::schema::capture::ensure_slot`]); Redis records the epoch of the slot that fed
//! it. When they differ (a new slot, one recreated after it was invalidated, a Redis restored
//! from older data), Redis may lack changes nobody will stream again: every resource's
//! generation is raised before anything is relayed.
//!
//! # Rooms
//! [`run`] stands for election; each elected term (`term`) checks, sets up the slot and
//! its epoch (`slot`), opens the replication connection (`replication`) and runs the
//! stream loop (`stream`), whose `session` gathers each transaction
//! (`transaction`, `relations`, `reinsert`), applies and publishes it (`apply`) and
//! only then confirms its position (`confirm`); `heartbeat` emits and recognises the
//! heartbeats. What every room shares is in `context` and `error`.

mod apply;
mod confirm;
mod context;
mod error;
mod heartbeat;
pub mod pgoutput;
mod reinsert;
mod relations;
mod replication;
mod session;
mod slot;
mod sql;
mod stream;
mod term;
mod transaction;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::backoff::{jitter, Backoff};
use crate::config::PostgresSource;
use crate::telemetry::{error_chain, RELAY_ACTIVE, RELAY_SYNCHRONOUS};

pub use context::RelayContext;
pub use error::RelayError;

/// Stands for election until `shutdown`, and relays while elected. Returns at once when the
/// schema's source is not `wal`.
pub async fn run(ctx: Arc<RelayContext>, shutdown: CancellationToken) {
    let catalog = loop {
        if let Ok(catalog) = ctx.catalog.get() {
            break catalog;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    };
    if catalog.capture.source != PostgresSource::Wal {
        return;
    }
    let feeds = &ctx.config.feeds;
    let mut backoff = Backoff::new(Duration::from_millis(100), feeds.max_backoff);
    let mut logged = false;
    metrics::gauge!(RELAY_ACTIVE).set(0.0);
    metrics::gauge!(RELAY_SYNCHRONOUS).set(0.0);
    loop {
        let claimed = ctx
            .redis
            .claim_lease(&ctx.instance_id, feeds.relay_lease)
            .await
            .unwrap_or(false);
        let pause = if claimed {
            let ended = term::serve(&ctx, &catalog, &shutdown).await;
            metrics::gauge!(RELAY_ACTIVE).set(0.0);
            let _ = ctx.redis.release_lease(&ctx.instance_id).await;
            match ended {
                Ok(()) => return,
                Err(e) => {
                    let reason = ctx.secrets.scrub(&error_chain(&e));
                    if logged {
                        tracing::debug!(reason = %reason, "relay stopped; retrying");
                    } else {
                        tracing::warn!(reason = %reason, "relay stopped; retrying");
                        logged = true;
                    }
                    backoff.next_pause()
                }
            }
        } else {
            backoff.reset();
            logged = false;
            jitter(feeds.relay_lease / 2, 0.2)
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}
