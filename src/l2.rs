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
//! # Redis Cluster
//! With `redis.mode = "cluster"` every cache key gets a hash tag right after the prefix, its
//! bucket: `{prefix}{b}{resource}:{key}` with `b` in `0..CLUSTER_BUCKETS`, the key's hash
//! slot modulo the bucket count. Bucket `b`'s invalidations go over sharded pub/sub on
//! `{prefix}{b}invalidations`, which hashes to the same slot as its keys, so the offer script
//! can update a key and `SPUBLISH` its message on the node that owns both, and the message
//! never leaves that shard. Every instance subscribes to every bucket, on the node that owns
//! it ([`L2::subscribe`]). Commands go through the redis crate's cluster client, which
//! follows `MOVED` and `ASK`; the identity check covers every master.
//!
//! # Failures
//! Every command has a deadline. After a failure, reads skip Redis for
//! `redis.retry_interval` (a breaker), so an outage costs one timeout, not one per request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::io::tcp::{socket2, TcpSettings};
use redis::sentinel::{
    SentinelClient, SentinelClientBuilder, SentinelNodeConnectionInfo, SentinelServerType,
};
use redis::{
    AsyncCommands, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, ProtocolVersion, PushKind,
    Script, TlsCertificates, TlsMode, Value,
};

use crate::config::{RedisConfig, RedisMode};
use crate::model::{CacheKey, Cached, State, Version};
use crate::telemetry::REDIS_ERRORS;
use crate::tls::{redis_certificates, with_hint};

/// Applies `ARGV` (version, kind, document, ttl ms) to `KEYS[1]` if it ranks above what is
/// there, then, when `ARGV[6]` is not empty, publishes it on channel `ARGV[5]` with command
/// `ARGV[7]` (`PUBLISH`, or `SPUBLISH` in a cluster, where the channel is in `KEYS[1]`'s hash
/// slot): one round trip for a write's Redis update and its invalidation message. Returns 1
/// when applied, 0 when Redis holds a newer version, 2 when it holds this version already.
const OFFER_SCRIPT: &str = r"
if ARGV[6] ~= '' then
  redis.call(ARGV[7], ARGV[5], ARGV[6])
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

/// [`OFFER_SCRIPT`] for many keys in one call: `KEYS[i]` takes `ARGV[4i]` .. `ARGV[4i+3]`
/// (version, kind, document, ttl ms) under the same rule, then, when `ARGV[2]` is not
/// empty, `ARGV[2]` is published on channel `ARGV[1]` with command `ARGV[3]`. Not in a
/// cluster (its keys span hash slots). Returns how many keys were applied.
const OFFER_MANY_SCRIPT: &str = r"
local applied = 0
for i = 1, #KEYS do
  local v, kind, doc, ttl = ARGV[4 * i], ARGV[4 * i + 1], ARGV[4 * i + 2], ARGV[4 * i + 3]
  local take = true
  local cur = redis.call('GET', KEYS[i])
  if cur then
    local sep = string.find(cur, ':', 1, true)
    if sep then
      local cv = string.sub(cur, 1, sep - 1)
      local cmp
      if #cv ~= #v then
        cmp = (#v > #cv) and 1 or -1
      elseif v == cv then
        cmp = 0
      else
        cmp = (v > cv) and 1 or -1
      end
      if cmp < 0 then
        take = false
      elseif cmp == 0 then
        local ck = string.sub(cur, sep + 1, sep + 1)
        if ck ~= 'i' or kind == 'i' then take = false end
      end
    end
  end
  if take then
    redis.call('SET', KEYS[i], v .. ':' .. kind .. ':' .. doc, 'PX', ttl)
    applied = applied + 1
  end
end
if ARGV[2] ~= '' then
  redis.call(ARGV[3], ARGV[1], ARGV[2])
end
return applied
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

/// How many hash-tag buckets cache keys are spread over in a Redis Cluster. A divisor of
/// 16384 (the hash slots), so a bucket is a key's slot modulo this. Every instance subscribes
/// to one channel per bucket; 1024 keeps that cheap while spreading keys over enough slots
/// for the shards to share them evenly (about 1024 / shards buckets each).
pub const CLUSTER_BUCKETS: u16 = 1024;

/// The Redis Cluster hash slot of a key or shard channel: CRC16 (XMODEM) of its hash tag, or
/// of the whole name, modulo 16384. The hash tag is what lies between the first `{` and the
/// first `}` after it, if that is not empty (so `a{}{b}` hashes whole); Redis Cluster
/// specification, "Keys distribution model".
pub fn hash_slot(name: &[u8]) -> u16 {
    let tag = name.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &name[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tag.unwrap_or(name)) % 16384
}

/// The bucket of a cache key in a cluster (see [`CLUSTER_BUCKETS`]).
fn bucket_of(key: &CacheKey) -> u16 {
    hash_slot(key.as_str().as_bytes()) % CLUSTER_BUCKETS
}

/// A master of a Redis Cluster, with the hash slots it serves (from `CLUSTER SLOTS`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shard {
    /// The endpoint the cluster announces for the master: an IP address, or a host name
    /// (`cluster-announce-hostname` with `cluster-preferred-endpoint-type hostname`).
    pub host: String,
    /// Its client port (the TLS port when the cluster runs TLS).
    pub port: u16,
    /// Inclusive ranges of hash slots.
    pub slots: Vec<(u16, u16)>,
}

impl Shard {
    fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
    }

    /// One bucket this shard serves, if any.
    fn bucket(&self) -> Option<u16> {
        (0..CLUSTER_BUCKETS).find(|b| self.serves(hash_slot(b.to_string().as_bytes())))
    }
}

/// A command connection: to one node, or to a Redis Cluster (routed by key).
#[derive(Clone)]
enum Conn {
    Node(ConnectionManager),
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            Conn::Node(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Node(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Node(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// With `redis.mode = "cluster"`: what a connection of its own to one node needs (the seed's
/// credentials, TCP and TLS settings).
struct ClusterNodes {
    seed: ConnectionInfo,
    certs: Option<TlsCertificates>,
}

impl ClusterNodes {
    /// A client for the node at `host:port`, speaking `protocol`.
    fn client(
        &self,
        host: &str,
        port: u16,
        protocol: ProtocolVersion,
    ) -> Result<redis::Client, L2Error> {
        let info = at_node(&self.seed, host, port);
        let settings = info.redis_settings().clone().set_protocol(protocol);
        let info = info.set_redis_settings(settings);
        match &self.certs {
            Some(certs) => redis::Client::build_with_tls(info, certs.clone()),
            None => redis::Client::open(info),
        }
        .map_err(|e| L2Error::Redis(e.to_string()))
    }
}

/// `seed` with its address replaced by `host:port` (TLS settings kept).
fn at_node(seed: &ConnectionInfo, host: &str, port: u16) -> ConnectionInfo {
    let addr = match seed.addr() {
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => ConnectionAddr::TcpTls {
            host: host.to_string(),
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => ConnectionAddr::Tcp(host.to_string(), port),
    };
    seed.clone().set_addr(addr)
}

/// With `rediss://` and Sentinel: the Sentinels are asked over TLS, and the master they name
/// reached over TLS, both with `redis.tls_ca_file` (or the system's roots) and the client
/// certificate, if any; the URL gives the master's credentials, database and protocol. The
/// Sentinels are asked without a password, as on the plain path.
fn sentinel_over_tls(
    config: &RedisConfig,
    info: &ConnectionInfo,
    certs: &TlsCertificates,
) -> Result<SentinelClient, L2Error> {
    let mut sentinels = Vec::with_capacity(config.sentinels.len());
    for s in &config.sentinels {
        let (host, port) = split_host_port(s)?;
        sentinels.push(ConnectionAddr::TcpTls {
            host: host.to_string(),
            port,
            insecure: false,
            tls_params: None,
        });
    }
    let settings = info.redis_settings();
    let mut builder = SentinelClientBuilder::new(
        sentinels,
        config.master_name.clone(),
        SentinelServerType::Master,
    )
    .map_err(|e| L2Error::Redis(e.to_string()))?
    .set_client_to_sentinel_tls_mode(TlsMode::Secure)
    .set_client_to_sentinel_certificates(certs.clone())
    .set_client_to_sentinel_tcp_settings(info.tcp_settings().clone())
    .set_client_to_redis_tls_mode(TlsMode::Secure)
    .set_client_to_redis_certificates(certs.clone())
    .set_client_to_redis_tcp_settings(info.tcp_settings().clone())
    .set_client_to_redis_db(settings.db())
    .set_client_to_redis_protocol(settings.protocol());
    if let Some(username) = settings.username() {
        builder = builder.set_client_to_redis_username(username);
    }
    if let Some(password) = settings.password() {
        builder = builder.set_client_to_redis_password(password);
    }
    builder.build().map_err(|e| L2Error::Redis(e.to_string()))
}

/// `host:port` split; validation checked the form.
fn split_host_port(node: &str) -> Result<(&str, u16), L2Error> {
    node.rsplit_once(':')
        .and_then(|(h, p)| {
            let h = h
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(h);
            Some((h, p.parse().ok()?))
        })
        .ok_or_else(|| L2Error::Redis(format!("{node:?} is not host:port")))
}

/// The Redis node commands and subscriptions go to (or a cluster's seed node), and its
/// address (`host:port`).
struct Link {
    client: redis::Client,
    conn: Conn,
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
    /// With `redis.mode = "cluster"`: how to reach each node for subscriptions.
    cluster: Option<Arc<ClusterNodes>>,
    /// A node that does not fit `redis.mode` (a cluster node with `single`), as the last
    /// identity check found; [`L2::ping`] reports it.
    misfit: Arc<Mutex<Option<String>>>,
    manager_config: ConnectionManagerConfig,
    prefix: Arc<str>,
    timeout: Duration,
    connect_timeout: Duration,
    retry_interval: Duration,
    script: Arc<Script>,
    offer_many_script: Arc<Script>,
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

impl RedisIdentity {
    /// The identity of a Redis that refuses `INFO`: not known, so never looked for.
    fn unknown() -> RedisIdentity {
        RedisIdentity {
            run_id: None,
            role: String::new(),
            replid: String::new(),
            repl_offset: 0,
        }
    }
}

impl Link {
    fn new(client: redis::Client, config: &ConnectionManagerConfig) -> Result<Link, L2Error> {
        let addr = client.get_connection_info().addr().to_string();
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
            .map_err(|e| L2Error::Redis(e.to_string()))?;
        Ok(Link {
            client,
            conn: Conn::Node(conn),
            addr,
        })
    }

    /// A cluster connection from `client`'s node and `config.nodes` as seeds; it connects in
    /// the background.
    fn cluster(
        client: redis::Client,
        nodes: &ClusterNodes,
        config: &RedisConfig,
    ) -> Result<Link, L2Error> {
        let seed = client.get_connection_info().clone();
        let mut seeds = vec![seed.clone()];
        for node in &config.nodes {
            let (host, port) = split_host_port(node)?;
            seeds.push(at_node(&seed, host, port));
        }
        let mut builder = ClusterClient::builder(seeds)
            .connection_timeout(config.connect_timeout)
            .response_timeout(config.timeout)
            .tcp_settings(seed.tcp_settings().clone())
            // Each command is bounded by `redis.timeout` anyway; a few retries follow a
            // MOVED or a failover without waiting out the crate's default sixteen.
            .retries(3)
            .max_retry_wait(200);
        if let Some(certs) = &nodes.certs {
            builder = builder.certs(certs.clone());
        }
        let cluster = builder.build().map_err(|e| L2Error::Redis(e.to_string()))?;
        let conn = cluster.get_pending_async_connection_with_config(
            ClusterConfig::new()
                .set_connection_timeout(config.connect_timeout)
                .set_response_timeout(config.timeout),
        );
        Ok(Link {
            addr: seed.addr().to_string(),
            client,
            conn: Conn::Cluster(conn),
        })
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
        let certs = if config.url.starts_with("rediss://") {
            let client_cert = config
                .tls_cert_file
                .as_deref()
                .zip(config.tls_key_file.as_deref());
            Some(
                redis_certificates(config.tls_ca_file.as_deref(), client_cert)
                    .map_err(|e| L2Error::Redis(e.to_string()))?,
            )
        } else {
            None
        };
        let sentinel = match (config.mode, &certs) {
            (RedisMode::Single | RedisMode::Cluster, _) => None,
            (RedisMode::Sentinel, Some(certs)) => Some(Arc::new(tokio::sync::Mutex::new(
                sentinel_over_tls(config, &info, certs)?,
            ))),
            (RedisMode::Sentinel, None) => {
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
        let client = match &certs {
            Some(certs) => redis::Client::build_with_tls(info.clone(), certs.clone()),
            None => redis::Client::open(info.clone()),
        }
        .map_err(|e| L2Error::Redis(e.to_string()))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(config.timeout))
            .set_connection_timeout(Some(config.connect_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let cluster = (config.mode == RedisMode::Cluster).then(|| {
            Arc::new(ClusterNodes {
                seed: client.get_connection_info().clone(),
                certs,
            })
        });
        let link = match &cluster {
            Some(nodes) => Link::cluster(client, nodes, config)?,
            None => Link::new(client, &manager_config)?,
        };
        Ok(L2 {
            link: Arc::new(RwLock::new(link)),
            cluster,
            misfit: Arc::default(),
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
            offer_many_script: Arc::new(Script::new(OFFER_MANY_SCRIPT)),
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

    /// A handle on the command connection to the current node (or the cluster).
    fn conn(&self) -> Conn {
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
                return Err(L2Error::Redis(with_hint(e.to_string())));
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
        *self.misfit.lock().unwrap_or_else(|e| e.into_inner()) = misfit.clone();
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
    async fn cluster_identity(
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
    /// relay relayed (see `Tiers::secure_postgres`). Field `failover_guarded:{timeline}` of
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
        let channel = self.channel_of(key);
        self.offer_then_publish(generation, key, copy, ttl, &channel, message)
            .await
    }

    /// Whether [`L2::offer_and_publish_on`] can publish on any channel: not in a cluster,
    /// where a script may publish only on a sharded channel of its key's hash slot.
    pub fn publishes_anywhere(&self) -> bool {
        self.cluster.is_none()
    }

    /// [`L2::offer`] of `key` in the resource's current generation, then `message` published
    /// on `channel` in the same round trip: the relay's last change of a batch carries the
    /// batch's message, so that instances hear it one round trip sooner, never before Redis
    /// holds it. Only where [`L2::publishes_anywhere`].
    ///
    /// # Errors
    /// The command's failure: neither happened, or both did and the answer was lost.
    pub async fn offer_and_publish_on(
        &self,
        key: &CacheKey,
        copy: &Cached,
        ttl: Duration,
        channel: &str,
        message: &str,
    ) -> Result<Stored, L2Error> {
        let generation = self.generation(key.resource());
        self.offer_then_publish(generation, key, copy, ttl, channel, message)
            .await
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

    async fn offer_then_publish(
        &self,
        generation: i64,
        key: &CacheKey,
        copy: &Cached,
        ttl: Duration,
        channel: &str,
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

    /// `PING`, for `/readyz` and to probe recovery.
    ///
    /// # Errors
    /// Why Redis cannot be used.
    pub async fn ping(&self) -> Result<(), L2Error> {
        if let Some(misfit) = self
            .misfit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Err(L2Error::Redis(misfit));
        }
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

    /// Publishes `message` on `channel` (heartbeats).
    ///
    /// # Errors
    /// The command's failure.
    pub async fn publish(&self, channel: &str, message: String) -> Result<(), L2Error> {
        let mut conn = self.conn();
        let _: i64 = self
            .run(
                "publish",
                redis::cmd(self.publish_command())
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
        let (_, count): (String, u64) = match self.conn() {
            Conn::Node(mut conn) => {
                self.run(
                    "numsub",
                    redis::cmd("PUBSUB")
                        .arg("NUMSUB")
                        .arg(channel)
                        .query_async(&mut conn),
                )
                .await?
            }
            // A shard channel's subscribers are known to the node that owns its slot.
            Conn::Cluster(mut conn) => {
                let owner = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::with_key(channel, SlotAddr::Master),
                ));
                let mut numsub = redis::cmd("PUBSUB");
                numsub.arg("SHARDNUMSUB").arg(channel);
                let reply = self
                    .run("numsub", conn.route_command(numsub, owner))
                    .await?;
                redis::from_redis_value(reply)
                    .map_err(|e| L2Error::Redis(format!("PUBSUB SHARDNUMSUB reply: {e}")))?
            }
        };
        Ok(count)
    }

    /// The channel for messages about no one key (flushes): the one invalidation channel,
    /// or in a cluster bucket 0's (every instance subscribes to every bucket).
    pub fn invalidation_channel(&self) -> String {
        if self.cluster.is_some() {
            format!("{}{{0}}invalidations", self.prefix)
        } else {
            format!("{}invalidations", self.prefix)
        }
    }

    /// Every invalidation channel: one, or one per bucket in a cluster.
    pub fn invalidation_channels(&self) -> Vec<String> {
        if self.cluster.is_some() {
            (0..CLUSTER_BUCKETS)
                .map(|b| format!("{}{{{b}}}invalidations", self.prefix))
                .collect()
        } else {
            vec![self.invalidation_channel()]
        }
    }

    /// The channel a write of `key` is announced on: in a cluster its bucket's, in the same
    /// hash slot as the key.
    fn channel_of(&self, key: &CacheKey) -> String {
        if self.cluster.is_some() {
            format!("{}{{{}}}invalidations", self.prefix, bucket_of(key))
        } else {
            self.invalidation_channel()
        }
    }

    /// `PUBLISH`, or `SPUBLISH` in a cluster (sharded pub/sub: a message stays within the
    /// shard that owns its channel's slot, where a plain `PUBLISH` is broadcast to every
    /// node).
    fn publish_command(&self) -> &'static str {
        if self.cluster.is_some() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    /// A subscription of its own to `channels`, which never reconnects: when the stream
    /// ends, the caller subscribes again. On one node, RESP2 pub/sub with the same address
    /// and TCP settings as the command connection; it also ends when commands move to
    /// another node ([`L2::follow_master`]). In a cluster, sharded pub/sub on the masters
    /// that own the channels (see [`L2::subscribe_sharded`]); it ends when a node ends a
    /// subscription or a connection drops. Connecting is bounded by `redis.connect_timeout`,
    /// each subscribe command by `timeout`.
    ///
    /// # Errors
    /// Connecting or subscribing failed or timed out; in a cluster also `CLUSTER SLOTS`
    /// failing, or a channel's hash slot served by no master.
    pub async fn subscribe(
        &self,
        channels: &[String],
        timeout: Duration,
    ) -> Result<BoxStream<'static, redis::Msg>, L2Error> {
        if let Some(nodes) = &self.cluster {
            let shards = self.shards().await?;
            return self
                .subscribe_sharded(nodes, &shards, channels, timeout)
                .await;
        }
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
        Ok(pubsub.into_on_message().take_until(moved).boxed())
    }

    /// [`L2::subscribe`] in a cluster: one RESP3 connection per master that owns any of
    /// `channels`, with an `SSUBSCRIBE` per channel (channels of different slots may not
    /// share one). The stream ends when any of those connections drops or a node unsubscribes
    /// a channel by itself (Redis does when the channel's slot moves to another node, by
    /// resharding or failover): the caller subscribes again, on the layout of that time.
    ///
    /// The subscriptions are made here rather than through the redis crate's cluster
    /// connection, whose resubscription after a slot moves sends channels of several slots
    /// in one `SSUBSCRIBE` and takes the server's `sunsubscribe` for a confirmation
    /// (redis-rs 1.8.1, read in its source).
    async fn subscribe_sharded(
        &self,
        nodes: &ClusterNodes,
        shards: &[Shard],
        channels: &[String],
        timeout: Duration,
    ) -> Result<BoxStream<'static, redis::Msg>, L2Error> {
        let mut by_shard: Vec<Vec<&String>> = vec![Vec::new(); shards.len()];
        for channel in channels {
            let slot = hash_slot(channel.as_bytes());
            let Some(owner) = shards.iter().position(|s| s.serves(slot)) else {
                return Err(L2Error::Redis(format!(
                    "hash slot {slot} (of channel {channel}) is served by no master"
                )));
            };
            by_shard[owner].push(channel);
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<redis::PushInfo>();
        let mut connections = Vec::new();
        for (shard, channels) in shards.iter().zip(by_shard) {
            if channels.is_empty() {
                continue;
            }
            let client = nodes.client(&shard.host, shard.port, ProtocolVersion::RESP3)?;
            let config = redis::AsyncConnectionConfig::new()
                .set_push_sender(tx.clone())
                .set_connection_timeout(Some(self.connect_timeout))
                .set_response_timeout(Some(timeout));
            let node = format!("{}:{}", shard.host, shard.port);
            let conn = tokio::time::timeout(
                self.connect_timeout,
                client.get_multiplexed_async_connection_with_config(&config),
            )
            .await
            .map_err(|_| L2Error::Timeout(self.connect_timeout))?
            .map_err(|e| L2Error::Redis(format!("connect to {node} failed: {e}")))?;
            let subscribed = futures_util::future::try_join_all(channels.iter().map(|channel| {
                let mut conn = conn.clone();
                async move {
                    redis::cmd("SSUBSCRIBE")
                        .arg(channel.as_str())
                        .query_async::<Value>(&mut conn)
                        .await
                }
            }));
            tokio::time::timeout(timeout, subscribed)
                .await
                .map_err(|_| L2Error::Timeout(timeout))?
                .map_err(|e| L2Error::Redis(format!("SSUBSCRIBE on {node} failed: {e}")))?;
            connections.push(conn);
        }
        drop(tx);
        let pushes = futures_util::stream::unfold((rx, connections), |(mut rx, conns)| async {
            loop {
                let push = rx.recv().await?;
                match push.kind {
                    PushKind::SMessage | PushKind::Message => {
                        if let Some(msg) = redis::Msg::from_push_info(push) {
                            return Some((msg, (rx, conns)));
                        }
                    }
                    // Never asked for: the channel's slot moved, or a connection dropped.
                    PushKind::SUnsubscribe | PushKind::Disconnection => {
                        tracing::warn!(kind = ?push.kind, "a shard subscription ended");
                        return None;
                    }
                    _ => {}
                }
            }
        });
        Ok(pushes.boxed())
    }

    /// [`L2::subscribe`] to `channels` and to heartbeat channels of this subscription's own,
    /// which it returns: `{prefix}{suffix}` on one node; in a cluster one per master that
    /// owns a bucket, `{prefix}{b}{suffix}` with `b` one of its buckets, so each heartbeat
    /// travels on the connection that carries that shard's invalidations. Both come from one
    /// reading of the layout, so every shard subscribed to has its heartbeat.
    ///
    /// # Errors
    /// The layout could not be read, or as [`L2::subscribe`].
    pub async fn subscribe_with_heartbeats(
        &self,
        channels: &[String],
        suffix: &str,
        timeout: Duration,
    ) -> Result<(BoxStream<'static, redis::Msg>, Vec<String>), L2Error> {
        let Some(nodes) = &self.cluster else {
            let heartbeat = format!("{}{suffix}", self.prefix);
            let mut all = channels.to_vec();
            all.push(heartbeat.clone());
            return Ok((self.subscribe(&all, timeout).await?, vec![heartbeat]));
        };
        let shards = self.shards().await?;
        let heartbeats: Vec<String> = shards
            .iter()
            .filter_map(|shard| {
                let b = shard.bucket()?;
                Some(format!("{}{{{b}}}{suffix}", self.prefix))
            })
            .collect();
        if heartbeats.is_empty() {
            return Err(L2Error::Redis("no master serves any bucket".into()));
        }
        let mut all = channels.to_vec();
        all.extend(heartbeats.iter().cloned());
        let stream = self
            .subscribe_sharded(nodes, &shards, &all, timeout)
            .await?;
        Ok((stream, heartbeats))
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
        let tag = match self.cluster {
            Some(_) => format!("{{{}}}", bucket_of(key)),
            None => String::new(),
        };
        match generation {
            0 => format!("{}{tag}{}", self.prefix, key.as_str()),
            g => format!(
                "{}{tag}{resource}@{g}{}",
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

/// Whether `INFO` was refused (an ACL without it, or a managed service that renamed it): the
/// incarnation then cannot be known.
fn info_refused(e: &redis::RedisError) -> bool {
    e.code() == Some("NOPERM") || e.to_string().to_lowercase().contains("unknown command")
}

/// Field `name` of an `INFO` reply.
fn info_field(info: &str, name: &str) -> Option<String> {
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
