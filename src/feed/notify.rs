//! The Postgres feed with NOTIFY (`feeds.postgres_source = "notify"`): a LISTEN loop on a
//! connection of its own (never from the pool: the pool drops notifications and its recycling
//! runs `UNLISTEN *`), turning notifications into invalidations, with a heartbeat through the
//! same path. Knows nothing about HTTP.
//!
//! Notifications arrive at commit, for every writer (the triggers fire for plain SQL too), so
//! this feed also repairs Redis after writes that never went through syncar.

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::types::Type;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use super::context::FeedContext;
use super::driver::{connect_postgres, handle_message, on_heartbeat, AbortOnDrop, Phase, Source};
use super::error::FeedError;
use crate::backoff::ticker;
use crate::coherence::Message;
use crate::coherence::{mono_ms, Feed};
use crate::config::PostgresSource;
use crate::db::connect_dedicated;
use crate::model::SequenceBound;
use crate::resource::quote_ident;
use crate::schema::capture::STATE_TABLE;
use crate::schema::shape::ShapeCheck;
use crate::schema::{last_value_sql, NOTIFY_CHANNEL};

/// Why the feed went down when no heartbeat came back since its LISTEN although each was
/// sent: behind a pooler in transaction pooling, LISTEN runs in a server session the
/// connection only borrowed for that statement, and notifications from other sessions reach
/// it while no client holds it, where the pooler drops them.
const NEVER_BACK: &str = "no heartbeat came back since LISTEN (if postgres.listen_url, or \
     postgres.url without it, leads to a pooler in transaction pooling, LISTEN has no session \
     of its own there and notifications are dropped: point postgres.listen_url at a session \
     pool or at Postgres; README \"Behind PgBouncer\")";

/// The LISTEN source, with this process's heartbeat channel.
pub struct Notify {
    heartbeat_channel: String,
    /// What the version sequence was last seen at: vouches for the versions notifications
    /// name (anyone who can connect may NOTIFY).
    bound: SequenceBound,
}

impl Notify {
    pub fn new(ctx: &FeedContext) -> Self {
        Notify {
            heartbeat_channel: format!("syncar_hb_{}", ctx.feed_id),
            bound: SequenceBound::default(),
        }
    }
}

/// Whether the version a notification names is one the sequence reached (see
/// [`SequenceBound`]): read again only when it is beyond what it was last seen at plus the
/// slack. A payload that does not parse passes, for [`handle_message`] to count.
///
/// # Errors
/// Reading the sequence failed.
async fn vouched(
    client: &tokio_postgres::Client,
    last_value_sql: &str,
    bound: &SequenceBound,
    payload: &str,
) -> Result<bool, tokio_postgres::Error> {
    let Ok(message) = Message::parse(payload.as_bytes()) else {
        return Ok(true);
    };
    let read = async {
        let row = client.query_typed_one(last_value_sql, &[]).await?;
        Ok::<i64, tokio_postgres::Error>(row.get(0))
    };
    match bound.reach(message.version, read).await? {
        Some(last) if message.version > last => {
            tracing::warn!(
                version = message.version,
                sequence = last,
                "ignored a notification naming a version the version sequence never reached (forged?)"
            );
            Ok(false)
        }
        _ => Ok(true),
    }
}

impl Source for Notify {
    const FEED: Feed = Feed::Postgres;

    /// Connect, LISTEN, apply notifications; a heartbeat that stops coming back ends the
    /// session.
    async fn session(
        &mut self,
        ctx: &FeedContext,
        shutdown: &CancellationToken,
        last_good: Option<u64>,
    ) -> Result<(), FeedError> {
        let config = &ctx.config;
        let heartbeat_channel = self.heartbeat_channel.as_str();
        let (client, mut connection) = connect_postgres(ctx).await?;

        // The connection is driven here; notifications go through a channel. The task ends
        // with the connection, and is aborted with this session.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(n)) => {
                        if tx.send(n).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(feed = "postgres", error = %e, "listen connection failed");
                        return;
                    }
                }
            }
        });
        let _driver = AbortOnDrop(driver);

        let lease = config.feeds.lease;
        tokio::time::timeout(
            lease,
            client.batch_execute(&format!(
                "LISTEN {NOTIFY_CHANNEL}; LISTEN {heartbeat_channel}"
            )),
        )
        .await
        .map_err(|_| FeedError::Timeout { what: "LISTEN" })?
        .map_err(|source| FeedError::Postgres {
            what: "LISTEN",
            source,
        })?;
        // The heartbeat leaves from another session (on the same URL): it reaches the
        // listener as a customer's notification does. Sent on the listening session itself,
        // Postgres would hand it back at the end of its own transaction, which proves nothing
        // about notifications from elsewhere: behind a pooler in transaction pooling those
        // reach a server session that no client holds, and are dropped ("got packet 'A' from
        // server when not linked"), while its own came back every time. (Through such a
        // pool this connection's statement may even run in the listening server session:
        // its notification then goes to this connection, not to the listener.)
        let postgres = &config.postgres;
        let (sender, sender_connection) =
            connect_dedicated(postgres, postgres.listen_url.as_deref(), "syncar-heartbeat")
                .await
                .map_err(FeedError::Connect)?;
        let _sender_driver = AbortOnDrop(tokio::spawn(sender_connection));

        let heartbeat_sql = format!(
            "SELECT pg_catalog.pg_notify($1::text, $2::text) FROM {}.{STATE_TABLE} \
             WHERE name = 'source' AND value = 'notify'",
            quote_ident(&config.postgres.schema)
        );
        let last_value_sql = last_value_sql(&config.postgres.schema);
        let feed_state = &ctx.coherence.postgres;
        feed_state.grant(lease);
        let mut phase = Phase::Connecting;
        let mut tick = ticker(config.feeds.heartbeat_interval);
        let mut shapes = ShapeCheck::new(lease / 2);
        // The last heartbeat query found the schema migrated for another source.
        let mut unsent = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tick.tick() => {
                    shapes.run(&client, config, PostgresSource::Notify, lease).await;
                    if mono_ms() > feed_state.valid_until() {
                        let what = if unsent {
                            "heartbeat not sent: the schema is no longer migrated for notify"
                        } else if matches!(phase, Phase::Connecting) {
                            NEVER_BACK
                        } else {
                            "heartbeat not back"
                        };
                        return Err(FeedError::Silent { what, lease });
                    }
                    // Bounded so a half-open socket cannot stall the loop; the lease decides.
                    // Sent only while the schema is migrated for NOTIFY: once another instance
                    // migrated it to another source, the triggers notify nothing, and the
                    // missing heartbeats take this feed down. Unnamed and typed: one round
                    // trip, and nothing a pooler could send to another session by name.
                    let payload = mono_ms().to_string();
                    let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 2] =
                        [(&heartbeat_channel, Type::TEXT), (&payload, Type::TEXT)];
                    let send = sender.query_typed_opt(&heartbeat_sql, &params);
                    match tokio::time::timeout(config.feeds.heartbeat_interval, send).await {
                        Ok(Err(source)) => return Err(FeedError::Postgres { what: "heartbeat", source }),
                        Ok(Ok(row)) => unsent = row.is_none(),
                        Err(_) => {}
                    }
                }
                notification = rx.recv() => {
                    let Some(n) = notification else {
                        return Err(FeedError::Closed("listen connection"));
                    };
                    if n.channel() == heartbeat_channel {
                        on_heartbeat(ctx, Feed::Postgres, &mut phase, n.payload().as_bytes(), last_good)
                            .await?;
                    } else if vouched(&client, &last_value_sql, &self.bound, n.payload())
                        .await
                        .map_err(|source| FeedError::Postgres { what: "reading the version sequence", source })?
                    {
                        handle_message(ctx, Feed::Postgres, n.payload().as_bytes()).await;
                    }
                }
            }
        }
    }
}
