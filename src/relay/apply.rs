//! Applying committed changes to Redis and publishing them on the relay's channel, where
//! every instance hears them. Knows nothing of what is acknowledged to Postgres.

use pgwire_replication::Lsn;

use crate::coherence::{Message, Op, Relayed};
use crate::feed::relayed::relay_channel;
use crate::resource::Catalog;
use crate::telemetry::RELAY_CHANGES;

use super::context::RelayContext;
use super::error::RelayError;

/// Changes per published message: a statement changing 50 000 rows is published in pieces.
const CHANGES_PER_MESSAGE: usize = 1000;

/// Publishes `relayed` on the relay's channel.
///
/// # Errors
/// Encoding or Redis failing.
pub(super) async fn publish(ctx: &RelayContext, relayed: Relayed) -> Result<(), RelayError> {
    let payload = serde_json::to_string(&relayed).map_err(RelayError::Encode)?;
    ctx.redis
        .publish(&relay_channel(&ctx.config.redis.key_prefix), payload)
        .await
        .map_err(|source| RelayError::Redis {
            doing: "publishing to instances",
            source,
        })
}

/// Applies `changes` (not empty), everything committed up to `lsn`, to Redis, then
/// publishes them: in one message with the last change when they fit one (one round trip
/// sooner), else in pieces of [`CHANGES_PER_MESSAGE`] once all of Redis is applied, only
/// the last carrying `lsn`.
///
/// # Errors
/// Encoding or Redis failing.
pub(super) async fn apply_and_publish(
    ctx: &RelayContext,
    catalog: &Catalog,
    changes: &[Message],
    lsn: Lsn,
) -> Result<(), RelayError> {
    let applying = |source| RelayError::Redis {
        doing: "applying changes to redis",
        source,
    };
    let channel = relay_channel(&ctx.config.redis.key_prefix);
    let whole = (changes.len() <= CHANGES_PER_MESSAGE)
        .then(|| {
            serde_json::to_string(&Relayed::Changes {
                changes: changes.to_vec(),
                lsn: Some(lsn.to_string()),
            })
        })
        .transpose()
        .map_err(RelayError::Encode)?;
    let published = match &whole {
        Some(message) => ctx
            .redis
            .changes()
            .apply_and_publish(catalog, changes, &channel, message)
            .await
            .map_err(applying)?,
        None => {
            ctx.redis
                .changes()
                .apply(catalog, changes)
                .await
                .map_err(applying)?;
            false
        }
    };
    count(changes);
    let pieces = changes.len().div_ceil(CHANGES_PER_MESSAGE);
    let unpublished = if published { &[][..] } else { changes };
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
    Ok(())
}

/// Counts relayed changes by operation.
fn count(changes: &[Message]) {
    for m in changes {
        let op = match m.op {
            Op::Put => "put",
            Op::Delete => "delete",
            Op::Flush => "flush",
        };
        metrics::counter!(RELAY_CHANGES, "op" => op).increment(1);
    }
}
