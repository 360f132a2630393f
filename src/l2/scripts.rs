//! The Lua scripts every change to a cache entry, a generation or a lease goes through:
//! each compares versions (as decimal strings, exactly) inside Redis, so no race between
//! instances can bring an older copy back.

/// The ranking rule as a Lua function both offer scripts begin with (ARCHITECTURE
/// "Versions and ranks"): `rank(cur, v, kind)` says whether a copy at version `v` (decimal
/// string) of kind `kind` may replace `cur`, the stored `version:kind:document` (or `false`
/// for none): 1 if it ranks above it, 0 if `cur` is newer, 2 if `cur` holds this version
/// already. Versions compare as decimal strings: longer is larger, then bytewise.
macro_rules! rank_lua {
    () => {
        r"
local function rank(cur, v, kind)
  if not cur then return 1 end
  local sep = string.find(cur, ':', 1, true)
  if not sep then return 1 end
  local cv = string.sub(cur, 1, sep - 1)
  if #cv ~= #v then
    if #v > #cv then return 1 end
    return 0
  end
  if v == cv then
    -- at one version, a real copy beats a tombstone, and nothing beats a real copy
    local ck = string.sub(cur, sep + 1, sep + 1)
    if ck ~= 'i' or kind == 'i' then return 2 end
    return 1
  end
  if v > cv then return 1 end
  return 0
end
"
    };
}

/// Applies `ARGV` (version, kind, document, ttl ms) to `KEYS[1]` if it ranks above what is
/// there, then, when `ARGV[6]` is not empty, publishes it on channel `ARGV[5]` with command
/// `ARGV[7]` (`PUBLISH`, or `SPUBLISH` in a cluster, where the channel is in `KEYS[1]`'s hash
/// slot): one round trip for a write's Redis update and its invalidation message. Returns 1
/// when applied, 0 when Redis holds a newer version, 2 when it holds this version already.
pub(super) const OFFER_SCRIPT: &str = concat!(
    rank_lua!(),
    r"
if ARGV[6] ~= '' then
  redis.call(ARGV[7], ARGV[5], ARGV[6])
end
local ranked = rank(redis.call('GET', KEYS[1]), ARGV[1], ARGV[2])
if ranked ~= 1 then return ranked end
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. ARGV[2] .. ':' .. ARGV[3], 'PX', ARGV[4])
return 1
"
);

/// [`OFFER_SCRIPT`] for many keys in one call: `KEYS[i]` takes `ARGV[4i]` .. `ARGV[4i+3]`
/// (version, kind, document, ttl ms) under the same rule, then, when `ARGV[2]` is not
/// empty, `ARGV[2]` is published on channel `ARGV[1]` with command `ARGV[3]`. Not in a
/// cluster (its keys span hash slots). Returns how many keys were applied.
pub(super) const OFFER_MANY_SCRIPT: &str = concat!(
    rank_lua!(),
    r"
local applied = 0
for i = 1, #KEYS do
  local v, kind, doc, ttl = ARGV[4 * i], ARGV[4 * i + 1], ARGV[4 * i + 2], ARGV[4 * i + 3]
  if rank(redis.call('GET', KEYS[i]), v, kind) == 1 then
    redis.call('SET', KEYS[i], v .. ':' .. kind .. ':' .. doc, 'PX', ttl)
    applied = applied + 1
  end
end
if ARGV[2] ~= '' then
  redis.call(ARGV[3], ARGV[1], ARGV[2])
end
return applied
"
);

/// Raises field `ARGV[1]` of hash `KEYS[1]` to `ARGV[2]` unless it holds a larger number
/// already (compared as decimal strings, like versions); returns the value in force.
pub(super) const RAISE_SCRIPT: &str = r"
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
pub(super) const CLAIM_SCRIPT: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur == false or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
";

/// Deletes `KEYS[1]` if `ARGV[1]` holds it.
pub(super) const RELEASE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// A Lua script syncar runs in Redis: sent by its SHA1 digest (`EVALSHA`), and with its text
/// (`EVAL`) when Redis answers `NOSCRIPT`.
///
/// Redis' script cache is neither persisted nor replicated: a restart, a failover to a
/// replica or `SCRIPT FLUSH` empties it. redis-rs' `Script` then loads the script
/// (`SCRIPT LOAD`) and sends `EVALSHA` once more, which fails when a second flush falls
/// between the two (for the relay a failed apply ends its term: the fleet's Postgres feed
/// goes down and every L1 is emptied) and always when the Redis user may not run `SCRIPT`
/// (an ACL such as `+@all -script`, which keeps `SCRIPT FLUSH` and `SCRIPT KILL` from an
/// application). `EVAL` runs the script and caches it in one command: nothing can come
/// between, and it needs only the scripting commands. A `NOSCRIPT` answer means the script
/// did not run, so sending it again cannot apply anything twice. (Redis' own advice in the
/// error: "Please use EVAL"; "Scripting with Lua", section "Script cache", in Redis' docs.)
pub(super) struct LuaScript {
    code: &'static str,
    /// The SHA1 digest of `code`, in hex, as `SCRIPT LOAD` answers it.
    hash: String,
}

impl LuaScript {
    pub(super) fn new(code: &'static str) -> LuaScript {
        LuaScript {
            code,
            hash: redis::Script::new(code).get_hash().to_owned(),
        }
    }

    /// A call of this script, to which keys and arguments are added in order.
    pub(super) fn prepare_invoke(&self) -> ScriptCall<'_> {
        ScriptCall {
            script: self,
            keys: Vec::new(),
            args: Vec::new(),
        }
    }
}

/// One call of a [`LuaScript`]: its keys (`KEYS`) and arguments (`ARGV`).
pub(super) struct ScriptCall<'a> {
    script: &'a LuaScript,
    keys: Vec<Vec<u8>>,
    args: Vec<Vec<u8>>,
}

impl ScriptCall<'_> {
    pub(super) fn key(&mut self, key: impl redis::ToRedisArgs) -> &mut Self {
        key.write_redis_args(&mut self.keys);
        self
    }

    pub(super) fn arg(&mut self, arg: impl redis::ToRedisArgs) -> &mut Self {
        arg.write_redis_args(&mut self.args);
        self
    }

    /// `EVALSHA`, then `EVAL` if Redis does not hold the script.
    ///
    /// # Errors
    /// Redis' error for the call (`NOSCRIPT` never: the script's text follows it).
    pub(super) async fn invoke_async<T: redis::FromRedisValue>(
        &self,
        conn: &mut impl redis::aio::ConnectionLike,
    ) -> redis::RedisResult<T> {
        match self
            .command("EVALSHA", &self.script.hash)
            .query_async(conn)
            .await
        {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                self.command("EVAL", self.script.code)
                    .query_async(conn)
                    .await
            }
            done => done,
        }
    }

    fn command(&self, name: &str, script: &str) -> redis::Cmd {
        let mut cmd = redis::cmd(name);
        cmd.arg(script)
            .arg(self.keys.len())
            .arg(&self.keys)
            .arg(&self.args);
        cmd
    }
}
