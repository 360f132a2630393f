//! Names and generations: the Redis name of a cache key in its resource's generation, the
//! generations themselves (raised only), and the leases (`claim`, `release`).

use std::collections::HashMap;
use std::time::Duration;

use redis::AsyncCommands;

use crate::locks::RwLockExt;
use crate::model::CacheKey;

use super::{bucket_of, L2Error, L2};

impl L2 {
    /// The Redis key of a cache key, in its resource's current generation.
    pub fn redis_key(&self, key: &CacheKey) -> String {
        self.redis_key_in(self.generation(key.resource()), key)
    }

    /// The Redis key of a cache key in `generation` of its resource.
    pub(super) fn redis_key_in(&self, generation: i64, key: &CacheKey) -> String {
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
        let generations = self.generations.read_locked();
        generations.get(resource).copied().unwrap_or(0)
    }

    /// Takes `generation` for `resource` if it is newer than the one known here (another
    /// instance raised it in Redis).
    pub fn note_generation(&self, resource: &str, generation: i64) {
        let mut generations = self.generations.write_locked();
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

    /// Sets `{prefix}{name}` to `value` for `ttl` (`SET PX`).
    ///
    /// # Errors
    /// The command's failure.
    pub async fn write_for(&self, name: &str, value: &str, ttl: Duration) -> Result<(), L2Error> {
        let mut conn = self.conn();
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        self.run(
            "set",
            conn.pset_ex(format!("{}{name}", self.prefix), value, ms),
        )
        .await
    }

    pub(super) fn generations_key(&self) -> String {
        format!("{}generations", self.prefix)
    }
}
