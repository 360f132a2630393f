//! Trust and identity: which incarnation of Redis this is (`run_id`, per master in a
//! cluster), whether reads may trust it, and what syncar records in Redis about Postgres.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{AsyncCommands, Value};

use crate::locks::MutexExt;
use crate::tls::with_hint;

use super::{Conn, L2Error, RedisIdentity, Shard, L2};

impl L2 {
    /// Which Redis process answers; see [`RedisIdentity`].
    ///
    /// # Errors
    /// The command's failure (a refused `INFO` is not one: `run_id` is then `None`).
    pub async fn identity(&self) -> Result<RedisIdentity, L2Error> {
        // A diagnostic beside the identity, whatever the identity turns out to be.
        self.check_eviction().await;
        if let Conn::Cluster(conn) = self.conn() {
            return self.cluster_identity(conn).await;
        }
        let mut conn = self.conn();
        let info: redis::RedisResult<String> = tokio::time::timeout(
            self.timeout,
            redis::cmd("INFO")
                .arg("server")
                .arg("replication")
                .arg("cluster")
                .query_async(&mut conn),
        )
        .await
        .map_err(|_| L2Error::Timeout(self.timeout))?;
        let info = match info {
            Ok(info) => info,
            Err(e) if info_refused(&e) => return Ok(RedisIdentity::unknown()),
            Err(e) => {
                self.distrust();
                return Err(L2Error::Redis(with_hint(e.to_string(), &e)));
            }
        };
        let field = |name: &str| info_field(&info, name);
        // Commands for keys of other nodes' slots would fail with MOVED: never trusted.
        let misfit = (field("cluster_enabled").as_deref() == Some("1")).then(|| {
            format!(
                "{} is a Redis Cluster node: set redis.mode = \"cluster\"",
                self.node()
            )
        });
        *self.misfit.locked() = misfit.clone();
        if let Some(misfit) = misfit {
            return Err(L2Error::Redis(misfit));
        }
        Ok(RedisIdentity {
            run_id: field("run_id"),
            role: field("role").unwrap_or_default(),
            replid: field("master_replid").unwrap_or_default(),
            repl_offset: field("master_repl_offset")
                .and_then(|o| o.parse().ok())
                .unwrap_or(0),
        })
    }

    /// A cluster's identity: `INFO` from each master that `CLUSTER SLOTS` names now, as one
    /// [`RedisIdentity`] whose `run_id` lists each master's `host:port=run_id`, sorted, so a
    /// failover or restart of any shard makes it a new incarnation.
    ///
    /// The masters are taken from a fresh `CLUSTER SLOTS`, not from the cluster client's
    /// routing table, which follows a failover only when a command meets `MOVED`: a key of
    /// each shard is touched first (`EXISTS`, routed by slot) so that the client learns of a
    /// move before `INFO` is sent to each master by address.
    ///
    /// # Errors
    /// A master that cannot be asked, or one that does not answer `role:master` (the layout
    /// is changing): the caller keeps Redis distrusted and asks again.
    pub(super) async fn cluster_identity(
        &self,
        mut conn: ClusterConnection,
    ) -> Result<RedisIdentity, L2Error> {
        let shards = self.shards().await?;
        let mut run_ids = Vec::with_capacity(shards.len());
        let mut repl_offset = 0;
        for shard in &shards {
            let node = format!("{}:{}", shard.host, shard.port);
            if let Some(b) = shard.bucket() {
                let probe = format!("{}{{{b}}}", self.prefix);
                let _: i64 = self
                    .run(
                        "info",
                        redis::cmd("EXISTS").arg(probe).query_async(&mut conn),
                    )
                    .await?;
            }
            let mut info = redis::cmd("INFO");
            info.arg("server").arg("replication");
            let at = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                host: shard.host.clone(),
                port: shard.port,
            });
            let text = match tokio::time::timeout(self.timeout, conn.route_command(info, at)).await
            {
                Err(_) => return Err(L2Error::Timeout(self.timeout)),
                Ok(Ok(reply)) => redis::from_redis_value::<String>(reply)
                    .map_err(|e| L2Error::Redis(format!("INFO on {node}: {e}")))?,
                Ok(Err(e)) if info_refused(&e) => return Ok(RedisIdentity::unknown()),
                Ok(Err(e)) => {
                    self.distrust();
                    return Err(L2Error::Redis(format!("INFO on {node}: {e}")));
                }
            };
            let role = info_field(&text, "role").unwrap_or_default();
            if role != "master" {
                self.distrust();
                return Err(L2Error::Redis(format!(
                    "{node}, named master by CLUSTER SLOTS, says role:{role}: the layout is changing"
                )));
            }
            repl_offset += info_field(&text, "master_repl_offset")
                .and_then(|o| o.parse::<i64>().ok())
                .unwrap_or(0);
            let run_id = info_field(&text, "run_id").unwrap_or_default();
            run_ids.push(format!("{node}={run_id}"));
        }
        run_ids.sort();
        Ok(RedisIdentity {
            run_id: Some(run_ids.join(",")),
            role: "master".into(),
            replid: format!("{} masters", run_ids.len()),
            repl_offset,
        })
    }

    /// The masters of the cluster and the hash slots each serves (`CLUSTER SLOTS`, asked of
    /// any node). Empty outside `redis.mode = "cluster"`.
    ///
    /// # Errors
    /// The command's failure, or a reply of an unexpected shape.
    pub async fn shards(&self) -> Result<Vec<Shard>, L2Error> {
        let Conn::Cluster(mut conn) = self.conn() else {
            return Ok(Vec::new());
        };
        let reply: Value = self
            .run(
                "slots",
                conn.route_command(
                    redis::cmd("CLUSTER").arg("SLOTS").clone(),
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
                ),
            )
            .await?;
        parse_cluster_slots(reply).ok_or_else(|| {
            L2Error::Redis(
                "CLUSTER SLOTS gives no usable address for some master (an unknown endpoint, \
                 as with cluster-preferred-endpoint-type unknown-endpoint, is not supported)"
                    .into(),
            )
        })
    }

    /// What the fleet recorded about Postgres in `{prefix}postgres`: `system`, `timeline`,
    /// `high_water` (the highest version any instance reported seeing).
    ///
    /// # Errors
    /// The command's failure.
    pub async fn postgres_record(&self) -> Result<HashMap<String, String>, L2Error> {
        let mut conn = self.conn();
        self.run("postgres", conn.hgetall(self.postgres_key()))
            .await
    }

    /// Records which Postgres answers (`system`, `timeline`; `None` leaves a field alone) and
    /// raises the recorded high-water version to at least `high_water`.
    ///
    /// # Errors
    /// The command's failure.
    pub async fn record_postgres(
        &self,
        system: Option<&str>,
        timeline: Option<i32>,
        high_water: i64,
    ) -> Result<(), L2Error> {
        let mut conn = self.conn();
        let key = self.postgres_key();
        let mut fields: Vec<(&str, String)> = Vec::new();
        if let Some(system) = system {
            fields.push(("system", system.to_string()));
        }
        if let Some(timeline) = timeline {
            fields.push(("timeline", timeline.to_string()));
        }
        if !fields.is_empty() {
            let _: i64 = self
                .run("postgres", conn.hset_multiple(&key, &fields))
                .await?;
        }
        self.raise_high_water(high_water).await
    }

    /// Records that on `timeline` the relay's slot was a failover slot and the primary held
    /// logical decoding back for a standby (`synchronized_standby_slots`): a standby
    /// promoted from that timeline with a synchronized copy of the slot lacks nothing the
    /// relay relayed (see `Guards::secure_postgres`). Field `failover_guarded:{timeline}` of
    /// the Postgres record.
    ///
    /// # Errors
    /// The command's failure.
    pub async fn record_failover_guarded(&self, timeline: i32) -> Result<(), L2Error> {
        let mut conn = self.conn();
        let key = self.postgres_key();
        let field = format!("failover_guarded:{timeline}");
        let _: i64 = self.run("postgres", conn.hset(&key, field, "1")).await?;
        Ok(())
    }

    /// Raises the recorded high-water version to at least `version`.
    ///
    /// # Errors
    /// The command's failure.
    pub async fn raise_high_water(&self, version: i64) -> Result<(), L2Error> {
        let mut conn = self.conn();
        let mut invocation = self.raise_script.prepare_invoke();
        invocation
            .key(self.postgres_key())
            .arg("high_water")
            .arg(version);
        let _: String = self
            .run("postgres", invocation.invoke_async(&mut conn))
            .await?;
        Ok(())
    }

    pub(super) fn postgres_key(&self) -> String {
        format!("{}postgres", self.prefix)
    }

    /// Whether reads may use Redis now: see [`L2::trust`].
    pub fn trusted(&self) -> bool {
        self.trusted.load(Ordering::SeqCst)
    }

    /// The `run_id` trusted last, if any.
    pub fn incarnation(&self) -> Option<String> {
        self.incarnation.locked().clone()
    }

    /// Reads may use Redis again: it is the incarnation `run_id` (checked, or made safe by
    /// raising every generation), unless a failure came after the check began (`checked`,
    /// from [`L2::distrusts`] before it): then it stays distrusted and the guard checks again.
    pub fn trust(&self, run_id: Option<&str>, checked: u64) {
        *self.incarnation.locked() = run_id.map(String::from);
        if self.distrusts.load(Ordering::SeqCst) == checked {
            self.trusted.store(true, Ordering::SeqCst);
        } else {
            self.distrusted.notify_one();
        }
    }

    /// How many times Redis was distrusted so far (see [`L2::trust`]).
    pub fn distrusts(&self) -> u64 {
        self.distrusts.load(Ordering::SeqCst)
    }

    /// Reads skip Redis until the guard has checked which incarnation answers.
    pub fn distrust(&self) {
        self.distrusts.fetch_add(1, Ordering::SeqCst);
        if self.trusted.swap(false, Ordering::SeqCst) {
            self.distrusted.notify_one();
        }
    }

    /// Completes when trust is lost (one waiter: the Redis guard).
    pub async fn distrusted(&self) {
        self.distrusted.notified().await;
    }
}

/// Whether `INFO` was refused (an ACL without it, or a managed service that renamed it): the
/// incarnation then cannot be known.
fn info_refused(e: &redis::RedisError) -> bool {
    e.code() == Some("NOPERM") || e.to_string().to_lowercase().contains("unknown command")
}

/// Field `name` of an `INFO` reply.
pub(super) fn info_field(info: &str, name: &str) -> Option<String> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
}

/// `CLUSTER SLOTS`: `[[start, end, [host, port, id, ...], replicas...], ...]`, grouped by
/// master.
fn parse_cluster_slots(reply: Value) -> Option<Vec<Shard>> {
    let Value::Array(ranges) = reply else {
        return None;
    };
    let mut shards: Vec<Shard> = Vec::new();
    for range in ranges {
        let Value::Array(range) = range else {
            return None;
        };
        let mut range = range.into_iter();
        let start: u16 = redis::from_redis_value(range.next()?).ok()?;
        let end: u16 = redis::from_redis_value(range.next()?).ok()?;
        let Value::Array(master) = range.next()? else {
            return None;
        };
        let mut master = master.into_iter();
        // NULL, "" or "?" (`cluster-preferred-endpoint-type unknown-endpoint`, or a node
        // that does not know its address): not supported, the caller says so.
        let host: String = redis::from_redis_value(master.next()?).ok()?;
        if host.is_empty() || host == "?" {
            return None;
        }
        let port: u16 = redis::from_redis_value(master.next()?).ok()?;
        match shards.iter_mut().find(|s| s.host == host && s.port == port) {
            Some(shard) => shard.slots.push((start, end)),
            None => shards.push(Shard {
                host,
                port,
                slots: vec![(start, end)],
            }),
        }
    }
    Some(shards)
}
