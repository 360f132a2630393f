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
//!
//! # Rooms
//! This file holds `L2`, its connections (one node, Sentinel, Cluster) and the breaker;
//! `scripts` the Lua scripts; `store` reads and offers; `pubsub` channels and
//! subscriptions; `trust` identity and trust; `generations` key names, generations and
//! leases.

mod eviction;
mod generations;
mod pubsub;
mod scripts;
mod store;
mod trust;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::io::tcp::{socket2, TcpSettings};
use redis::sentinel::{
    SentinelClient, SentinelClientBuilder, SentinelNodeConnectionInfo, SentinelServerType,
};
use redis::{
    ConnectionAddr, ConnectionInfo, IntoConnectionInfo, ProtocolVersion, TlsCertificates, TlsMode,
    Value,
};

use crate::config::{RedisConfig, RedisMode};
use crate::locks::{MutexExt, RwLockExt};
use crate::model::CacheKey;
use crate::telemetry::REDIS_ERRORS;
use crate::tls::{redis_certificates, with_hint};

use scripts::{
    LuaScript, CLAIM_SCRIPT, OFFER_MANY_SCRIPT, OFFER_SCRIPT, RAISE_SCRIPT, RELEASE_SCRIPT,
};

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
    /// What the last identity check found wrong with Redis' `maxmemory-policy` for syncar
    /// (see [`L2::eviction_warning`]), with the policy.
    eviction: Arc<Mutex<Option<String>>>,
    manager_config: ConnectionManagerConfig,
    prefix: Arc<str>,
    timeout: Duration,
    connect_timeout: Duration,
    retry_interval: Duration,
    script: Arc<LuaScript>,
    offer_many_script: Arc<LuaScript>,
    raise_script: Arc<LuaScript>,
    claim_script: Arc<LuaScript>,
    release_script: Arc<LuaScript>,
    /// Milliseconds since `epoch` until which reads skip Redis; 0 when healthy.
    skip_until: Arc<AtomicU64>,
    /// Notified when a command succeeds after a failure: Redis is back.
    recovered: Arc<tokio::sync::Notify>,
    epoch: Instant,
    /// Each resource's generation as this instance knows it (absent: 0).
    generations: Arc<RwLock<HashMap<String, i64>>>,
    /// Whether reads may use Redis: the server answering is the incarnation checked last
    /// (see [`L2::identity`]). Cleared by any failed command and by the Redis feed going
    /// down; set again by the Redis guard ([`crate::tiers::Guards::secure_redis`]).
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
            eviction: Arc::default(),
            sentinel,
            sentinel_error: Arc::default(),
            named: Arc::new(AtomicBool::new(false)),
            moves: Arc::new(tokio::sync::watch::Sender::new(0)),
            manager_config,
            prefix: config.key_prefix.as_str().into(),
            timeout: config.timeout,
            connect_timeout: config.connect_timeout,
            retry_interval: config.retry_interval,
            script: Arc::new(LuaScript::new(OFFER_SCRIPT)),
            offer_many_script: Arc::new(LuaScript::new(OFFER_MANY_SCRIPT)),
            raise_script: Arc::new(LuaScript::new(RAISE_SCRIPT)),
            claim_script: Arc::new(LuaScript::new(CLAIM_SCRIPT)),
            release_script: Arc::new(LuaScript::new(RELEASE_SCRIPT)),
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
        self.link.read_locked().conn.clone()
    }

    /// A client for the current node, for connections of their own (subscriptions).
    fn client(&self) -> redis::Client {
        self.link.read_locked().client.clone()
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
        self.sentinel_error.locked().clone()
    }

    /// The address (`host:port`) commands go to.
    pub fn node(&self) -> String {
        self.link.read_locked().addr.clone()
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
        *self.sentinel_error.locked() = asked.as_ref().err().map(ToString::to_string);
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
        let was = std::mem::replace(&mut *self.link.write_locked(), link);
        self.named.store(true, Ordering::SeqCst);
        self.distrust();
        // Subscriptions on the old node would go on hearing a node nobody publishes to any
        // more (if it is still up): ended, so the feeds go down and come back on the new one.
        self.moves.send_modify(|n| *n += 1);
        tracing::warn!(from = %was.addr, to = %addr, "following the Redis master the Sentinels name");
        Ok(true)
    }

    /// `redis.key_prefix`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Whether reads should try Redis now (no failure within `retry_interval`).
    pub fn available(&self) -> bool {
        let until = self.skip_until.load(Ordering::Relaxed);
        until == 0 || self.now_ms() >= until
    }

    /// Why the `maxmemory-policy` the last identity check read (`INFO memory`, each master of
    /// a cluster) may evict what syncar needs kept, if it may: `allkeys-*` the generations
    /// and records, which have no TTL; `volatile-ttl`, `volatile-lfu` and `volatile-random`
    /// fresh tombstones (see the `eviction` module); for `/readyz`. `None` for `noeviction`
    /// and `volatile-lru`, without a `maxmemory`, or where `INFO memory` is not answered.
    pub fn eviction_warning(&self) -> Option<String> {
        self.eviction.locked().clone()
    }

    /// `PING`, for `/readyz` and to probe recovery.
    ///
    /// # Errors
    /// Why Redis cannot be used.
    pub async fn ping(&self) -> Result<(), L2Error> {
        if let Some(misfit) = self.misfit.locked().clone() {
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
            Ok(Err(e)) => Err(L2Error::Redis(with_hint(e.to_string(), &e))),
            _ => Err(failed),
        }
    }

    /// Completes when a command succeeds after a failure (one waiter at a time).
    pub async fn recovered(&self) {
        self.recovered.notified().await;
    }

    async fn run<T>(
        &self,
        op: &'static str,
        cmd: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, L2Error> {
        let result = match tokio::time::timeout(self.timeout, cmd).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(L2Error::Redis(with_hint(e.to_string(), &e))),
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
