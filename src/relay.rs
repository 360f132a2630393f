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

mod confirm;
pub mod pgoutput;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use pgwire_replication::{
    Lsn, PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent,
};
use tokio_util::sync::CancellationToken;

use crate::backoff::{jitter, ticker, Backoff};
use crate::coherence::{mono_ms, Message, Op, Relayed};
use crate::config::{Config, PostgresSource};
use crate::db::connect_dedicated;
use crate::feed::relayed::{applied_channel, relay_alive_channel, relay_channel};
use crate::redact::Secrets;
use crate::resource::{Catalog, CatalogCell, Resource};
use crate::schema::capture::{
    ensure_slot, failover_gaps, new_slot_epoch, recorded_source, server_version_num, slot_epoch,
    slot_lag, SlotState, MESSAGE_PREFIX,
};
use crate::schema::shape::ShapeCheck;
use crate::schema::VERSION_SEQUENCE;
use crate::telemetry::{
    error_chain, RELAY_ACTIVE, RELAY_CHANGES, RELAY_SYNCHRONOUS, RELAY_TRANSACTIONS, WAL_LAG_BYTES,
};
use crate::tiers::Tiers;
use crate::tls::PostgresTls;
use confirm::{synchronous, Confirmations};
use pgoutput::{Change, Column};

/// What the relay may use.
pub struct RelayContext {
    pub config: Arc<Config>,
    /// Where changes are applied (Redis) and published.
    pub tiers: Tiers,
    pub catalog: Arc<CatalogCell>,
    pub secrets: Secrets,
    /// This instance's id: the lease's holder, and the heartbeats' author.
    pub instance_id: String,
}

/// Whether what keeps the slot from following a failover was logged at warn level already
/// (each relay term would say it again).
static FAILOVER_WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The least time between two standby status updates to Postgres (see
/// [`replication_config`]).
const STATUS_INTERVAL: Duration = Duration::from_millis(1);

/// Changes per published message: a statement changing 50 000 rows is published in pieces.
const CHANGES_PER_MESSAGE: usize = 1000;

/// Stream events taken into one batch at most (only what has already arrived is taken).
const BATCH_EVENTS: usize = 4096;

/// Postgres counts time from 2000-01-01; Unix from 1970-01-01 (in microseconds).
const POSTGRES_EPOCH_US: i64 = 946_684_800_000_000;

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
            .tiers
            .claim_relay(&ctx.instance_id, feeds.relay_lease)
            .await
            .unwrap_or(false);
        let pause = if claimed {
            let ended = stream(&ctx, &catalog, &shutdown).await;
            metrics::gauge!(RELAY_ACTIVE).set(0.0);
            let _ = ctx.tiers.release_relay(&ctx.instance_id).await;
            match ended {
                Ok(()) => return,
                Err(e) => {
                    let reason = ctx.secrets.scrub(&e);
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

/// One elected term: make sure of the slot and of what Redis holds, then stream until
/// shutdown (`Ok`) or a failure (the reason).
async fn stream(
    ctx: &RelayContext,
    catalog: &Catalog,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let config = &ctx.config;
    let feeds = &config.feeds;
    let postgres = &config.postgres;
    let slot = &catalog.capture.slot;
    let (client, connection) = connect_dedicated(
        postgres,
        postgres.replication_url.as_deref(),
        "syncar-relay",
    )
    .await
    .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(connection);
    let _driver = AbortOnDrop(driver);
    let sql = Sql::new(&postgres.schema);

    // Another instance may have migrated the schema to another source (or `syncar
    // uninstall` run): a slot created now would retain WAL for nobody.
    let source = recorded_source(&client, &postgres.schema)
        .await
        .map_err(|e| error_chain(&e))?;
    if source.as_deref() != Some(PostgresSource::Wal.as_str()) {
        return Err(format!(
            "the schema is migrated for postgres_source {source:?}, not wal: not relaying"
        ));
    }
    match ensure_slot(&client, &postgres.schema, slot)
        .await
        .map_err(|e| error_chain(&e))?
    {
        SlotState::Kept => {}
        SlotState::Created => tracing::info!(slot = %slot, "created the replication slot"),
        SlotState::Missing => tracing::error!(
            slot = %slot,
            "the replication slot syncar had created is not on this server: it did not follow \
             a failover here (Postgres before 17, no sync_replication_slots on the standby, or \
             not yet synchronized when it was promoted), or it was dropped. Continuity cannot \
             be proven, so a new slot was created and every cached resource is flushed"
        ),
        SlotState::Recreated => tracing::error!(
            slot = %slot,
            "the replication slot had been invalidated (its WAL was removed, see \
             max_slot_wal_keep_size) and was recreated: changes since it fell behind are lost \
             to it, so every cached resource is flushed"
        ),
    }
    let gaps = failover_gaps(&client, slot).await;
    match gaps {
        Ok(ref gaps) if !gaps.is_empty() => {
            let first = !FAILOVER_WARNED.swap(true, std::sync::atomic::Ordering::Relaxed);
            for gap in gaps.iter() {
                if first {
                    tracing::warn!(slot = %slot, "{gap}");
                } else {
                    tracing::debug!(slot = %slot, "{gap}");
                }
            }
        }
        Ok(_) => {}
        Err(ref e) => tracing::debug!(error = %error_chain(e), "cannot read the failover settings"),
    }
    let epoch = match slot_epoch(&client, &postgres.schema)
        .await
        .map_err(|e| error_chain(&e))?
    {
        Some(epoch) => epoch,
        // A slot from before epochs were recorded: what fed Redis is unknown.
        None => new_slot_epoch(&client, &postgres.schema)
            .await
            .map_err(|e| error_chain(&e))?,
    };
    // Never stream into a Redis incarnation that may hold older data than it should, nor
    // from a Postgres that went back in time unnoticed.
    ctx.tiers.secure_redis(catalog).await?;
    ctx.tiers.secure_postgres().await?;
    // Recorded only now: a relay on a promoted standby must first compare with what the
    // timeline it left recorded.
    if let (Ok(gaps), Some(timeline)) = (&gaps, current_timeline(&client).await) {
        if gaps.is_empty()
            && server_version_num(&client)
                .await
                .is_ok_and(|v| v >= 170_000)
        {
            if let Err(e) = ctx.tiers.record_failover_guarded(timeline).await {
                tracing::debug!(error = %e, "cannot record that failover is guarded");
            }
        }
    }
    // The tombstones below go under each resource's current generation, which this process
    // may never have read (`syncar relay` runs no feed).
    ctx.tiers
        .load_generations()
        .await
        .map_err(|e| format!("reading generations failed: {e}"))?;
    let fed_by = ctx.tiers.fed_by_slot().await.map_err(|e| e.to_string())?;
    if fed_by != Some(epoch) {
        // Redis may hold copies no change from this slot will ever invalidate.
        let version = sql.next_version(&client).await?;
        let flushes: Vec<Message> = catalog
            .all_names()
            .iter()
            .map(|r| change(r, None, version, Op::Flush, None))
            .collect();
        ctx.tiers
            .apply_to_redis(catalog, &flushes)
            .await
            .map_err(|e| format!("flushing redis for a new slot failed: {e}"))?;
        publish(
            ctx,
            Relayed::Changes {
                changes: flushes,
                lsn: None,
            },
        )
        .await?;
        ctx.tiers
            .record_fed_by_slot(epoch)
            .await
            .map_err(|e| e.to_string())?;
        if fed_by.is_none() {
            // A first start (or a Redis that lost everything): nothing to be alarmed at.
            tracing::info!(
                slot = %slot,
                slot_epoch = ?epoch,
                "redis was fed by no replication slot yet; raised every resource's generation"
            );
        } else {
            tracing::warn!(
                slot = %slot,
                redis_fed_by = ?fed_by,
                slot_epoch = ?epoch,
                "redis was fed by another replication slot; raised every resource's generation"
            );
        }
    }

    let host = connected_host(&client, config).await;
    let mut repl = ReplicationClient::connect(replication_config(config, catalog, host)?)
        .await
        .map_err(|e| format!("replication connect failed: {e}"))?;
    let started =
        tokio::time::timeout(postgres.connect_timeout + feeds.lease, repl.wait_started()).await;
    match started {
        Err(_) => {
            repl.abort();
            return Err("START_REPLICATION timed out".into());
        }
        // object_in_use. pgwire-replication keeps a server error's fields only as text, with
        // the code written as `SQLSTATE 55006` (`ErrorFields::to_error_string`).
        Ok(Err(PgWireError::Server(m))) if m.contains("SQLSTATE 55006") => {
            return Err(format!("another relay still streams the slot: {m}"));
        }
        Ok(Err(e)) => return Err(format!("START_REPLICATION failed: {e}")),
        Ok(Ok(())) => {}
    }
    // Held while streaming: instances watch it to tell a dead relay at once.
    let mut alive = ctx
        .tiers
        .subscribe(
            &[relay_alive_channel(
                &config.redis.key_prefix,
                &ctx.instance_id,
            )],
            feeds.lease,
        )
        .await
        .map_err(|e| format!("subscribing to the relay's alive channel failed: {e}"))?;
    // Instances report what they applied here while this relay is a synchronous standby.
    let mut reports = ctx
        .tiers
        .subscribe(&[applied_channel(&config.redis.key_prefix)], feeds.lease)
        .await
        .map_err(|e| format!("subscribing to the instances' reports failed: {e}"))?;
    metrics::gauge!(RELAY_ACTIVE).set(1.0);
    tracing::info!(slot = %slot, instance = %ctx.instance_id, "relaying the WAL");

    // The relay's own statements on customers' tables (a re-inserted row given a fresh
    // version) must never hold the stream behind a customer's lock for long.
    client
        .batch_execute("SET lock_timeout = '200ms'")
        .await
        .map_err(|e| format!("setting lock_timeout failed: {e}"))?;
    // Prepared once: an unnamed statement costs a second round trip each time.
    // Prepared once too: it runs every `relay_lease / 4`.
    let sync_state = client
        .prepare(confirm::SYNC_STATE)
        .await
        .map_err(|e| format!("preparing the sync_state query failed: {e}"))?;
    let heartbeat = client
        .prepare("SELECT pg_logical_emit_message(false, $1, $2)")
        .await
        .map_err(|e| format!("preparing the heartbeat failed: {e}"))?;
    // What Postgres said of this relay's sync_state, once it streams.
    let mut known_synchronous: Option<bool> = None;
    let mut session = Session {
        epoch,
        // Until Postgres is seen to say otherwise, the relay may be a synchronous standby.
        confirmations: Confirmations::new(feeds.lease, feeds.relay_lease / 4),
        ..Session::default()
    };
    let mut renew = ticker(feeds.relay_lease / 4);
    let mut beat = ticker(feeds.heartbeat_interval);
    let mut measure = ticker(Duration::from_secs(5));
    // Tables changed by a DDL that no write follows show up in no Relation message: look.
    let mut shapes = ticker(feeds.lease / 2);
    let mut shape_check = ShapeCheck::new(Duration::ZERO);
    let result = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            _ = alive.next() => {
                // Without it instances would take this relay for dead: end the term.
                break Err("the relay's alive subscription closed".into());
            }
            _ = renew.tick() => {
                match ctx.tiers.claim_relay(&ctx.instance_id, feeds.relay_lease).await {
                    Ok(true) => {}
                    Ok(false) => break Err("lost the relay lease to another instance".into()),
                    Err(e) => break Err(format!("cannot renew the relay lease: {e}")),
                }
                // Whether Postgres waits for this relay's confirmations (the operator named
                // it in synchronous_standby_names); and instances gone silent are dropped.
                match synchronous(&client, &sync_state, slot).await {
                    // Not streaming yet: what Postgres says of it now proves nothing.
                    Ok(None) => {}
                    Ok(Some(now)) if Some(now) != known_synchronous => {
                        if now || known_synchronous.is_some() {
                            tracing::info!(
                                synchronous = now,
                                "the relay {} a synchronous standby of postgres: it confirms \
                                 a position {}",
                                if now { "is" } else { "is no longer" },
                                if now { "once every instance has applied it" } else { "once it is published" }
                            );
                        }
                        known_synchronous = Some(now);
                        session.confirmations.set_synchronous(now.then_some(feeds.lease));
                        metrics::gauge!(RELAY_SYNCHRONOUS).set(if now { 1.0 } else { 0.0 });
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e, "cannot read the relay's sync_state"),
                }
                session.confirmations.confirm(&repl);
            }
            report = reports.next() => {
                let Some(report) = report else {
                    break Err("the subscription to the instances' reports closed".into());
                };
                session.confirmations.reported(&repl, report.get_payload_bytes());
            }
            _ = beat.tick() => {
                let sent = mono_ms();
                session.emitted.push_back(sent);
                if session.emitted.len() > 64 {
                    session.emitted.pop_front();
                }
                let content = format!("hb:{sent}:{}", ctx.instance_id);
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] =
                    [&MESSAGE_PREFIX, &content];
                let emit = client.execute(&heartbeat, &params);
                // A late one is not an error: the lease decides (instances see the lag).
                if let Ok(Err(e)) = tokio::time::timeout(feeds.heartbeat_interval, emit).await {
                    break Err(format!("heartbeat failed: {e}"));
                }
            }
            _ = shapes.tick() => {
                shape_check.run(&client, config, PostgresSource::Wal, feeds.lease).await;
            }
            _ = measure.tick() => {
                match slot_lag(&client, slot).await {
                    Ok(Some(lag)) if lag.lost => break Err("the replication slot was invalidated".into()),
                    Ok(Some(lag)) => {
                        session.lag_bytes = Some(lag.bytes);
                        metrics::gauge!(WAL_LAG_BYTES).set(lag.bytes as f64);
                    }
                    Ok(None) => break Err("the replication slot is gone".into()),
                    Err(e) => break Err(error_chain(&e)),
                }
            }
            event = repl.recv() => {
                let event = match event {
                    Ok(Some(event)) => event,
                    Ok(None) => break Err("the replication stream ended".into()),
                    Err(e) => break Err(format!("replication stream failed: {e}")),
                };
                // What is already received joins the batch: under load many transactions are
                // applied and published at once; idle, each goes out at once.
                let mut received = vec![event];
                let mut ended = None;
                while received.len() < BATCH_EVENTS {
                    match repl.recv().now_or_never() {
                        Some(Ok(Some(event))) => received.push(event),
                        Some(Ok(None)) => {
                            ended = Some("the replication stream ended".to_string());
                            break;
                        }
                        Some(Err(e)) => {
                            ended = Some(format!("replication stream failed: {e}"));
                            break;
                        }
                        None => break,
                    }
                }
                // The catalog as it is now: a resource reloaded after its table changed maps
                // by its new columns from the next Relation message on.
                let current = match ctx.catalog.get() {
                    Ok(current) => current,
                    Err(e) => break Err(e.to_string()),
                };
                session.remap(&current, config);
                let mut failed = None;
                for event in received {
                    if let Err(e) = session.on_event(ctx, &current, &client, &sql, &repl, event).await {
                        failed = Some(e);
                        break;
                    }
                }
                if let Some(e) = failed {
                    break Err(e);
                }
                if std::mem::take(&mut session.relation_seen) {
                    // pgoutput sends a `Relation` before a table's first change after its
                    // shape changed: look at once instead of at the next tick.
                    shape_check.due_now();
                    shape_check.run(&client, config, PostgresSource::Wal, feeds.lease).await;
                }
                if let Err(e) = session.flush(ctx, &current, &repl).await {
                    break Err(e);
                }
                if let Some(e) = ended {
                    break Err(e);
                }
            }
        }
    };
    if result.is_ok() {
        let _ = tokio::time::timeout(feeds.lease, repl.shutdown()).await;
    } else {
        repl.abort();
    }
    // Instances stop trusting L1 now rather than at the end of their lease; the next relay's
    // heartbeats bring them back.
    let _ = publish(
        ctx,
        Relayed::Gap {
            relay: ctx.instance_id.clone(),
        },
    )
    .await;
    result
}

/// A relation of the stream that is a resource: where its key and version are in a tuple.
struct Mapped {
    /// The resource's name.
    resource: String,
    /// Where the key and the version are in a tuple; `None` when the stream's columns lack
    /// either (the table was changed under its resource: a key or version column renamed
    /// or dropped) or the resource is left out of the catalog (its table does not fit).
    /// Every change of such a table is then a flush of its resource, so the relay goes on
    /// streaming, and acknowledging, for every table.
    at: Option<(usize, usize)>,
    /// Whether the key is part of the replica identity: then a DELETE in the WAL names it.
    key_in_identity: bool,
}

/// What one transaction said, kept until its commit.
#[derive(Default)]
struct Transaction {
    commit_time_us: Option<i64>,
    /// What inserts and updates changed, turned into messages as they arrive: only keys and
    /// versions are kept, never a row, so a transaction of 100 000 rows costs megabytes.
    changes: Vec<Message>,
    /// Rows deleted (the key when the WAL names it) and resources truncated, resolved at
    /// commit against `announced`.
    deleted: Vec<(String, Option<String>)>,
    truncated: Vec<String>,
    /// Resources whose triggers' announcements cannot be checked against the WAL: their key
    /// is outside the replica identity, so the WAL names neither deleted nor moved keys.
    unverifiable: std::collections::HashSet<String>,
    /// Resources with a row the WAL does not key (an unchanged TOASTed key): flushed.
    unkeyed: Vec<String>,
    /// The syncar messages of the transaction: `{"resource", "deletes": [[key, version]]}`
    /// or `{"resource", "truncate": version}`.
    announced: Vec<serde_json::Value>,
}

/// What one term of streaming keeps between events.
#[derive(Default)]
struct Session {
    relations: HashMap<u32, Mapped>,
    /// Every `Relation` message of this term, as sent: mapped again whenever the catalog is
    /// replaced (pgoutput sends a table's `Relation` once after each change of its shape,
    /// often before this relay's catalog follows the change).
    sent: HashMap<u32, pgoutput::Relation>,
    /// The catalog `relations` were mapped with (held, so that its address is never
    /// another catalog's).
    mapped_with: Option<Arc<Catalog>>,
    /// The transaction being received.
    txn: Transaction,
    /// Changes of committed transactions not yet applied and published, and the position
    /// to acknowledge once they are.
    pending: Vec<Message>,
    pending_lsn: Option<Lsn>,
    pending_transactions: u64,
    /// The slot's lag, as last measured, for the heartbeats.
    lag_bytes: Option<i64>,
    /// Send times of this term's recent heartbeats: only those vouch for the stream (anyone
    /// may emit a logical message; a forged one must not pass for fresh).
    emitted: std::collections::VecDeque<u64>,
    /// Published tables this relay's configuration has no resource for, warned about once.
    unknown: std::collections::HashSet<String>,
    /// A `Relation` message of a resource's table arrived since the last shape check.
    relation_seen: bool,
    /// What is published, and what Postgres is told of it.
    confirmations: Confirmations,
    /// The slot's epoch: the heartbeats carry it with their positions.
    epoch: i64,
    /// Keys deleted by transactions relayed in this term, by resource and key: the delete's
    /// version and when it was relayed. Kept for [`DELETE_MEMORY`], at most
    /// [`DELETE_MEMORY_KEYS`] of them.
    recent_deletes: HashMap<(String, String), (i64, std::time::Instant)>,
}

/// How long a relayed delete is remembered: past any tombstone's TTL, a re-insert that
/// commits later with a lower version no longer meets a cached absence.
const DELETE_MEMORY: Duration = Duration::from_secs(120);
/// Deletes remembered at most (about 100 bytes each).
const DELETE_MEMORY_KEYS: usize = 100_000;

impl Session {
    /// Maps every relation sent in this term again, if `catalog` is not the one they were
    /// mapped with: a resource that fits again is keyed again at once.
    fn remap(&mut self, catalog: &Arc<Catalog>, config: &Config) {
        if self
            .mapped_with
            .as_ref()
            .is_some_and(|mapped| Arc::ptr_eq(mapped, catalog))
        {
            return;
        }
        self.mapped_with = Some(catalog.clone());
        let sent = std::mem::take(&mut self.sent);
        for r in sent.values() {
            match self.map(r, catalog, config) {
                Some(mapped) => self.relations.insert(r.id, mapped),
                None => self.relations.remove(&r.id),
            };
        }
        self.sent = sent;
    }

    /// What `r` is for `catalog`: a resource keyed by its columns, a resource flushed at
    /// each change (its columns lack the key or version, or it is left out), or nothing
    /// (no resource of this relay's configuration).
    fn map(
        &mut self,
        r: &pgoutput::Relation,
        catalog: &Catalog,
        config: &Config,
    ) -> Option<Mapped> {
        let table = format!("{}.{}", r.schema, r.name);
        let Some(resource) = catalog.by_table(&r.schema, &r.name) else {
            let configured = config
                .resources
                .iter()
                .find(|c| c.schema == r.schema && c.table == r.name)
                .filter(|c| catalog.knows(&c.name));
            if let Some(c) = configured {
                // Left out (its table does not fit now): its copies are retired at each
                // change, and it is keyed again once the catalog serves it.
                return Some(Mapped {
                    resource: c.name.clone(),
                    at: None,
                    key_in_identity: false,
                });
            }
            // Another instance's configuration (or migration) published it: its changes
            // reach no cache through this relay.
            if self.unknown.insert(table.clone()) {
                tracing::warn!(
                    table = %table,
                    "a published table is not a resource of this relay's configuration: its \
                     changes are not relayed; give every instance the same resources"
                );
            }
            return None;
        };
        let position = |name: &str| r.columns.iter().position(|(c, _)| c == name);
        let at = match (
            position(resource.key_column()),
            position(resource.version_column()),
        ) {
            (Some(key), Some(version)) => Some((key, version)),
            _ => {
                tracing::warn!(
                    table = %table,
                    resource = %resource.name,
                    key = %resource.key_column(),
                    version = %resource.version_column(),
                    "the stream's columns of a resource's table lack its key or version column \
                     (renamed or dropped?): each change of it flushes the resource until it \
                     fits again"
                );
                None
            }
        };
        Some(Mapped {
            resource: resource.name.clone(),
            at,
            key_in_identity: at.is_some_and(|(key, _)| r.columns[key].1),
        })
    }

    async fn on_event(
        &mut self,
        ctx: &RelayContext,
        catalog: &Catalog,
        client: &tokio_postgres::Client,
        sql: &Sql,
        repl: &ReplicationClient,
        event: ReplicationEvent,
    ) -> Result<(), String> {
        match event {
            ReplicationEvent::Begin {
                commit_time_micros, ..
            } => {
                self.txn = Transaction {
                    commit_time_us: Some(commit_time_micros + POSTGRES_EPOCH_US),
                    ..Transaction::default()
                };
            }
            ReplicationEvent::XLogData { data, .. } => {
                match pgoutput::decode(data).map_err(|e| e.to_string())? {
                    Change::Relation(r) => {
                        self.relation_seen = true;
                        match self.map(&r, catalog, &ctx.config) {
                            Some(mapped) => self.relations.insert(r.id, mapped),
                            None => self.relations.remove(&r.id),
                        };
                        self.sent.insert(r.id, r);
                    }
                    Change::Other(_) => {}
                    row => self.txn.receive(row, &self.relations),
                }
            }
            ReplicationEvent::Message {
                transactional: true,
                prefix,
                content,
                ..
            } if prefix == MESSAGE_PREFIX => match serde_json::from_slice(&content) {
                Ok(announced) => self.txn.announced.push(announced),
                // Anyone may emit one: a malformed message must not stop the relay (it would
                // come again after every restart). What it would announce gets a version of
                // the relay's own.
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring a malformed syncar message in the WAL")
                }
            },
            ReplicationEvent::Message {
                transactional: false,
                prefix,
                content,
                lsn,
            } if prefix == MESSAGE_PREFIX => {
                // Everything before it in the WAL goes out first.
                self.flush(ctx, catalog, repl).await?;
                let text = String::from_utf8_lossy(&content);
                let mut parts = text.splitn(3, ':');
                if let (Some("hb"), Some(sent), Some(author)) =
                    (parts.next(), parts.next(), parts.next())
                {
                    // Another relay's heartbeats (an earlier term) say nothing of this
                    // stream's lag.
                    let sent: Option<u64> = sent.parse().ok();
                    if let (true, Some(sent)) = (author == ctx.instance_id, sent) {
                        if !self.emitted.contains(&sent) {
                            self.confirmations.advance(repl, lsn, false);
                            return Ok(());
                        }
                        publish(
                            ctx,
                            Relayed::Heartbeat {
                                relay: ctx.instance_id.clone(),
                                lag_ms: mono_ms().saturating_sub(sent),
                                lag_bytes: self.lag_bytes,
                                lsn: Some(lsn.to_string()),
                                epoch: Some(self.epoch),
                                sync: self.confirmations.is_synchronous(),
                            },
                        )
                        .await?;
                        // Published: instances report this position.
                        self.confirmations.advance(repl, lsn, true);
                        return Ok(());
                    }
                }
                self.confirmations.advance(repl, lsn, false);
            }
            ReplicationEvent::Commit { end_lsn, .. } => {
                let txn = std::mem::take(&mut self.txn);
                let mut changes = changes_of(txn, catalog, client, sql).await?;
                self.reinserted_after_delete(&mut changes, catalog, client, sql)
                    .await?;
                self.pending.extend(changes);
                self.pending_lsn = Some(end_lsn);
                self.pending_transactions += 1;
            }
            _ => {}
        }
        Ok(())
    }

    /// Applies what committed transactions changed to Redis, publishes it, and only then
    /// acknowledges their position.
    async fn flush(
        &mut self,
        ctx: &RelayContext,
        catalog: &Catalog,
        repl: &ReplicationClient,
    ) -> Result<(), String> {
        let Some(lsn) = self.pending_lsn.take() else {
            return Ok(());
        };
        let changes = std::mem::take(&mut self.pending);
        if !changes.is_empty() {
            // One piece (the common case): its message goes out with the last change, one
            // round trip sooner; else every piece once all of Redis is applied.
            let channel = relay_channel(&ctx.config.redis.key_prefix);
            let whole = (changes.len() <= CHANGES_PER_MESSAGE)
                .then(|| {
                    serde_json::to_string(&Relayed::Changes {
                        changes: changes.clone(),
                        lsn: Some(lsn.to_string()),
                    })
                })
                .transpose()
                .map_err(|e| e.to_string())?;
            let published = match &whole {
                Some(message) => ctx
                    .tiers
                    .apply_and_publish(catalog, &changes, &channel, message)
                    .await
                    .map_err(|e| format!("applying changes to redis failed: {e}"))?,
                None => {
                    ctx.tiers
                        .apply_to_redis(catalog, &changes)
                        .await
                        .map_err(|e| format!("applying changes to redis failed: {e}"))?;
                    false
                }
            };
            for m in &changes {
                let op = match m.op {
                    Op::Put => "put",
                    Op::Delete => "delete",
                    Op::Flush => "flush",
                };
                metrics::counter!(RELAY_CHANGES, "op" => op).increment(1);
            }
            let pieces = changes.len().div_ceil(CHANGES_PER_MESSAGE);
            let unpublished = if published { &[][..] } else { &changes[..] };
            for (i, chunk) in unpublished.chunks(CHANGES_PER_MESSAGE).enumerate() {
                // Only the last piece completes the batch's position.
                let last = i + 1 == pieces;
                publish(
                    ctx,
                    Relayed::Changes {
                        changes: chunk.to_vec(),
                        lsn: last.then(|| lsn.to_string()),
                    },
                )
                .await?;
            }
        }
        metrics::counter!(RELAY_TRANSACTIONS)
            .increment(std::mem::take(&mut self.pending_transactions));
        // Carried by a message only when something was published for it.
        self.confirmations.advance(repl, lsn, !changes.is_empty());
        Ok(())
    }
}

impl Session {
    /// A delete racing a re-insert of its key: an INSERT takes its version in its BEFORE
    /// trigger, then waits on the uncommitted DELETE of the same key, whose statement trigger
    /// takes a later version; the insert commits after the delete with a lower version, and
    /// the delete's absence would outrank the live row in every tier. The WAL gives commits
    /// in order, so a put committed after a delete of its key with a lower version is that
    /// race: the row is given a fresh version (an UPDATE that changes nothing else, as
    /// [`Resource::restamp_sql`] does for a write below a cached copy), which reaches the
    /// tiers now and through the WAL again. If that fails (a lock held longer than the
    /// relay's `lock_timeout`), a tombstone above the delete sends reads to Postgres until
    /// it expires: correct, uncached.
    async fn reinserted_after_delete(
        &mut self,
        changes: &mut [Message],
        catalog: &Catalog,
        client: &tokio_postgres::Client,
        sql: &Sql,
    ) -> Result<(), String> {
        if !self.recent_deletes.is_empty() {
            for m in changes.iter_mut().filter(|m| m.op == Op::Put) {
                let Some(key) = &m.key else { continue };
                let remembered = (m.resource.clone(), key.clone());
                let Some(&(deleted_at, at)) = self.recent_deletes.get(&remembered) else {
                    continue;
                };
                if deleted_at <= m.version || at.elapsed() > DELETE_MEMORY {
                    continue;
                }
                // One fresh version per delete, whatever comes of it: the restamp's own
                // change comes back through the WAL and must not be restamped again (a
                // delete version above the sequence, forged or from before a reset, would
                // otherwise loop).
                self.recent_deletes.remove(&remembered);
                let restamped = match catalog.get(&m.resource) {
                    Some(resource) => restamp(client, resource, key).await,
                    None => None,
                };
                tracing::info!(
                    resource = %m.resource,
                    version = m.version,
                    deleted_at,
                    restamped = ?restamped,
                    "a row re-inserted after a concurrent delete of its key had a lower version; \
                     gave it a fresh one"
                );
                m.version = match restamped {
                    Some(version) => version,
                    None => sql.next_version(client).await?,
                };
            }
        }
        let now = std::time::Instant::now();
        for m in changes.iter().filter(|m| m.op == Op::Delete) {
            if let Some(key) = &m.key {
                self.recent_deletes
                    .insert((m.resource.clone(), key.clone()), (m.version, now));
            }
        }
        if self.recent_deletes.len() > DELETE_MEMORY_KEYS {
            self.recent_deletes
                .retain(|_, (_, at)| at.elapsed() < DELETE_MEMORY);
            if self.recent_deletes.len() > DELETE_MEMORY_KEYS {
                // A delete storm: forgetting early only brings back the race's 404s.
                self.recent_deletes.clear();
            }
        }
        Ok(())
    }
}

/// Gives the row `key` of `resource` a fresh version; the new version, or `None` when the
/// row is gone or the statement failed.
async fn restamp(client: &tokio_postgres::Client, resource: &Resource, key: &str) -> Option<i64> {
    let param = resource.parse_key(key).ok()?;
    let sql = resource.restamp_sql();
    match client
        .query_opt(&sql, &[crate::db::key_param(&param)])
        .await
    {
        Ok(row) => row.map(|r| r.get(0)),
        Err(e) => {
            tracing::warn!(resource = %resource.name, error = %e, "giving a re-inserted row a fresh version failed");
            None
        }
    }
}

impl Transaction {
    /// Takes one row change: inserts and updates become messages at once (a tombstone at the
    /// row's version; a moved key also an absence at that version); deletes and truncations
    /// wait for the commit, where the triggers' announcements give their versions.
    fn receive(&mut self, row: Change, relations: &HashMap<u32, Mapped>) {
        let ts = self.commit_time_us;
        let relation = match &row {
            Change::Insert { relation, .. }
            | Change::Update { relation, .. }
            | Change::Delete { relation, .. } => Some(*relation),
            _ => None,
        };
        if let Some(m) = relation.and_then(|id| relations.get(&id)) {
            if m.at.is_none() {
                // The stream cannot name this table's keys or versions: flush it.
                return self.unkeyed.push(m.resource.clone());
            }
        }
        match row {
            Change::Insert { relation, new } => {
                if let Some(m) = relations.get(&relation) {
                    match m.key_version(&new) {
                        Keyed::Row(key, version) => {
                            self.changes
                                .push(change(&m.resource, Some(key), version, Op::Put, ts))
                        }
                        Keyed::Unknown => self.unkeyed.push(m.resource.clone()),
                        Keyed::NullKey => {}
                    }
                }
            }
            Change::Update { relation, old, new } => {
                let Some(m) = relations.get(&relation) else {
                    return;
                };
                if !m.key_in_identity {
                    self.unverifiable.insert(m.resource.clone());
                }
                let (key, version) = match m.key_version(&new) {
                    Keyed::Row(key, version) => (key, version),
                    Keyed::Unknown => return self.unkeyed.push(m.resource.clone()),
                    Keyed::NullKey => return,
                };
                // The old identity comes only when it changed: a moved key is deleted, at
                // the version of the row that left it.
                let key_at = m.at.map_or(usize::MAX, |(key, _)| key);
                let moved_from = old
                    .as_ref()
                    .and_then(|old| old.get(key_at))
                    .and_then(Column::text)
                    .filter(|old_key| *old_key != key)
                    .map(str::to_string);
                if let Some(old_key) = moved_from {
                    self.changes
                        .push(change(&m.resource, Some(old_key), version, Op::Delete, ts));
                }
                self.changes
                    .push(change(&m.resource, Some(key), version, Op::Put, ts));
            }
            Change::Delete { relation, old } => {
                if let Some(m) = relations.get(&relation) {
                    if !m.key_in_identity {
                        self.unverifiable.insert(m.resource.clone());
                    }
                    let key =
                        m.at.and_then(|(key, _)| old.get(key))
                            .and_then(Column::text)
                            .map(str::to_string);
                    self.deleted.push((m.resource.clone(), key));
                }
            }
            Change::Truncate { relations: ids } => {
                for id in ids {
                    if let Some(m) = relations.get(&id) {
                        self.truncated.push(m.resource.clone());
                    }
                }
            }
            Change::Relation(_) | Change::Other(_) => {}
        }
    }
}

/// The messages a committed transaction makes: what [`Transaction::receive`] made of its
/// inserts and updates, an absence per deleted key (at the version its trigger announced), a
/// flush per truncated resource.
///
/// Any database user may emit a logical message, so announcements are taken only where the
/// WAL agrees: a deleted key the WAL shows deleted in this transaction (or any, for a
/// resource whose key the WAL cannot name), a truncation the WAL shows, a version above 0.
/// What the triggers did not announce (they were disabled, or did not exist yet) takes a
/// fresh version: later than anything cached, so no older copy survives it, at the price of
/// a few misses.
async fn changes_of(
    txn: Transaction,
    catalog: &Catalog,
    client: &tokio_postgres::Client,
    sql: &Sql,
) -> Result<Vec<Message>, String> {
    use std::collections::{HashMap, HashSet};
    let ts = txn.commit_time_us;
    let mut out = txn.changes;
    let mut announced_deletes: HashMap<(String, String), i64> = HashMap::new();
    let mut announced_truncates: HashMap<String, i64> = HashMap::new();
    let mut announced_flushes: Vec<String> = Vec::new();
    for a in &txn.announced {
        let Some(resource) = a.get("resource").and_then(|r| r.as_str()) else {
            continue;
        };
        if let Some(deletes) = a.get("deletes").and_then(|d| d.as_array()) {
            for d in deletes {
                if let (Some(key), Some(version)) = (
                    d.get(0).and_then(|k| k.as_str()),
                    d.get(1).and_then(|v| v.as_i64()).filter(|v| *v > 0),
                ) {
                    announced_deletes.insert((resource.to_string(), key.to_string()), version);
                }
            }
        }
        if let Some(version) = a
            .get("truncate")
            .and_then(|v| v.as_i64())
            .filter(|v| *v > 0)
        {
            announced_truncates.insert(resource.to_string(), version);
        }
        // A trigger that found its table changed under it, or a table's new shape: a flush
        // at a version taken here (never one a message names: anyone may emit one, and a
        // generation raised to a forged, huge version would never rise again).
        if a.get("flush").and_then(|f| f.as_bool()) == Some(true) && catalog.knows(resource) {
            announced_flushes.push(resource.to_string());
        }
    }
    let message = |resource: &str, key: Option<String>, version: i64, op: Op| Message {
        resource: resource.to_string(),
        key,
        version,
        op,
        ts_us: ts,
        instance: None,
    };
    // Deletes and moved keys the WAL cannot name: the triggers' word is all there is.
    for ((resource, key), version) in &announced_deletes {
        if txn.unverifiable.contains(resource) {
            out.push(message(resource, Some(key.clone()), *version, Op::Delete));
        }
    }
    let mut flushed: HashSet<String> = HashSet::new();
    for (resource, key) in txn.deleted {
        if txn.unverifiable.contains(&resource) {
            continue; // announced above; unannounced ones cannot be told apart
        }
        let announced = key
            .as_ref()
            .and_then(|k| announced_deletes.get(&(resource.clone(), k.clone())));
        match (key, announced) {
            (Some(key), Some(version)) => {
                out.push(message(&resource, Some(key), *version, Op::Delete))
            }
            (Some(key), None) => {
                let version = sql.next_version(client).await?;
                out.push(message(&resource, Some(key), version, Op::Put));
            }
            (None, _) => {
                if flushed.insert(resource.clone()) {
                    let version = sql.next_version(client).await?;
                    out.push(message(&resource, None, version, Op::Flush));
                }
            }
        }
    }
    for resource in txn.truncated.into_iter().chain(txn.unkeyed) {
        if !flushed.insert(resource.clone()) {
            continue;
        }
        let version = match announced_truncates.get(&resource) {
            Some(version) => *version,
            None => sql.next_version(client).await?,
        };
        out.push(message(&resource, None, version, Op::Flush));
    }
    for resource in announced_flushes {
        if flushed.insert(resource.clone()) {
            let version = sql.next_version(client).await?;
            out.push(message(&resource, None, version, Op::Flush));
        }
    }
    Ok(out)
}

/// What a tuple says of its row's key and version.
enum Keyed {
    /// The key (canonical text) and version.
    Row(String, i64),
    /// A NULL key names no document.
    NullKey,
    /// The WAL does not carry the key or version (an unchanged TOASTed value).
    Unknown,
}

impl Mapped {
    fn key_version(&self, tuple: &[Column]) -> Keyed {
        let Some((key, version)) = self.at else {
            return Keyed::Unknown;
        };
        let (Some(key), Some(version)) = (tuple.get(key), tuple.get(version)) else {
            return Keyed::Unknown;
        };
        if *key == Column::Null {
            return Keyed::NullKey;
        }
        match (
            key.text(),
            version.text().and_then(|v| v.parse::<i64>().ok()),
        ) {
            (Some(key), Some(version)) => Keyed::Row(key.to_string(), version),
            _ => Keyed::Unknown,
        }
    }
}

fn change(
    resource: &str,
    key: Option<String>,
    version: i64,
    op: Op,
    ts_us: Option<i64>,
) -> Message {
    Message {
        resource: resource.to_string(),
        key,
        version,
        op,
        ts_us,
        instance: None,
    }
}

async fn publish(ctx: &RelayContext, relayed: Relayed) -> Result<(), String> {
    let payload = serde_json::to_string(&relayed).map_err(|e| e.to_string())?;
    ctx.tiers
        .publish(&relay_channel(&ctx.config.redis.key_prefix), payload)
        .await
        .map_err(|e| format!("publishing to instances failed: {e}"))
}

/// The relay's own SQL.
struct Sql {
    next_version: String,
}

impl Sql {
    fn new(schema: &str) -> Self {
        Sql {
            next_version: format!(
                "SELECT nextval({})",
                crate::resource::quote_literal(&format!("{schema}.{VERSION_SEQUENCE}"))
            ),
        }
    }

    /// A version newer than any taken so far.
    async fn next_version(&self, client: &tokio_postgres::Client) -> Result<i64, String> {
        Ok(client
            .query_one(&self.next_version, &[])
            .await
            .map_err(|e| format!("taking a version failed: {e}"))?
            .get(0))
    }
}

/// The timeline of the WAL being written (see [`crate::db::PostgresIdentity::timeline`]).
async fn current_timeline(client: &tokio_postgres::Client) -> Option<i32> {
    client
        .query_one(
            "SELECT ('x' || left(pg_walfile_name(pg_current_wal_lsn()), 8))::bit(32)::int",
            &[],
        )
        .await
        .ok()
        .map(|r| r.get(0))
}

/// The URL the relay connects with: `postgres.replication_url`, else `url`.
fn relay_url(config: &Config) -> &str {
    config
        .postgres
        .replication_url
        .as_deref()
        .unwrap_or(&config.postgres.url)
}

/// The host (its place in the URL's host list) `client` reached. A URL naming several hosts
/// (`postgres://u@db1,db2/app`) reaches the primary ([`crate::db::pg_config`] asks for a
/// read-write session), whichever it is since the last failover; the replication
/// connection, which takes one host, must go to the same one. Matched by the server's
/// address and port as the server sees them (`inet_server_addr()`); the first host when
/// the URL names one, or when nothing matches (a Unix socket, a proxy), with a warning.
async fn connected_host(client: &tokio_postgres::Client, config: &Config) -> usize {
    let Ok((url, _)) = PostgresTls::split(relay_url(config)) else {
        return 0;
    };
    let Ok(pg) = url.parse::<tokio_postgres::Config>() else {
        return 0;
    };
    let hosts = pg.get_hosts();
    if hosts.len() < 2 {
        return 0;
    }
    let server = client
        .query_one("SELECT host(inet_server_addr()), inet_server_port()", &[])
        .await
        .ok()
        .and_then(|r| Some((r.get::<_, Option<String>>(0)?, r.get::<_, Option<i32>>(1)?)));
    if let Some((addr, server_port)) = server {
        let addr: Option<std::net::IpAddr> = addr.parse().ok();
        for (i, host) in hosts.iter().enumerate() {
            let port = port_of(&pg, i);
            let tokio_postgres::config::Host::Tcp(name) = host else {
                continue;
            };
            if i32::from(port) != server_port {
                continue;
            }
            let lookup = tokio::net::lookup_host((name.as_str(), port));
            let resolved: Vec<std::net::IpAddr> =
                match tokio::time::timeout(config.postgres.connect_timeout, lookup).await {
                    Ok(Ok(addrs)) => addrs.map(|a| a.ip()).collect(),
                    _ => Vec::new(),
                };
            if addr.is_some_and(|a| resolved.contains(&a)) {
                return i;
            }
        }
    }
    // Behind NAT, a Service or a proxy the server sees another address: ask each host.
    if let Some(i) = first_primary(config, &pg).await {
        return i;
    }
    tracing::warn!(
        "cannot tell which of the postgres url's hosts is the primary; streaming from the \
         first (set postgres.replication_url to the primary's address)"
    );
    0
}

/// The first of `pg`'s hosts that answers as a primary (`NOT pg_is_in_recovery()`), each
/// asked on a connection of its own with the URL's user, database and TLS.
async fn first_primary(config: &Config, pg: &tokio_postgres::Config) -> Option<usize> {
    let (_, tls) = PostgresTls::split(relay_url(config)).ok()?;
    let connector = tls.connector().ok()?;
    for (i, host) in pg.get_hosts().iter().enumerate() {
        let mut one = tokio_postgres::Config::new();
        match host {
            tokio_postgres::config::Host::Tcp(h) => one.host(h),
            tokio_postgres::config::Host::Unix(p) => one.host_path(p),
        };
        one.port(port_of(pg, i))
            .connect_timeout(config.postgres.connect_timeout)
            .application_name("syncar-relay");
        if let Some(user) = pg.get_user() {
            one.user(user);
        }
        if let Some(password) = pg.get_password() {
            one.password(password);
        }
        if let Some(db) = pg.get_dbname() {
            one.dbname(db);
        }
        one.ssl_mode(pg.get_ssl_mode());
        let connect = one.connect(connector.clone());
        let Ok(Ok((client, connection))) =
            tokio::time::timeout(config.postgres.connect_timeout, connect).await
        else {
            continue;
        };
        let driver = tokio::spawn(connection);
        let primary = client
            .query_one("SELECT NOT pg_is_in_recovery()", &[])
            .await
            .is_ok_and(|r| r.get::<_, bool>(0));
        drop(client);
        let _ = driver.await;
        if primary {
            return Some(i);
        }
    }
    None
}

/// The port of host `i` (libpq: one port for every host, or one each).
fn port_of(pg: &tokio_postgres::Config, i: usize) -> u16 {
    let ports = pg.get_ports();
    match ports.len() {
        0 => 5432,
        1 => ports[0],
        _ => ports.get(i).copied().unwrap_or(5432),
    }
}

/// The replication connection's settings, from [`relay_url`], to its host `at` (see
/// [`connected_host`]).
fn replication_config(
    config: &Config,
    catalog: &Catalog,
    at: usize,
) -> Result<ReplicationConfig, String> {
    let (url, tls) =
        PostgresTls::split(relay_url(config)).map_err(|e| format!("postgres url: {e}"))?;
    let pg: tokio_postgres::Config = url.parse().map_err(|e| format!("postgres url: {e}"))?;
    let host = match pg.get_hosts().get(at) {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.to_string_lossy().into_owned(),
        None => "localhost".into(),
    };
    let port = port_of(&pg, at);
    let user = pg.get_user().unwrap_or("postgres").to_string();
    let password = pg
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let database = pg.get_dbname().unwrap_or(&user).to_string();
    let feeds = &config.feeds;
    Ok(ReplicationConfig::new(
        host,
        user,
        password,
        database,
        catalog.capture.slot.clone(),
        catalog.capture.publication.as_str(),
    )
    .with_port(port)
    .with_tls(tls.replication())
    .with_options(format!(
        "-c wal_sender_timeout={}ms",
        feeds.wal_sender_timeout.as_millis()
    ))
    .with_application_name("syncar-relay")
    // A position is confirmed to Postgres as soon as it holds (the crate sends a raised
    // position once this long has passed since its last status): a commit that waits for
    // the relay as a synchronous standby waits for the relay's work, not for a timer.
    .with_status_interval(STATUS_INTERVAL)
    .with_wakeup_interval(Duration::from_secs(1)))
}

/// Aborts a spawned task (a connection driver) when the term ends.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
