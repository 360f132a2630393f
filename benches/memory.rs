//! Memory benchmark: resident memory of L1 holding N documents (default 1 million of 200
//! bytes), and the bytes each entry costs beyond its key and document.
//!
//! `make bench-memory` (or `cargo bench --bench memory -- [--entries N] [--value-bytes B]`).
//! It fills syncar's own L1 through `L1::offer`, the path every fill takes, with documents
//! copied into their own buffers as the Redis and Postgres paths do, and reads the process'
//! resident set from `/proc/self/statm` before and after. Linux only.

use std::time::Duration;

use bytes::Bytes;
use syncar::l1::{ENTRY_OVERHEAD_BYTES, L1};
use syncar::model::{CacheKey, Cached, Version};

/// Resident memory of this process in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("read /proc/self/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("resident pages in /proc/self/statm");
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).expect("a positive page size")
}

/// What one measurement held: resident bytes before and after, and L1's own weight.
struct Held {
    before: u64,
    after: u64,
    weighed: u64,
}

/// The resident set before and after running `fill` on a runtime of its own.
fn resident_around(fill: impl std::future::Future<Output = ()>) -> (u64, u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let before = rss();
    rt.block_on(fill);
    (before, rss())
}

/// Fills syncar's L1 with `entries` documents of `value_bytes`.
fn fill_l1(entries: usize, value_bytes: usize) -> Held {
    // Large enough that nothing is evicted: the point is the cost of what is held.
    let l1 = L1::new(u64::MAX / 2);
    let source = vec![b'x'; value_bytes];
    let ttl = Duration::from_secs(3600);
    let (before, after) = resident_around(async {
        for i in 0..entries {
            let doc = Bytes::copy_from_slice(&source);
            l1.offer(&key(i), Cached::value(Version(i as i64 + 1), doc), ttl)
                .await;
        }
        l1.run_pending_tasks().await;
    });
    assert_eq!(
        l1.entry_count(),
        entries as u64,
        "every entry is still held"
    );
    Held {
        before,
        after,
        weighed: l1.weighted_size(),
    }
}

/// moka's own floor: the same number of entries with 24-byte inline keys and `u64` values,
/// no weigher, no expiry; what any L1 built on moka pays per entry before holding anything.
fn fill_moka_floor(entries: usize) -> Held {
    let cache: moka::future::Cache<[u8; 24], u64> = moka::future::Cache::builder()
        .max_capacity(u64::MAX / 2)
        .build();
    let (before, after) = resident_around(async {
        for i in 0..entries {
            let mut k = [0u8; 24];
            k[..8].copy_from_slice(&(i as u64).to_le_bytes());
            cache.insert(k, i as u64).await;
        }
        cache.run_pending_tasks().await;
    });
    assert_eq!(cache.entry_count(), entries as u64);
    Held {
        before,
        after,
        weighed: 0,
    }
}

fn key(i: usize) -> CacheKey {
    CacheKey::new("kv", &format!("user:{i:07}"))
}

fn main() {
    let mut entries = 1_000_000usize;
    let mut value_bytes = 200usize;
    let mut phase = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{a} takes a value"));
        match a.as_str() {
            "--entries" => entries = value().parse().expect("--entries N"),
            "--value-bytes" => value_bytes = value().parse().expect("--value-bytes B"),
            "--phase" => phase = Some(value()),
            "--bench" => {}
            other => panic!("unknown option {other:?}; known: --entries N, --value-bytes B"),
        }
    }
    // Each measurement runs in a process of its own: memory freed by one would otherwise be
    // reused by the next and hide part of its cost.
    if let Some(phase) = phase {
        let held = match phase.as_str() {
            "l1" => fill_l1(entries, value_bytes),
            "floor" => fill_moka_floor(entries),
            other => panic!("unknown phase {other:?}"),
        };
        println!("{} {} {}", held.before, held.after, held.weighed);
        return;
    }
    let measure = |phase: &str| -> Held {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--phase", phase, "--entries", &entries.to_string()])
            .args(["--value-bytes", &value_bytes.to_string()])
            .output()
            .expect("run a measurement");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let n: Vec<u64> = text
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect();
        Held {
            before: n[0],
            after: n[1],
            weighed: n[2],
        }
    };
    let l1 = measure("l1");
    let floor = measure("floor");

    let key_bytes = key(0).as_str().len();
    let per = |h: &Held| h.after.saturating_sub(h.before) as f64 / entries as f64;
    let per_entry = per(&l1);
    let payload = (key_bytes + value_bytes) as f64;
    let overhead = per_entry - payload;
    let weighed = l1.weighed as f64 / entries as f64;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!("L1 with {entries} entries of {value_bytes}-byte documents and {key_bytes}-byte keys");
    println!(
        "resident memory: {:.1} MiB before, {:.1} MiB after, {:.1} MiB held",
        mib(l1.before),
        mib(l1.after),
        mib(l1.after.saturating_sub(l1.before))
    );
    println!(
        "per entry: {per_entry:.0} bytes = {payload:.0} of key and document + {overhead:.0} of overhead (goal < 150)"
    );
    println!(
        "moka's own floor (24-byte inline keys, u64 values, no weigher or expiry): {:.0} bytes per entry",
        per(&floor)
    );
    println!(
        "L1's own accounting, which cache.l1_max_bytes bounds: {weighed:.0} bytes per entry \
         ({:+.0}% of what is resident; l1::ENTRY_OVERHEAD_BYTES = {ENTRY_OVERHEAD_BYTES})",
        (weighed / per_entry - 1.0) * 100.0
    );
    let report = serde_json::json!({
        "entries": entries, "value_bytes": value_bytes, "key_bytes": key_bytes,
        "rss_before": l1.before, "rss_after": l1.after,
        "bytes_per_entry": per_entry, "overhead_per_entry": overhead,
        "weighed_per_entry": weighed, "moka_floor_per_entry": per(&floor),
    });
    let out = std::path::PathBuf::from(
        std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into()),
    )
    .join("bench-memory.json");
    std::fs::write(&out, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("wrote {}", out.display());
}
