//! Domain types shared by every tier: versions, cache keys, cached documents and how two
//! copies of one key rank against each other. Knows nothing about where copies are stored.

use std::fmt;

use bytes::Bytes;
use compact_str::CompactString;

/// A version from the single Postgres sequence `syncar_version_seq`.
///
/// Every copy of a document (L1 entry, L2 entry, message, tombstone) carries the version it
/// was read at. Versions of one key rise in commit order because row locks serialize its
/// writers; clocks never decide anything.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version(pub i64);

impl Version {
    /// The version of "this key has never been seen": older than every real version, so any
    /// write beats a cached absence read before it.
    pub const NONE: Version = Version(0);

    /// No real version reaches it: syncar's sequence would need 2^62 (4.6 × 10^18) `nextval`
    /// calls. A message naming one is forged (anyone may emit a logical message or a NOTIFY)
    /// and ignored: taken for real, it would raise the high-water mark, and Postgres' sequence
    /// with it once the guard saw the sequence "behind" it, to where the next `nextval` fails
    /// every write to a cached table (the sequence's maximum is 2^63 - 1).
    pub const IMPLAUSIBLE: Version = Version(1 << 62);

    /// Whether this could be a version Postgres handed out (below [`Version::IMPLAUSIBLE`]).
    pub fn plausible(self) -> bool {
        self < Version::IMPLAUSIBLE
    }
}

/// How far above the highest value read from the version sequence a version that a message
/// names is taken without reading the sequence again: 2^20 versions.
pub const VOUCH_SLACK: i64 = 1 << 20;

/// The highest `last_value` read from the version sequence, which vouches for the versions
/// that messages anyone may send name (a logical message in the WAL, a NOTIFY): a version
/// above every one the sequence handed out is forged, and taken it would move the sequence
/// up (the guard raises it past every version seen), as far as a forger likes (below
/// [`Version::IMPLAUSIBLE`]), where the versions after it soon count as forged themselves.
/// One above the bound plus [`VOUCH_SLACK`] is taken only once the sequence, read again,
/// reaches it; so a forger moves the sequence at most [`VOUCH_SLACK`] per message, and
/// reading it costs a query per 2^20 versions of real traffic.
#[derive(Debug, Default)]
pub struct SequenceBound(std::sync::atomic::AtomicI64);

impl SequenceBound {
    /// Whether `version` is within the slack of the highest value read.
    pub fn vouches(&self, version: i64) -> bool {
        version
            <= self
                .0
                .load(std::sync::atomic::Ordering::Relaxed)
                .saturating_add(VOUCH_SLACK)
    }

    /// Notes a value read from the sequence (or handed out by it).
    pub fn learn(&self, last_value: i64) {
        self.0
            .fetch_max(last_value, std::sync::atomic::Ordering::Relaxed);
    }

    /// The rule both readers of forgeable messages (the relay, the `notify` feed) follow:
    /// `None` when `highest` is within what the bound vouches for (nothing read), else the
    /// sequence's `last_value` as `read` gives it, learned; a version above it is forged.
    ///
    /// # Errors
    /// `read`'s.
    pub async fn reach<E>(
        &self,
        highest: i64,
        read: impl std::future::Future<Output = Result<i64, E>>,
    ) -> Result<Option<i64>, E> {
        if self.vouches(highest) {
            return Ok(None);
        }
        let last = read.await?;
        self.learn(last);
        Ok(Some(last))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The tier that answered a read, reported to clients as `X-Cache`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Tier {
    L1,
    L2,
    Db,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::L1 => "l1",
            Tier::L2 => "l2",
            Tier::Db => "db",
        }
    }
}

/// The identity of one document in the caches: `resource:key`.
///
/// Resource names cannot contain `:`, so the first `:` separates the two. The same string,
/// behind the configured prefix, is the Redis key.
///
/// Up to 24 bytes it is held inline, without an allocation (`compact_str`): a key made for
/// a request costs no `malloc`, and an L1 entry of a short key saves the key's own
/// allocation (32 bytes with glibc; `make bench-memory`). Longer keys live on the heap.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey(CompactString);

impl CacheKey {
    pub fn new(resource: &str, key: &str) -> Self {
        let mut s = CompactString::with_capacity(resource.len() + 1 + key.len());
        s.push_str(resource);
        s.push(':');
        s.push_str(key);
        CacheKey(s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn resource(&self) -> &str {
        self.0.split_once(':').map(|(r, _)| r).unwrap_or(&self.0)
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a tier knows about one key, at one version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// The document, as Postgres renders it (canonical JSON text).
    Value(Bytes),
    /// The key does not exist: deleted at this version, or never seen ([`Version::NONE`]).
    Absent,
    /// A tombstone left by an invalidation: some version at least this one exists, but this
    /// tier does not hold it. Never served; it only stops older fills from landing.
    Invalidated,
}

/// One copy of a key's state with the version it was read at.
///
/// Two copies are equal when version and state are; `at_ms` is bookkeeping.
#[derive(Clone, Debug)]
pub struct Cached {
    pub version: Version,
    pub state: State,
    /// When this copy was read from (or written to) Postgres, in Unix milliseconds: the origin
    /// of the `Age` header. Travels with the copy through every tier.
    pub at_ms: u64,
}

impl PartialEq for Cached {
    fn eq(&self, other: &Self) -> bool {
        self.version == other.version && self.state == other.state
    }
}

impl Eq for Cached {}

impl Cached {
    pub fn value(version: Version, doc: Bytes) -> Self {
        Cached {
            version,
            state: State::Value(doc),
            at_ms: now_ms(),
        }
    }

    pub fn absent(version: Version) -> Self {
        Cached {
            version,
            state: State::Absent,
            at_ms: now_ms(),
        }
    }

    pub fn invalidated(version: Version) -> Self {
        Cached {
            version,
            state: State::Invalidated,
            at_ms: now_ms(),
        }
    }

    /// Seconds since this copy left Postgres, for the `Age` header.
    pub fn age_secs(&self) -> u64 {
        now_ms().saturating_sub(self.at_ms) / 1000
    }

    /// Whether a read may answer from this copy (a tombstone never answers).
    pub fn is_servable(&self) -> bool {
        !matches!(self.state, State::Invalidated)
    }

    /// The order in which copies of one key replace each other.
    ///
    /// Higher versions win. At equal versions a real copy (a value or an absence) beats a
    /// tombstone: the tombstone for version N only says "N exists", and the copy of N is what
    /// it was waiting for.
    pub fn rank(&self) -> Rank {
        Rank {
            version: self.version,
            known: self.is_servable(),
        }
    }

    /// Whether this copy may replace `current`.
    pub fn supersedes(&self, current: &Cached) -> bool {
        self.rank() > current.rank()
    }

    pub fn doc(&self) -> Option<&Bytes> {
        match &self.state {
            State::Value(doc) => Some(doc),
            _ => None,
        }
    }
}

/// The wall clock in Unix milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Microseconds since the Unix epoch by the wall clock: a change message's `ts_us`, and the
/// moment it is applied when its delay is measured (a clock in ms would make a delay of a
/// few ms wrong by up to one).
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// See [`Cached::rank`].
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rank {
    pub version: Version,
    /// `false` for a tombstone.
    pub known: bool,
}

/// Why bytes are not one JSON document (400 `malformed_json` for a client).
#[derive(Debug, thiserror::Error)]
pub enum MalformedJson {
    #[error(transparent)]
    Syntax(#[from] serde_json::Error),
    #[error(transparent)]
    Utf8(#[from] std::str::Utf8Error),
}

/// A request body that is one valid JSON document, kept as its text: checked without
/// recursion (serde's `IgnoredAny` skips nested values with a heap stack), so a document of
/// any depth Postgres accepts is accepted, and Postgres alone parses it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsonText(Box<str>);

impl JsonText {
    /// `bytes` if they are exactly one JSON value (whitespace around it allowed).
    ///
    /// # Errors
    /// [`MalformedJson`]: what is wrong with the JSON, with its line and column.
    pub fn parse(bytes: &[u8]) -> Result<JsonText, MalformedJson> {
        serde_json::from_slice::<serde::de::IgnoredAny>(bytes)?;
        // Valid JSON is valid UTF-8 (strings are checked by the parse, the rest is ASCII).
        let text = std::str::from_utf8(bytes)?;
        Ok(JsonText(text.trim().into()))
    }

    /// The document's text, trimmed.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_text_takes_any_depth_and_refuses_what_is_not_json() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(
            JsonText::parse(deep.as_bytes()).is_ok(),
            "no recursion limit"
        );
        assert_eq!(
            JsonText::parse(b" {\"a\": 1} ").unwrap().as_str(),
            "{\"a\": 1}"
        );
        for bad in [&b"{"[..], b"[1,]", b"1 2", b"\"\xff\"", b"nul"] {
            assert!(JsonText::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn newer_versions_win_and_copies_beat_tombstones_of_their_version() {
        let v = |n| Cached::value(Version(n), Bytes::from_static(b"1"));
        assert!(v(2).supersedes(&v(1)));
        assert!(!v(1).supersedes(&v(2)));
        assert!(!v(1).supersedes(&v(1)));
        assert!(v(5).supersedes(&Cached::invalidated(Version(5))));
        assert!(!v(4).supersedes(&Cached::invalidated(Version(5))));
        assert!(!Cached::invalidated(Version(5)).supersedes(&v(5)));
        assert!(Cached::invalidated(Version(6)).supersedes(&v(5)));
        assert!(!Cached::absent(Version::NONE).supersedes(&Cached::invalidated(Version(1))));
        assert!(v(1).supersedes(&Cached::absent(Version::NONE)));
    }

    #[test]
    fn cache_key_splits_at_first_colon() {
        let k = CacheKey::new("users", "a:b");
        assert_eq!(k.as_str(), "users:a:b");
        assert_eq!(k.resource(), "users");
    }
}
