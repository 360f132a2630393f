//! L2: Redis, shared by every instance. Entries carry their version; every write goes through
//! one Lua script that applies a copy only when it is newer, so a slow reader's late fill can
//! never bring old data back. Knows nothing about Postgres.
//!
//! # Encoding
//! One string per key, `{version}:{kind}:{at_ms}:{document}`, where kind is `v` (value), `a`
//! (absent: deleted at that version, or never seen at version 0) or `i` (tombstone left by an
//! invalidation), and `at_ms` is when the copy left Postgres (for `Age`). Versions are compared as decimal strings inside the script, exactly, with
//! no float rounding.
//!
//! # Generations
//! A resource-wide flush (a TRUNCATE, a replication slot that lost changes) raises the
//! resource's generation instead of deleting keys: a key of generation `g > 0` is
//! `{prefix}{resource}@{g}:{key}`, so every entry of an older generation is out of reach at
//! once, and a slow fill that read before the flush lands under the old name, where nobody
//! reads it. Old entries expire by their TTLs. Generations are versions (the flush's), kept
//! in the hash `{prefix}generations` and raised only, so every instance that hears of a
//! flush agrees on the new one.
//!
//! # Failures
//! Every command has a deadline. After a failure, reads skip Redis for
//! `redis.retry_interval` (a breaker), so an outage costs one timeout, not one per request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::io::tcp::{socket2, TcpSettings};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{AsyncCommands, IntoConnectionInfo, Script};

use crate::config::{RedisConfig, RedisMode};
use crate::model::{CacheKey, Cached, State, Version};
use crate::telemetry::REDIS_ERRORS;
use crate::tls::{redis_certificates, with_hint};

/// Applies `ARGV` (version, kind, document, ttl ms) to `KEYS[1]` if it ranks above what is
/// there, then, when `ARGV[6]` is not empty, publishes it on channel `ARGV[5]` (one round
/// trip for a write's Redis update and its invalidation message). Returns 1 when applied, 0
/// when Redis holds a newer version, 2 when it holds this version already.
const OFFER_SCRIPT: &str = r"
if ARGV[6] ~= '' then
  redis.call('PUBLISH', ARGV[5], ARGV[6])
end
local cur = redis.call('GET', KEYS[1])
if cur then
  local sep = string.find(cur, ':', 1, true)
  if sep then
    local cv = string.sub(cur, 1, sep - 1)
    local nv = ARGV[1]
    local cmp
    if #cv ~= #nv then
      cmp = (#nv > #cv) and 1 or -1
    elseif nv == cv then
      cmp = 0
    else
      cmp = (nv > cv) and 1 or -1
    end
    if cmp < 0 then return 0 end
    if cmp == 0 then
      local ck = string.sub(cur, sep + 1, sep + 1)
      -- at one version, a real copy beats a tombstone, and nothing beats a real copy
      if ck ~= 'i' or ARGV[2] == 'i' then return 2 end
    end
  end
end
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. ARGV[2] .. ':' .. ARGV[3], 'PX', ARGV[4])
return 1
";

/// Raises field `ARGV[1]` of hash `KEYS[1]` to `ARGV[2]` unless it holds a larger number
/// already (compared as decimal strings, like versions); returns the value in force.
const RAISE_SCRIPT: &str = r"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
local new = ARGV[2]
if cur and (#cur > #new or (#cur == #new and cur >= new)) then
  return cur
end
redis.call('HSET', KEYS[1], ARGV[1], new)
return new
";

/// A lease: `KEYS[1]` becomes `ARGV[1]` for `ARGV[2]` ms if free or already `ARGV[1]`'s;
/// returns 1 when `ARGV[1]` holds it.
const CLAIM_SCRIPT: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur == false or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
";

/// Deletes `KEYS[1]` if `ARGV[1]` holds it.
const RELEASE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// What an offer to Redis did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    Applied,
    /// Redis holds this version already.
    AlreadyHeld,
    /// Redis holds a newer version.
    Newer,
}

/// A failed Redis command.
#[derive(Clone, Debug, thiserror::Error)]
pub enum L2Error {
    #[error("redis skipped after a recent failure")]
    Skipped,
    #[error("redis command timed out after {0:?}")]
    Timeout(Duration),
    #[error("redis error: {0}")]
    Redis(String),
    #[error("redis holds an unreadable entry for {0}")]
    Corrupt(String),
}

/// The Redis node commands and subscriptions go to, and its address (`host:port`).
struct Link {
    client: redis::Client,
    conn: ConnectionManager,
    addr: String,
}

#[derive(Clone)]
pub struct L2 {
    /// Replaced when the Sentinels name another master ([`L2::follow_master`]).
    link: Arc<RwLock<Link>>,
    /// With `redis.mode = "sentinel"`: asks the Sentinels which node is the master.
    sentinel: Option<Arc<tokio::sync::Mutex<SentinelClient>>>,
    /// Why the Sentinels were last asked in vain; `None` once they answer again.
    sentinel_error: Arc<Mutex<Option<String>>>,
    /// With Sentinel: whether the node commands go to is one the Sentinels named (not the
    /// placeholder from `redis.url` before they first answered).
    named: Arc<AtomicBool>,
    /// Bumped when commands move to another node: every subscription made before ends.
    moves: Arc<tokio::sync::watch::Sender<u64>>,
    manager_config: ConnectionManagerConfig,
    prefix: Arc<str>,
    timeout: Duration,
    connect_timeout: Duration,
    retry_interval: Duration,
    script: Arc<Script>,
    raise_script: Arc<Script>,
    claim_script: Arc<Script>,
    release_script: Arc<Script>,
    /// Milliseconds since `epoch` until which reads skip Redis; 0 when healthy.
    skip_until: Arc<AtomicU64>,
    /// Notified when a command succeeds after a failure: Redis is back.
    recovered: Arc<tokio::sync::Notify>,
    epoch: Instant,
    /// Each resource's generation as this instance knows it (absent: 0).
    generations: Arc<RwLock<HashMap<String, i64>>>,
    /// Whether reads may use Redis: the server answering is the incarnation checked last
    /// (see [`L2::identity`]). Cleared by any failed command and by the Redis feed going
    /// down; set again by the Redis guard ([`crate::tiers::Tiers::secure_redis`]).
    trusted: Arc<AtomicBool>,
    /// The `run_id` of the incarnation last trusted.
    incarnation: Arc<Mutex<Option<String>>>,
    /// Wakes the Redis guard when trust is lost.
    distrusted: Arc<tokio::sync::Notify>,
    /// Counts every failure that distrusted Redis: a check that began before the last one
    /// grants no trust.
    distrusts: Arc<AtomicU64>,
}

/// Which Redis process answers, from `INFO server` and `INFO replication`. A different
/// `run_id` is a different process: a restart (perhaps from an older RDB or AOF) or a
/// failover to a replica (perhaps one that lagged). Either can hold data older than writes
/// already acknowledged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisIdentity {
    /// `run_id`; `None` where `INFO` is refused (some managed services rename it): then a
    /// new incarnation cannot be told apart, and is not looked for.
    pub run_id: Option<String>,
    /// `role` (`master`, `slave`).
    pub role: String,
    /// `master_replid` and `master_repl_offset`: the replication history this data belongs
    /// to, for the log.
    pub replid: String,
    pub repl_offset: i64,
}

impl Link {
    fn new(client: redis::Client, config: &ConnectionManagerConfig) -> Result<Link, L2Error> {
        let addr = client.get_connection_info().addr().to_string();
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
            .map_err(|e| L2Error::Redis(e.to_string()))?;
        Ok(Link { client, conn, addr })
    }
}

impl L2 {
    /// Builds the connection manager; it connects lazily and reconnects in the background, so
    /// Redis may still be down.
    ///
    /// # Errors
    /// An unusable URL, which config validation already rules out.
    pub fn new(config: &RedisConfig) -> Result<Self, L2Error> {
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(10))
            .with_interval(Duration::from_secs(2));
        let info = config
            .url
            .as_str()
            .into_connection_info()
            .map_err(|e| L2Error::Redis(e.to_string()))?
            .set_tcp_settings(
                TcpSettings::default()
                    .set_nodelay(true)
                    .set_keepalive(keepalive)
                    .set_user_timeout(Duration::from_secs(10)),
            );
        let sentinel = match config.mode {
            RedisMode::Single => None,
            RedisMode::Sentinel => {
                let node = SentinelNodeConnectionInfo::default()
                    .set_redis_connection_info(info.redis_settings().clone())
                    .set_tcp_settings(info.tcp_settings().clone());
                let sentinels: Vec<String> = config
                    .sentinels
                    .iter()
                    .map(|s| format!("redis://{s}"))
                    .collect();
                let client = SentinelClient::build(
                    sentinels,
                    config.master_name.clone(),
                    Some(node),
                    SentinelServerType::Master,
                )
                .map_err(|e| L2Error::Redis(e.to_string()))?;
                Some(Arc::new(tokio::sync::Mutex::new(client)))
            }
        };
        let client = if config.url.starts_with("rediss://") {
            let client_cert = config
                .tls_cert_file
                .as_deref()
                .zip(config.tls_key_file.as_deref());
            let certs = redis_certificates(config.tls_ca_file.as_deref(), client_cert)
                .map_err(|e| L2Error::Redis(e.to_string()))?;
            redis::Client::build_with_tls(info, certs)
        } else {
            redis::Client::open(info)
        }
        .map_err(|e| L2Error::Redis(e.to_string()))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(config.timeout))
            .set_connection_timeout(Some(config.connect_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let link = Link::new(client, &manager_config)?;
        Ok(L2 {
            link: Arc::new(RwLock::new(link)),
            sentinel,
            sentinel_error: Arc::default(),
            named: Arc::new(AtomicBool::new(false)),
            moves: Arc::new(tokio::sync::watch::Sender::new(0)),
            manager_config,
            prefix: config.key_prefix.as_str().into(),
            timeout: config.timeout,
            connect_timeout: config.connect_timeout,
            retry_interval: config.retry_interval,
            script: Arc::new(Script::new(OFFER_SCRIPT)),
            raise_script: Arc::new(Script::new(RAISE_SCRIPT)),
            claim_script: Arc::new(Script::new(CLAIM_SCRIPT)),
            release_script: Arc::new(Script::new(RELEASE_SCRIPT)),
            skip_until: Arc::new(AtomicU64::new(0)),
            recovered: Arc::new(tokio::sync::Notify::new()),
            epoch: Instant::now(),
            generations: Arc::new(RwLock::new(HashMap::new())),
            trusted: Arc::new(AtomicBool::new(false)),
            incarnation: Arc::new(Mutex::new(None)),
            distrusted: Arc::new(tokio::sync::Notify::new()),
            distrusts: Arc::new(AtomicU64::new(0)),
        })
    }

    /// A handle on the command connection to the current node.
    fn conn(&self) -> ConnectionManager {
        self.link
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .conn
            .clone()
    }

    /// A client for the current node, for connections of their own (subscriptions).
    fn client(&self) -> redis::Client {
        self.link
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .client
            .clone()
    }

    /// Whether Redis is found through Sentinel (`redis.mode = "sentinel"`).
    pub fn follows_sentinel(&self) -> bool {
        self.sentinel.is_some()
    }

    /// With Sentinel: whether commands go to a node the Sentinels named.
    pub fn master_named(&self) -> bool {
        self.named.load(Ordering::SeqCst)
    }

    /// Why the Sentinels were last asked in vain (`None`: they answered, or no Sentinel).
    pub fn sentinel_error(&self) -> Option<String> {
        self.sentinel_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The address (`host:port`) commands go to.
    pub fn node(&self) -> String {
        self.link
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .addr
            .clone()
    }

    /// With `redis.mode = "sentinel"`, asks the Sentinels which node is the master and, if it
    /// is not the one commands go to, moves them (and every later subscription) there and
    /// distrusts Redis: reads skip it until the Redis guard has checked the new node's
    /// incarnation, which a failover always changes. Returns whether it moved. With
    /// `single`: nothing, `false`.
    ///
    /// The Sentinels are asked through the redis crate's `SentinelClient`, which takes the
    /// first Sentinel that answers and checks that the node it names says `role:master`.
    ///
    /// # Errors
    /// No Sentinel answered, or none named a master that answers as one, within twice
    /// `redis.connect_timeout`.
    pub async fn follow_master(&self) -> Result<bool, L2Error> {
        let Some(sentinel) = &self.sentinel else {
            return Ok(false);
        };
        let limit = self.connect_timeout * 2;
        let asked = {
            let mut sentinel = sentinel.lock().await;
            match tokio::time::timeout(limit, sentinel.async_get_client()).await {
                Err(_) => Err(L2Error::Timeout(limit)),
                Ok(Err(e)) => Err(L2Error::Redis(format!("no master from the Sentinels: {e}"))),
                Ok(Ok(client)) => Ok(client),
            }
        };
        *self
            .sentinel_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = asked.as_ref().err().map(ToString::to_string);
        let client = asked?;
        let addr = client.get_connection_info().addr().to_string();
        if addr == self.node() {
            self.named.store(true, Ordering::SeqCst);
            return Ok(false);
        }
        let link = Link::new(client, &self.manager_config)?;
        // Distrusted before the move (no read goes to the new node unchecked) and after it
        // (a check that began before the move grants no trust).
        self.distrust();
        let was = std::mem::replace(
            &mut *self.link.write().unwrap_or_else(|e| e.into_inner()),
            link,
        );
        self.named.store(true, Ordering::SeqCst);
        self.distrust();
        // Subscriptions on the old node would go on hearing a node nobody publishes to any
        // more (if it is still up): ended, so the feeds go down and come back on the new one.
        self.moves.send_modify(|n| *n += 1);
        tracing::warn!(from = %was.addr, to = %addr, "following the Redis master the Sentinels name");
        Ok(true)
    }

    /// Which Redis process answers; see [`RedisIdentity`].
    ///
    /// # Errors
    /// The command's failure (a refused `INFO` is not one: `run_id` is then `None`).
    pub async fn identity(&self) -> Result<RedisIdentity, L2Error> {
        let mut conn = self.conn();
        let info: redis::RedisResult<String> = tokio::time::timeout(
            self.timeout,
            redis::cmd("INFO")
                .arg("server")
                .arg("replication")
                .query_async(&mut conn),
        )
        .await
        .map_err(|_| L2Error::Timeout(self.timeout))?;
        let info = match info {
            Ok(info) => info,
            // Refused (an ACL without INFO, or a managed service that renamed it): the
            // incarnation cannot be known.
            Err(e)
                if e.code() == Some("NOPERM")
                    || e.to_string().to_lowercase().contains("unknown command") =>
            {
                return Ok(RedisIdentity {
                    run_id: None,
                    role: String::new(),
                    replid: String::new(),
                    repl_offset: 0,
                })
            }
            Err(e) => {
                self.distrust();
                return Err(L2Error::Redis(with_hint(e.to_string())));
            }
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(|v| v.trim().to_string())
        };
        Ok(RedisIdentity {
            run_id: field("run_id"),
            role: field("role").unwrap_or_default(),
            replid: field("master_replid").unwrap_or_default(),
            repl_offset: field("master_repl_offset")
                .and_then(|o| o.parse().ok())
                .unwrap_or(0),
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

    fn postgres_key(&self) -> String {
        format!("{}postgres", self.prefix)
    }

    /// `redis.key_prefix`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Whether reads may use Redis now: see [`L2::trust`].
    pub fn trusted(&self) -> bool {
        self.trusted.load(Ordering::SeqCst)
    }

    /// The `run_id` trusted last, if any.
    pub fn incarnation(&self) -> Option<String> {
        self.incarnation
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads may use Redis again: it is the incarnation `run_id` (checked, or made safe by
    /// raising every generation), unless a failure came after the check began (`checked`,
    /// from [`L2::distrusts`] before it): then it stays distrusted and the guard checks again.
    pub fn trust(&self, run_id: Option<&str>, checked: u64) {
        *self.incarnation.lock().unwrap_or_else(|e| e.into_inner()) = run_id.map(String::from);
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

    /// Whether reads should try Redis now (no failure within `retry_interval`).
    pub fn available(&self) -> bool {
        let until = self.skip_until.load(Ordering::Relaxed);
        until == 0 || self.now_ms() >= until
    }

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
        let mut conn = self.conn();
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
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(self.redis_key_in(generation, key))
            .arg(copy.version.0)
            .arg(kind)
            .arg(body)
            .arg(ttl_ms)
            .arg(self.invalidation_channel())
            .arg(message);
        let outcome: i64 = self
            .run("offer", invocation.invoke_async(&mut conn))
            .await?;
        Ok(match outcome {
            1 => Stored::Applied,
            2 => Stored::AlreadyHeld,
            _ => Stored::Newer,
        })
    }

    /// `PING`, for `/readyz` and to probe recovery.
    ///
    /// # Errors
    /// Why Redis cannot be used.
    pub async fn ping(&self) -> Result<(), L2Error> {
        let mut conn = self.conn();
        let failed = match self
            .run("ping", redis::cmd("PING").query_async::<String>(&mut conn))
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        // A command that timed out on a connection that cannot be opened says little; a
        // fresh connection says why (refused, a TLS handshake that failed, a wrong password).
        match tokio::time::timeout(
            self.connect_timeout,
            self.client().get_multiplexed_async_connection(),
        )
        .await
        {
            Ok(Err(e)) => Err(L2Error::Redis(with_hint(e.to_string()))),
            _ => Err(failed),
        }
    }

    /// Deletes every key under this instance's prefix (SCAN + UNLINK), for when too many
    /// repairs were lost to track them one by one. Returns how many keys it removed.
    ///
    /// # Errors
    /// The first failing command.
    pub async fn flush_prefix(&self) -> Result<u64, L2Error> {
        self.flush_matching("").await
    }

    async fn flush_matching(&self, sub: &str) -> Result<u64, L2Error> {
        let mut conn = self.conn();
        let pattern = format!("{}{}*", escape_glob(&self.prefix), escape_glob(sub));
        let mut cursor: u64 = 0;
        let mut removed = 0;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = self
                .run(
                    "flush",
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut conn),
                )
                .await?;
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
                return Ok(removed);
            }
            cursor = next;
        }
    }

    /// Publishes `message` on `channel` (heartbeats).
    ///
    /// # Errors
    /// The command's failure.
    pub async fn publish(&self, channel: &str, message: String) -> Result<(), L2Error> {
        let mut conn = self.conn();
        let _: i64 = self
            .run(
                "publish",
                redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg(message)
                    .query_async(&mut conn),
            )
            .await?;
        Ok(())
    }

    /// How many connections subscribe to `channel` (`PUBSUB NUMSUB`): Redis drops a
    /// subscription the moment its connection closes, so this tells at once whether a
    /// process holding one is alive.
    ///
    /// # Errors
    /// The command's failure.
    pub async fn subscribers(&self, channel: &str) -> Result<u64, L2Error> {
        let mut conn = self.conn();
        let (_, count): (String, u64) = self
            .run(
                "numsub",
                redis::cmd("PUBSUB")
                    .arg("NUMSUB")
                    .arg(channel)
                    .query_async(&mut conn),
            )
            .await?;
        Ok(count)
    }

    /// The channel every instance of this prefix publishes its writes on.
    pub fn invalidation_channel(&self) -> String {
        format!("{}invalidations", self.prefix)
    }

    /// A subscription of its own to `channels` (RESP2 pub/sub, which never reconnects: when
    /// the stream ends, the caller subscribes again), with the same address and TCP settings
    /// as the command connection. It also ends when commands move to another node
    /// ([`L2::follow_master`]). Connecting is bounded by `redis.connect_timeout`, the
    /// SUBSCRIBE by `timeout`.
    ///
    /// # Errors
    /// Connecting or subscribing failed or timed out.
    pub async fn subscribe(
        &self,
        channels: &[String],
        timeout: Duration,
    ) -> Result<impl futures_util::Stream<Item = redis::Msg> + Send + 'static, L2Error> {
        // Taken before connecting: a move from here on ends the stream.
        let mut moved = self.moves.subscribe();
        let mut pubsub =
            tokio::time::timeout(self.connect_timeout, self.client().get_async_pubsub())
                .await
                .map_err(|_| L2Error::Timeout(self.connect_timeout))?
                .map_err(|e| L2Error::Redis(format!("connect failed: {e}")))?;
        tokio::time::timeout(timeout, pubsub.subscribe(channels))
            .await
            .map_err(|_| L2Error::Timeout(timeout))?
            .map_err(|e| L2Error::Redis(format!("SUBSCRIBE failed: {e}")))?;
        let moved = Box::pin(async move {
            let _ = moved.changed().await;
        });
        Ok(futures_util::StreamExt::take_until(
            pubsub.into_on_message(),
            moved,
        ))
    }

    /// Completes when a command succeeds after a failure (one waiter at a time).
    pub async fn recovered(&self) {
        self.recovered.notified().await;
    }

    /// The Redis key of a cache key, in its resource's current generation.
    pub fn redis_key(&self, key: &CacheKey) -> String {
        self.redis_key_in(self.generation(key.resource()), key)
    }

    /// The Redis key of a cache key in `generation` of its resource.
    fn redis_key_in(&self, generation: i64, key: &CacheKey) -> String {
        let resource = key.resource();
        match generation {
            0 => format!("{}{}", self.prefix, key.as_str()),
            g => format!(
                "{}{resource}@{g}{}",
                self.prefix,
                &key.as_str()[resource.len()..]
            ),
        }
    }

    /// The generation of `resource` as this instance knows it.
    pub fn generation(&self, resource: &str) -> i64 {
        let generations = self.generations.read().unwrap_or_else(|e| e.into_inner());
        generations.get(resource).copied().unwrap_or(0)
    }

    /// Takes `generation` for `resource` if it is newer than the one known here (another
    /// instance raised it in Redis).
    pub fn note_generation(&self, resource: &str, generation: i64) {
        let mut generations = self.generations.write().unwrap_or_else(|e| e.into_inner());
        let current = generations.entry(resource.to_string()).or_insert(0);
        *current = (*current).max(generation);
    }

    /// Raises `resource`'s generation to at least `generation`, in Redis and here: every
    /// entry of an older generation is out of reach from now on. Returns the generation now
    /// in force (a newer one may already have been).
    ///
    /// # Errors
    /// The command's failure; the generation known here is raised anyway, so this instance
    /// stops reading the old entries at once.
    pub async fn raise_generation(&self, resource: &str, generation: i64) -> Result<i64, L2Error> {
        self.note_generation(resource, generation);
        let mut conn = self.conn();
        let mut invocation = self.raise_script.prepare_invoke();
        invocation
            .key(self.generations_key())
            .arg(resource)
            .arg(generation);
        let now: String = self
            .run("generation", invocation.invoke_async(&mut conn))
            .await?;
        let now = now.parse().unwrap_or(generation);
        self.note_generation(resource, now);
        Ok(now)
    }

    /// Reads every resource's generation from Redis (after an outage, at start: flushes may
    /// have been missed).
    ///
    /// # Errors
    /// The command's failure.
    pub async fn load_generations(&self) -> Result<(), L2Error> {
        let mut conn = self.conn();
        let all: HashMap<String, i64> = self
            .run("generation", conn.hgetall(self.generations_key()))
            .await?;
        for (resource, generation) in all {
            self.note_generation(&resource, generation);
        }
        Ok(())
    }

    /// Claims the key `{prefix}{name}` for `holder` for `ttl` if nobody holds it, or
    /// extends the claim if `holder` already does (a lease, as for the relay's election).
    /// Returns whether `holder` holds it now.
    ///
    /// # Errors
    /// The command's failure: the caller must assume it does not hold the lease.
    pub async fn claim(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, L2Error> {
        let mut conn = self.conn();
        let mut invocation = self.claim_script.prepare_invoke();
        invocation
            .key(format!("{}{name}", self.prefix))
            .arg(holder)
            .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1));
        let held: i64 = self
            .run("claim", invocation.invoke_async(&mut conn))
            .await?;
        Ok(held == 1)
    }

    /// Gives up `holder`'s claim on `{prefix}{name}`, if it still holds it.
    ///
    /// # Errors
    /// The command's failure (the claim then expires by itself).
    pub async fn release(&self, name: &str, holder: &str) -> Result<(), L2Error> {
        let mut conn = self.conn();
        let mut invocation = self.release_script.prepare_invoke();
        invocation.key(format!("{}{name}", self.prefix)).arg(holder);
        let _: i64 = self
            .run("claim", invocation.invoke_async(&mut conn))
            .await?;
        Ok(())
    }

    /// The value of `{prefix}{name}` (who holds a claim; a recorded epoch).
    ///
    /// # Errors
    /// The command's failure.
    pub async fn read(&self, name: &str) -> Result<Option<String>, L2Error> {
        let mut conn = self.conn();
        self.run("get", conn.get(format!("{}{name}", self.prefix)))
            .await
    }

    /// Sets `{prefix}{name}` to `value`, without expiry.
    ///
    /// # Errors
    /// The command's failure.
    pub async fn write(&self, name: &str, value: &str) -> Result<(), L2Error> {
        let mut conn = self.conn();
        self.run("set", conn.set(format!("{}{name}", self.prefix), value))
            .await
    }

    fn generations_key(&self) -> String {
        format!("{}generations", self.prefix)
    }

    async fn run<T>(
        &self,
        op: &'static str,
        cmd: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, L2Error> {
        let result = match tokio::time::timeout(self.timeout, cmd).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(L2Error::Redis(with_hint(e.to_string()))),
            Err(_) => Err(L2Error::Timeout(self.timeout)),
        };
        match &result {
            Ok(_) => {
                if self.skip_until.swap(0, Ordering::Relaxed) != 0 {
                    self.recovered.notify_one();
                }
            }
            Err(_) => {
                metrics::counter!(REDIS_ERRORS, "op" => op).increment(1);
                let until = self.now_ms() + self.retry_interval.as_millis() as u64;
                self.skip_until.store(until.max(1), Ordering::Relaxed);
                // The connection may come back to another incarnation.
                self.distrust();
            }
        }
        result
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

/// Parses `{version}:{kind}:{at_ms}:{document}`.
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
