//! Memory benchmark: resident memory of L1 holding N documents (default 1 million of 200
//! bytes), and the bytes each entry costs beyond its key and document.
//!
//! `make bench-memory` (or `cargo bench --bench memory -- [--entries N] [--value-bytes B]
//! [--key-bytes K]`; keys are at least 15 bytes, `kv:user:0000042`, padded to K).
//! It fills syncar's own L1 through `L1::offer`, the path every fill takes, with documents
//! copied into their own buffers as the Redis and Postgres paths do, and reads the process'
//! resident set from `/proc/self/statm` before and after; then the same for the moka L1
//! syncar had before (`benches/common/moka_l1.rs`), each in a process of its own. Linux only.

use std::time::Duration;

use bytes::Bytes;
use syncar::l1::{ENTRY_OVERHEAD_BYTES, L1};
use syncar::model::{CacheKey, Cached, Version};

// Each bench uses part of it.
#[allow(dead_code)]
#[path = "common/moka_l1.rs"]
mod moka_l1;
use moka_l1::MokaL1;

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

/// Fills syncar's L1 with `entries` documents of `value_bytes`, then, if `read`, reads each
/// once as a hit does (the first clone of a document gives it `bytes`' shared header).
fn fill_l1(entries: usize, value_bytes: usize, read: bool) -> Held {
    // Large enough that nothing is evicted: the point is the cost of what is held.
    let l1 = L1::new(u64::MAX / 2);
    let source = vec![b'x'; value_bytes];
    let ttl = Duration::from_secs(3600);
    let (before, after) = resident_around(async {
        for i in 0..entries {
            let doc = Bytes::copy_from_slice(&source);
            l1.offer(&key(i), Cached::value(Version(i as i64 + 1), doc), ttl);
        }
        for i in (0..entries).filter(|_| read) {
            std::hint::black_box(l1.get(&key(i)).expect("held"));
        }
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

/// The same fill into the moka L1 syncar had before (`benches/common/moka_l1.rs`), read
/// as its hit path did: the copy cloned out of its `Arc`.
fn fill_moka(entries: usize, value_bytes: usize, read: bool) -> Held {
    let l1 = MokaL1::new(u64::MAX / 2);
    let source = vec![b'x'; value_bytes];
    let ttl = Duration::from_secs(3600);
    let mut held = 0;
    let (before, after) = resident_around(async {
        for i in 0..entries {
            let doc = Bytes::copy_from_slice(&source);
            l1.offer(&key(i), Cached::value(Version(i as i64 + 1), doc), ttl)
                .await;
        }
        for i in (0..entries).filter(|_| read) {
            let copy = l1.get(&key(i)).await.expect("held");
            std::hint::black_box(Cached::clone(&copy));
        }
        held = l1.settle().await;
    });
    assert_eq!(held, entries as u64, "every entry is still held");
    Held {
        before,
        after,
        weighed: 0,
    }
}

/// The length of every key, in bytes (`--key-bytes`; at least 15).
static KEY_BYTES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(15);

fn key(i: usize) -> CacheKey {
    let id = format!("user:{i:07}");
    let pad = KEY_BYTES.load(std::sync::atomic::Ordering::Relaxed);
    CacheKey::new(
        "kv",
        &format!("{id:->width$}", width = pad.saturating_sub(3)),
    )
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
            "--key-bytes" => KEY_BYTES.store(
                value().parse().expect("--key-bytes K"),
                std::sync::atomic::Ordering::Relaxed,
            ),
            "--phase" => phase = Some(value()),
            "--bench" => {}
            other => panic!(
                "unknown option {other:?}; known: --entries N, --value-bytes B, --key-bytes K"
            ),
        }
    }
    // Each measurement runs in a process of its own: memory freed by one would otherwise be
    // reused by the next and hide part of its cost.
    if let Some(phase) = phase {
        let held = match phase.as_str() {
            "l1" => fill_l1(entries, value_bytes, false),
            "l1-read" => fill_l1(entries, value_bytes, true),
            "moka" => fill_moka(entries, value_bytes, false),
            "moka-read" => fill_moka(entries, value_bytes, true),
            other => panic!("unknown phase {other:?}"),
        };
        println!("{} {} {}", held.before, held.after, held.weighed);
        return;
    }
    let measure = |phase: &str| -> Held {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--phase", phase, "--entries", &entries.to_string()])
            .args(["--value-bytes", &value_bytes.to_string()])
            .args(["--key-bytes", &key(0).as_str().len().to_string()])
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
    let key_bytes = key(0).as_str().len();
    let payload = (key_bytes + value_bytes) as f64;
    let per = |h: &Held| h.after.saturating_sub(h.before) as f64 / entries as f64;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!("L1 with {entries} entries of {value_bytes}-byte documents and {key_bytes}-byte keys");
    println!(
        "{:<44} {:>9} {:>15} {:>18}",
        "", "held MiB", "bytes / entry", "overhead / entry"
    );
    let mut report = serde_json::json!({
        "entries": entries, "value_bytes": value_bytes, "key_bytes": key_bytes,
    });
    let mut overheads = Vec::new();
    for (phase, label) in [
        ("l1", "syncar L1 (quick_cache), filled"),
        ("l1-read", "syncar L1 (quick_cache), filled, each read"),
        ("moka", "the moka L1 before, filled"),
        ("moka-read", "the moka L1 before, filled, each read"),
    ] {
        let held = measure(phase);
        let overhead = per(&held) - payload;
        println!(
            "{label:<44} {:>9.1} {:>15.0} {overhead:>18.0}",
            mib(held.after.saturating_sub(held.before)),
            per(&held)
        );
        report[phase] = serde_json::json!({
            "rss_before": held.before, "rss_after": held.after,
            "bytes_per_entry": per(&held), "overhead_per_entry": overhead,
            "weighed_per_entry": held.weighed as f64 / entries as f64,
        });
        overheads.push((overhead, held.weighed as f64 / entries as f64, per(&held)));
    }
    let (filled, weighed, resident) = overheads[0];
    let (read, _, _) = overheads[1];
    println!(
        "overhead against the moka L1: {:.2}x filled, {:.2}x read (goal < 150 bytes)",
        filled / overheads[2].0,
        read / overheads[3].0
    );
    println!(
        "L1's own accounting, which cache.l1_max_bytes bounds: {weighed:.0} bytes per entry \
         ({:+.0}% of what is resident when filled; l1::ENTRY_OVERHEAD_BYTES = {ENTRY_OVERHEAD_BYTES})",
        (weighed / resident - 1.0) * 100.0
    );
    let out = std::path::PathBuf::from(
        std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into()),
    )
    .join("bench-memory.json");
    std::fs::write(&out, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("wrote {}", out.display());
}
