//! Logs and metrics: the subscriber, the Prometheus recorder, and the name of every metric in
//! one place. Knows nothing about what is measured.
//!
//! Labels never hold a cache key: a label value per key would grow the registry without bound.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Requests by `route`, `method` and `status`.
pub const HTTP_REQUESTS: &str = "syncar_http_requests_total";
/// Request latency by `route`, in seconds.
pub const HTTP_DURATION: &str = "syncar_http_request_duration_seconds";
/// Reads answered, by `tier` (`l1`, `l2`, `db`).
pub const CACHE_HITS: &str = "syncar_cache_hits_total";
/// Reads a tier could not answer, by `tier` (`l1`, `l2`).
pub const CACHE_MISSES: &str = "syncar_cache_misses_total";
/// Fills refused because the tier already held a newer version or tombstone, by `tier`.
pub const FILLS_REJECTED: &str = "syncar_fills_rejected_total";
/// Redis misses that went through a fill lease (`cache.fill_lease`), by `outcome`: `held`
/// (this instance loaded Postgres for the fleet), `waited` (another instance's load
/// answered), `timed_out` (nobody filled Redis in time, or the holder gave up without a copy
/// this read may serve: Postgres was read anyway).
pub const FILL_LEASES: &str = "syncar_fill_leases_total";
/// Failed Redis commands, by `op` (`get`, `offer`, `ping`, `flush`).
pub const REDIS_ERRORS: &str = "syncar_redis_errors_total";
/// Writes committed in Postgres whose Redis update failed and was queued for repair.
pub const L2_WRITE_FAILURES: &str = "syncar_l2_write_failures_after_commit_total";
/// Queued Redis repairs, by `result` (`applied`, `failed`, `overflow_flush`).
pub const L2_REPAIRS: &str = "syncar_l2_repairs_total";
/// Keys waiting for a Redis repair.
pub const L2_REPAIR_QUEUE: &str = "syncar_l2_repair_queue";
/// Entries and weighted bytes in L1.
pub const L1_ENTRIES: &str = "syncar_l1_entries";
pub const L1_BYTES: &str = "syncar_l1_bytes";
/// Invalidation messages received, by `feed` (`postgres`, `redis`).
pub const FEED_INVALIDATIONS: &str = "syncar_feed_invalidations_total";
/// Messages that taught nothing new (a version already known), by `feed`.
pub const FEED_DUPLICATES: &str = "syncar_feed_duplicates_total";
/// Messages that could not be parsed, by `feed`.
pub const FEED_MALFORMED: &str = "syncar_feed_malformed_total";
/// 1 while a feed is up, by `feed`.
pub const FEED_UP: &str = "syncar_feed_up";
/// L1 emptied because a feed came back, by `feed`.
pub const L1_FLUSHES: &str = "syncar_l1_flushes_total";
/// Reads that skipped L1 because a feed was down.
pub const L1_BYPASSED: &str = "syncar_l1_bypassed_reads_total";
/// From the change's timestamp (the writer's clock) to its eviction here, by `feed`.
pub const PROPAGATION_DELAY: &str = "syncar_invalidation_delay_seconds";
/// How far the `wal` source's stream lags, in seconds: from a heartbeat's emission into the
/// WAL to its publication by the relay.
pub const WAL_LAG_SECONDS: &str = "syncar_wal_lag_seconds";
/// WAL the replication slot retains behind the server's position, in bytes.
pub const WAL_LAG_BYTES: &str = "syncar_wal_lag_bytes";
/// The WAL position (LSN as a number of bytes) up to which this instance has applied every
/// relayed change (`wal` source); see the `X-Syncar-LSN` header.
pub const APPLIED_LSN: &str = "syncar_applied_lsn";
/// 1 while the relay is a synchronous standby of Postgres and confirms a position only once
/// every instance has applied it.
pub const RELAY_SYNCHRONOUS: &str = "syncar_relay_synchronous";
/// 1 on the instance that holds the relay (streams the slot), 0 elsewhere.
pub const RELAY_ACTIVE: &str = "syncar_relay_active";
/// Transactions the relay applied to Redis and published.
pub const RELAY_TRANSACTIONS: &str = "syncar_relay_transactions_total";
/// Changes the relay applied to Redis and published, by `op`.
pub const RELAY_CHANGES: &str = "syncar_relay_changes_total";
/// A whole tier's cached copies made unreachable because the tier may have gone back in
/// time, by `tier` and `reason` (`new_incarnation`: Redis restarted or failed over).
pub const TIER_RESETS: &str = "syncar_tier_resets_total";
/// Writes whose committed version came out below a version a cache held for the key, which
/// Postgres did not have (its versions went back); each was repaired.
pub const VERSION_REGRESSIONS: &str = "syncar_version_regressions_total";
/// Open watch streams.
pub const WATCHERS: &str = "syncar_watchers";
/// Change events sent to watchers.
pub const WATCH_EVENTS: &str = "syncar_watch_events_total";
/// Reset events sent to watchers (a feed down, L1 emptied, a watcher behind).
pub const WATCH_RESETS: &str = "syncar_watch_resets_total";
/// Reads answered from a cache that the auditor re-checked against Postgres.
pub const AUDIT_CHECKS: &str = "syncar_audit_checks_total";
/// Of those, copies still served a lease after Postgres had a newer version, by `tier`.
pub const AUDIT_STALE: &str = "syncar_audit_stale_total";
/// Reads retried once on a new connection because theirs died under them.
pub const POSTGRES_READ_RETRIES: &str = "syncar_postgres_read_retries_total";
/// Postgres errors by `class` (`unavailable`, `rejected`, `internal`).
pub const POSTGRES_ERRORS: &str = "syncar_postgres_errors_total";
/// Panics, whichever thread or task: see [`install_panic_hook`].
pub const PANICS: &str = "syncar_panics_total";

/// Latency buckets, in seconds: a local L1 hit is tens of microseconds, a Postgres write
/// milliseconds.
/// 1.5 and 2 ms sit between 1 and 2.5 ms for the commit-to-eviction delay, whose goal is 2 ms.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.001_5, 0.002, 0.002_5, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Installs the global Prometheus recorder once per process and returns its handle.
///
/// Several apps in one process (the tests) share it. The caller runs
/// [`PrometheusHandle::run_upkeep`] periodically: the recorder starts no task of its own.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .expect("bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Fails only when another recorder is installed already; then metrics go there.
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics stays empty");
            }
            describe();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(HTTP_REQUESTS, "HTTP requests by route, method and status");
    describe_counter!(PANICS, "panics, in any thread or task");
    describe_histogram!(
        HTTP_DURATION,
        Unit::Seconds,
        "HTTP request latency by route"
    );
    describe_counter!(CACHE_HITS, "reads answered, by tier");
    describe_counter!(CACHE_MISSES, "reads a tier could not answer, by tier");
    describe_counter!(
        FILLS_REJECTED,
        "fills refused because the tier held a newer version or tombstone"
    );
    describe_counter!(
        FILL_LEASES,
        "Redis misses that went through a fill lease, by outcome"
    );
    describe_counter!(REDIS_ERRORS, "failed Redis commands by operation");
    describe_counter!(
        L2_WRITE_FAILURES,
        "writes committed in Postgres whose Redis update failed"
    );
    describe_counter!(L2_REPAIRS, "Redis repairs by result");
    describe_gauge!(L2_REPAIR_QUEUE, "keys waiting for a Redis repair");
    describe_gauge!(L1_ENTRIES, "entries in L1");
    describe_gauge!(L1_BYTES, Unit::Bytes, "weighted size of L1");
    describe_counter!(POSTGRES_ERRORS, "Postgres errors by class");
    describe_counter!(
        AUDIT_CHECKS,
        "cached reads the auditor re-checked against Postgres"
    );
    describe_counter!(
        AUDIT_STALE,
        "audited copies still served a lease after Postgres had a newer version, by tier"
    );
    describe_gauge!(WATCHERS, "open watch streams");
    describe_counter!(WATCH_EVENTS, "change events sent to watchers");
    describe_counter!(WATCH_RESETS, "reset events sent to watchers");
    metrics::gauge!(WATCHERS).set(0.0);
    metrics::counter!(WATCH_EVENTS).increment(0);
    metrics::counter!(WATCH_RESETS).increment(0);
    // Series that must read 0 rather than be missing until the first time they count.
    metrics::counter!(VERSION_REGRESSIONS).increment(0);
    metrics::counter!(POSTGRES_READ_RETRIES).increment(0);
    for outcome in ["held", "waited", "timed_out"] {
        metrics::counter!(FILL_LEASES, "outcome" => outcome).increment(0);
    }
    for (tier, reason) in [("redis", "new_incarnation"), ("postgres", "went_back")] {
        metrics::counter!(TIER_RESETS, "tier" => tier, "reason" => reason).increment(0);
    }
    describe_counter!(
        POSTGRES_READ_RETRIES,
        "reads retried once on a new connection because theirs died"
    );
    describe_counter!(
        VERSION_REGRESSIONS,
        "writes committed below a version a cache held, which Postgres did not have"
    );
    describe_counter!(
        TIER_RESETS,
        "tiers made unreachable because they may have gone back in time, by tier and reason"
    );
    describe_counter!(
        FEED_INVALIDATIONS,
        "invalidation messages received, by feed"
    );
    describe_counter!(FEED_DUPLICATES, "messages that taught nothing new, by feed");
    describe_counter!(FEED_MALFORMED, "messages that could not be parsed, by feed");
    describe_gauge!(FEED_UP, "1 while a feed is up");
    describe_counter!(L1_FLUSHES, "L1 emptied because a feed came back");
    describe_counter!(L1_BYPASSED, "reads that skipped L1 because a feed was down");
    describe_gauge!(
        WAL_LAG_SECONDS,
        Unit::Seconds,
        "how far the wal source's stream lags"
    );
    describe_gauge!(
        WAL_LAG_BYTES,
        Unit::Bytes,
        "WAL the replication slot retains behind the server"
    );
    describe_gauge!(
        APPLIED_LSN,
        "the WAL position up to which this instance applied every relayed change"
    );
    describe_gauge!(RELAY_ACTIVE, "1 on the instance that holds the relay");
    describe_gauge!(
        RELAY_SYNCHRONOUS,
        "1 while the relay is a synchronous standby and waits for every instance"
    );
    describe_counter!(RELAY_TRANSACTIONS, "transactions the relay published");
    describe_counter!(RELAY_CHANGES, "changes the relay published, by op");
    describe_histogram!(
        PROPAGATION_DELAY,
        Unit::Seconds,
        "from a change's timestamp to its eviction here"
    );
}

/// Installs the tracing subscriber: human-readable text or one JSON object per line.
///
/// Colours (ANSI escapes) only when stderr is a terminal and `NO_COLOR` is unset
/// (<https://no-color.org>): a log file or a collector gets plain text.
///
/// Does nothing if a subscriber is already installed (tests start several apps).
pub fn init_logging(config: &LogConfig) {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_new(&config.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    let _ = match config.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Reports every panic in the log, as an `error` event in the configured format (its
/// message, `location` and `thread`, and `backtrace` when `RUST_BACKTRACE` asks for one),
/// and counts it in [`PANICS`], instead of Rust's default report: a line of plain text on
/// stderr that a JSON log pipeline cannot parse. Install after [`init_logging`].
///
/// A panic in a task ends that task alone (tokio catches it): a request's gets a 500, but a
/// write's Redis step behind an `eventual` answer has no client left to tell, and a
/// background task's has none at all. The counter is what an alert can watch for.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(report_panic));
}

fn report_panic(info: &std::panic::PanicHookInfo<'_>) {
    metrics::counter!(PANICS).increment(1);
    let payload = info.payload();
    let message = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(a panic without a message)");
    let location = info
        .location()
        .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
        .unwrap_or_default();
    let thread = std::thread::current();
    let thread = thread.name().unwrap_or("(unnamed)");
    let backtrace = std::backtrace::Backtrace::capture();
    if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
        tracing::error!(panic = message, location, thread, %backtrace, "panicked");
    } else {
        tracing::error!(panic = message, location, thread, "panicked");
    }
}

/// `error: cause: cause`, for one-line logs.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_is_counted_and_logged() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let previous = std::panic::take_hook();
        install_panic_hook();
        // The hook runs on the panicking thread: this one, inside the local recorder.
        metrics::with_local_recorder(&recorder, || {
            let unwound = std::panic::catch_unwind(|| panic!("a test panic"));
            assert!(unwound.is_err());
        });
        std::panic::set_hook(previous);
        let text = handle.render();
        assert!(
            text.lines().any(|l| l == "syncar_panics_total 1"),
            "not counted: {text}"
        );
    }
}
