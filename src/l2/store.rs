//! The store: reading entries, and offering copies through the versioned scripts (one key,
//! many keys, with or without the message that tells the other instances), and dropping the
//! whole prefix.

use std::time::Duration;

use bytes::Bytes;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{AsyncCommands, Value};

use crate::model::{CacheKey, Cached, State, Version};

use super::{Conn, L2Error, Stored, L2};

impl L2 {
    /// The copy Redis holds for `key`, tombstones included.
    ///
    /// # Errors
    /// [`L2Error::Skipped`] while the breaker is open, or the command's failure.
    pub async fn get(&self, key: &CacheKey) -> Result<Option<Cached>, L2Error> {
        if !self.available() || !self.trusted() {
            return Err(L2Error::Skipped);
        }
        let mut conn = self.conn();
        let redis_key = self.redis_key(key);
        let raw: Option<Vec<u8>> = self.run("get", conn.get(&redis_key)).await?;
        raw.map(|raw| decode(&raw).ok_or_else(|| L2Error::Corrupt(key.to_string())))
            .transpose()
    }

    /// What Redis holds for each of `keys`, each in the generation given with it, in one
    /// `MGET`; `None` for a key it does not hold.
    ///
    /// # Errors
    /// [`L2Error::Skipped`] while the breaker is open or Redis is not trusted, or the
    /// command's failure.
    pub async fn get_many(
        &self,
        keys: &[(&CacheKey, i64)],
    ) -> Result<Vec<Option<Cached>>, L2Error> {
        if !self.available() || !self.trusted() {
            return Err(L2Error::Skipped);
        }
        let names: Vec<String> = keys
            .iter()
            .map(|(key, generation)| self.redis_key_in(*generation, key))
            .collect();
        let mut conn = self.conn();
        let raw: Vec<Option<Vec<u8>>> = self
            .run("get", redis::cmd("MGET").arg(&names).query_async(&mut conn))
            .await?;
        raw.into_iter()
            .zip(keys)
            .map(|(raw, (key, _))| {
                raw.map(|raw| decode(&raw).ok_or_else(|| L2Error::Corrupt(key.to_string())))
                    .transpose()
            })
            .collect()
    }

    /// What Redis holds for `key` in its resource's current generation, and its time to
    /// live in ms (`PTTL`: -1 for none), for the debug view. Tries Redis even while reads
    /// skip it.
    ///
    /// # Errors
    /// The command's failure, or an unreadable entry.
    pub async fn inspect(&self, key: &CacheKey) -> Result<Option<(Cached, i64)>, L2Error> {
        let mut conn = self.conn();
        let redis_key = self.redis_key(key);
        let (raw, ttl_ms): (Option<Vec<u8>>, i64) = self
            .run(
                "get",
                redis::pipe()
                    .get(&redis_key)
                    .pttl(&redis_key)
                    .query_async(&mut conn),
            )
            .await?;
        raw.map(|raw| {
            decode(&raw)
                .map(|copy| (copy, ttl_ms))
                .ok_or_else(|| L2Error::Corrupt(key.to_string()))
        })
        .transpose()
    }

    /// Stores `copy` for `ttl` unless Redis holds a copy of the same rank or newer.
    /// Returns whether it was applied.
    ///
    /// Tries Redis even while reads skip it: writes are how it gets repaired.
    ///
    /// # Errors
    /// The command's failure; the caller decides whether to queue a repair.
    pub async fn offer(
        &self,
        key: &CacheKey,
        copy: &Cached,
        ttl: Duration,
    ) -> Result<bool, L2Error> {
        let generation = self.generation(key.resource());
        Ok(self
            .offer_and_publish(generation, key, copy, ttl, "")
            .await?
            == Stored::Applied)
    }

    /// [`L2::offer`] of a copy read while `generation` was the resource's (captured with
    /// [`L2::generation`] before reading), telling why it was not applied. A copy read before
    /// a flush lands in the generation it was read in, where nobody reads any more.
    ///
    /// # Errors
    /// The command's failure.
    pub async fn offer_checked(
        &self,
        generation: i64,
        key: &CacheKey,
        copy: &Cached,
        ttl: Duration,
    ) -> Result<Stored, L2Error> {
        self.offer_and_publish(generation, key, copy, ttl, "").await
    }

    /// [`L2::offer_checked`], and publish `message` on the invalidation channel in the same
    /// round trip (whether or not the copy was applied: other instances must hear of the
    /// write).
    ///
    /// # Errors
    /// The command's failure: neither happened, or both did and the answer was lost.
    pub async fn offer_and_publish(
        &self,
        generation: i64,
        key: &CacheKey,
        copy: &Cached,
        ttl: Duration,
        message: &str,
    ) -> Result<Stored, L2Error> {
        let channel = self.channel_of(key);
        self.offer_then_publish(generation, key, copy, ttl, &channel, message)
            .await
    }

    /// Whether [`L2::offer_many`] can be used (with a message on any channel): not in a
    /// cluster, where a script's keys must share a hash slot and it may publish only on a
    /// sharded channel of that slot.
    pub fn publishes_anywhere(&self) -> bool {
        self.cluster.is_none()
    }

    /// [`L2::offer`] of many keys, each in its resource's current generation, in one script
    /// call, then `message` published on `channel` in the same call when it is not empty.
    /// Only where [`L2::publishes_anywhere`] (one node: a script may name keys of any slot).
    /// Returns how many were applied (the others: Redis held as new or newer).
    ///
    /// # Errors
    /// The command's failure: none of it happened, or all of it did and the answer was lost.
    pub async fn offer_many(
        &self,
        copies: &[(CacheKey, Cached, Duration)],
        channel: &str,
        message: &str,
    ) -> Result<u64, L2Error> {
        debug_assert!(self.publishes_anywhere());
        let mut conn = self.conn();
        let mut invocation = self.offer_many_script.prepare_invoke();
        invocation
            .arg(channel)
            .arg(message)
            .arg(self.publish_command());
        for (key, copy, ttl) in copies {
            let (kind, body, ttl_ms) = script_args(copy, *ttl);
            invocation
                .key(self.redis_key_in(self.generation(key.resource()), key))
                .arg(copy.version.0)
                .arg(kind)
                .arg(body)
                .arg(ttl_ms);
        }
        self.run("offer_many", invocation.invoke_async(&mut conn))
            .await
    }

    pub(super) async fn offer_then_publish(
        &self,
        generation: i64,
        key: &CacheKey,
        copy: &Cached,
        ttl: Duration,
        channel: &str,
        message: &str,
    ) -> Result<Stored, L2Error> {
        let mut conn = self.conn();
        let (kind, body, ttl_ms) = script_args(copy, ttl);
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(self.redis_key_in(generation, key))
            .arg(copy.version.0)
            .arg(kind)
            .arg(body)
            .arg(ttl_ms)
            .arg(channel)
            .arg(message)
            .arg(self.publish_command());
        let outcome: i64 = self
            .run("offer", invocation.invoke_async(&mut conn))
            .await?;
        Ok(match outcome {
            1 => Stored::Applied,
            2 => Stored::AlreadyHeld,
            _ => Stored::Newer,
        })
    }

    /// Deletes every key under this instance's prefix (SCAN + UNLINK), for when too many
    /// repairs were lost to track them one by one. Returns how many keys it removed.
    ///
    /// # Errors
    /// The first failing command.
    pub async fn flush_prefix(&self) -> Result<u64, L2Error> {
        let mut conn = self.conn();
        let pattern = format!("{}*", escape_glob(&self.prefix));
        // Where each SCAN goes: the one node, or each master by address (a cluster's SCAN
        // sees one node's keys). The UNLINKs need no routing: the cluster client splits a
        // multi-key command by slot.
        let nodes: Vec<Option<RoutingInfo>> = match conn {
            Conn::Node(_) => vec![None],
            Conn::Cluster(_) => self
                .shards()
                .await?
                .into_iter()
                .map(|shard| {
                    Some(RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                        host: shard.host,
                        port: shard.port,
                    }))
                })
                .collect(),
        };
        let mut removed = 0;
        for node in nodes {
            let mut cursor: u64 = 0;
            loop {
                let mut scan = redis::cmd("SCAN");
                scan.arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000);
                let reply: Value = match (&mut conn, &node) {
                    (Conn::Cluster(c), Some(at)) => {
                        self.run("flush", c.route_command(scan, at.clone())).await?
                    }
                    _ => self.run("flush", scan.query_async(&mut conn)).await?,
                };
                let (next, keys): (u64, Vec<Vec<u8>>) = redis::from_redis_value(reply)
                    .map_err(|e| L2Error::Redis(format!("SCAN reply: {e}")))?;
                if !keys.is_empty() {
                    let n: u64 = self
                        .run(
                            "flush",
                            redis::cmd("UNLINK").arg(&keys).query_async(&mut conn),
                        )
                        .await?;
                    removed += n;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(removed)
    }
}

/// Parses `{version}:{kind}:{at_ms}:{document}`.
/// A copy as the offer scripts take it: its kind (`v`, `a` or `i`), `{at_ms}:{document}`,
/// and the TTL in ms (at least 1). See the module's "Encoding".
fn script_args(copy: &Cached, ttl: Duration) -> (&'static str, Vec<u8>, u64) {
    let (kind, doc): (&str, &[u8]) = match &copy.state {
        State::Value(doc) => ("v", doc),
        State::Absent => ("a", b""),
        State::Invalidated => ("i", b""),
    };
    let mut body = Vec::with_capacity(doc.len() + 16);
    body.extend_from_slice(copy.at_ms.to_string().as_bytes());
    body.push(b':');
    body.extend_from_slice(doc);
    let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
    (kind, body, ttl_ms)
}

fn decode(raw: &[u8]) -> Option<Cached> {
    let mut parts = raw.splitn(4, |&b| b == b':');
    let version: i64 = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    let kind = parts.next()?;
    let at_ms: u64 = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    let doc = parts.next()?;
    let version = Version(version);
    let mut copy = match kind {
        b"v" => Cached::value(version, Bytes::copy_from_slice(doc)),
        b"a" => Cached::absent(version),
        b"i" => Cached::invalidated(version),
        _ => return None,
    };
    copy.at_ms = at_ms;
    Some(copy)
}

/// Escapes Redis glob characters in a literal prefix.
fn escape_glob(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_decode() {
        let v = decode(b"42:v:1700000000000:{\"a\":1}").unwrap();
        assert_eq!(
            v,
            Cached::value(Version(42), Bytes::from_static(b"{\"a\":1}"))
        );
        assert_eq!(v.at_ms, 1_700_000_000_000);
        assert_eq!(decode(b"7:a:1:"), Some(Cached::absent(Version(7))));
        assert_eq!(decode(b"9:i:1:"), Some(Cached::invalidated(Version(9))));
        assert_eq!(decode(b"nonsense"), None);
        assert_eq!(decode(b"1:z:1:"), None);
        assert_eq!(decode(b"1:v:x:{}"), None);
    }

    #[test]
    fn glob_characters_are_escaped() {
        assert_eq!(escape_glob("a*b?[c]"), "a\\*b\\?\\[c\\]");
    }
}
