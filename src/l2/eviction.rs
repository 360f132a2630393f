//! What Redis' `maxmemory-policy` may evict of what syncar needs kept under memory pressure.
//!
//! syncar's entries may go (a miss). What must stay is what keeps an older copy from coming
//! back: the generations hash and the records (no TTL: only an `allkeys-*` policy evicts
//! them; without the generations an instance reads the entries a flush retired), and a
//! fresh tombstone (a short TTL, rarely read: the first key `volatile-ttl` evicts, a likely
//! one for `volatile-lfu`, whose new keys start with a low counter, any key to
//! `volatile-random`; without it a fill that read before a write lands after it).
//! `volatile-lru` evicts the keys with a TTL least recently used first, which a fresh
//! tombstone is not; `noeviction` refuses writes instead (syncar repairs them as after any
//! Redis failure). With `maxmemory` 0 nothing is evicted whatever the policy. See Redis'
//! "Key eviction". Read with an `INFO memory` of its own, so that a Redis or a proxy that
//! refuses it changes nothing but the warning: it is a diagnostic, never a condition of
//! trust.

use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};

use super::trust::info_field;
use super::{Conn, L2};
use crate::locks::MutexExt;

/// Why `policy` may evict what syncar needs kept, if it may; `maxmemory` in bytes (0: no
/// limit, nothing evicted). An unknown `allkeys-*` policy counts as a risk (it may evict
/// keys without a TTL); other unknown ones do not.
fn eviction_risk(policy: &str, maxmemory: u64) -> Option<&'static str> {
    if maxmemory == 0 {
        return None;
    }
    match policy {
        p if p.starts_with("allkeys-") => Some(
            "may evict keys without a TTL, syncar's generations among them: an instance could \
             then read copies a flush retired",
        ),
        "volatile-ttl" | "volatile-random" | "volatile-lfu" => {
            Some("may evict a fresh tombstone: a slow fill could then bring back an older copy")
        }
        _ => None,
    }
}

impl L2 {
    /// Reads each master's `maxmemory-policy` and `maxmemory` (`INFO memory`) and records
    /// what they mean for syncar ([`L2::eviction_warning`]), warning when it becomes a risk.
    /// A master that does not answer cannot tell: the warning then speaks of the others.
    pub(super) async fn check_eviction(&self) {
        let mut nodes: Vec<(String, Option<RoutingInfo>)> = Vec::new();
        match self.conn() {
            Conn::Node(_) => nodes.push((self.node(), None)),
            Conn::Cluster(_) => {
                let Ok(shards) = self.shards().await else {
                    return;
                };
                for shard in shards {
                    let node = format!("{}:{}", shard.host, shard.port);
                    let at = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                        host: shard.host,
                        port: shard.port,
                    });
                    nodes.push((node, Some(at)));
                }
            }
        }
        let mut warning = None;
        for (node, at) in nodes {
            let mut info = redis::cmd("INFO");
            info.arg("memory");
            let mut conn = self.conn();
            let reply = match (&mut conn, at) {
                (Conn::Cluster(c), Some(at)) => {
                    tokio::time::timeout(self.timeout, c.route_command(info, at))
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .and_then(|v| redis::from_redis_value::<String>(v).ok())
                }
                _ => tokio::time::timeout(self.timeout, info.query_async::<String>(&mut conn))
                    .await
                    .ok()
                    .and_then(Result::ok),
            };
            let Some(text) = reply else {
                continue;
            };
            let policy = info_field(&text, "maxmemory_policy").unwrap_or_default();
            let maxmemory = info_field(&text, "maxmemory")
                .and_then(|m| m.parse().ok())
                .unwrap_or(0);
            if let Some(why) = eviction_risk(&policy, maxmemory) {
                warning = Some(format!(
                    "redis at {node} has maxmemory-policy {policy}, which {why}; set it to \
                     noeviction or volatile-lru (README \"Redis' memory\")"
                ));
                break;
            }
        }
        let mut current = self.eviction.locked();
        if warning.is_some() && *current != warning {
            tracing::warn!(
                warning = warning.as_deref().unwrap_or_default(),
                "redis may evict what syncar needs"
            );
        }
        *current = warning;
    }
}

#[cfg(test)]
mod tests {
    use super::eviction_risk;

    #[test]
    fn only_policies_that_can_evict_bookkeeping_or_tombstones_are_risks() {
        const MB: u64 = 1 << 20;
        for safe in ["noeviction", "volatile-lru", "volatile-lrm"] {
            assert_eq!(eviction_risk(safe, 100 * MB), None, "{safe}");
        }
        for risky in [
            "allkeys-lru",
            "allkeys-lfu",
            "allkeys-random",
            "allkeys-lrm",
            "volatile-ttl",
            "volatile-random",
            "volatile-lfu",
        ] {
            assert!(eviction_risk(risky, 100 * MB).is_some(), "{risky}");
            assert_eq!(eviction_risk(risky, 0), None, "{risky} without maxmemory");
        }
    }
}
