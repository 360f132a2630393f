//! Microbenchmarks (criterion) of the in-process pieces of a request, without sockets: an L1
//! lookup, routing and parsing a document request, and parsing an invalidation message.
//! `make bench-micro`, or `cargo bench --bench micro -- [filter]`.
//!
//! The hot path end to end, with the network, is `make bench-hot`; these show what each piece
//! costs on its own, so a change to one of them can be judged without the noise of a load test.

use std::cell::Cell;
use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use syncar::coherence::Message;
use syncar::config::TtlConfig;
use syncar::http::{read_options, target};
use syncar::l1::L1;
use syncar::model::{CacheKey, Cached, Version};
use syncar::resource::{Catalog, Resource};

// Each bench uses part of it.
#[allow(dead_code)]
#[path = "common/moka_l1.rs"]
mod moka_l1;
use moka_l1::MokaL1;

const ENTRIES: usize = 100_000;

fn l1(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let l1 = L1::new(1 << 30);
    let moka = MokaL1::new(1 << 30);
    let keys: Vec<CacheKey> = (0..ENTRIES)
        .map(|i| CacheKey::new("kv", &format!("user:{i}")))
        .collect();
    let doc = Bytes::from(vec![b'x'; 200]);
    let ttl = Duration::from_secs(3600);
    for (i, k) in keys.iter().enumerate() {
        let copy = Cached::value(Version(i as i64 + 1), doc.clone());
        l1.offer(k, copy.clone(), ttl);
        rt.block_on(moka.offer(k, copy, ttl));
    }
    let absent: Vec<CacheKey> = (0..ENTRIES)
        .map(|i| CacheKey::new("kv", &format!("absent:{i}")))
        .collect();
    let next = Cell::new(0usize);
    let pick = |keys: &[CacheKey]| {
        let i = (next.get() + 7919) % keys.len();
        next.set(i);
        keys[i].clone()
    };

    let mut group = c.benchmark_group("l1");
    group.bench_function("get hit (100k entries)", |b| {
        b.iter(|| black_box(l1.get(&pick(&keys))))
    });
    group.bench_function("get miss", |b| b.iter(|| black_box(l1.get(&pick(&absent)))));
    // What applying an invalidation costs: a tombstone newer than the entry replaces it.
    let version = Cell::new(ENTRIES as i64 * 2);
    let tombstone = || {
        version.set(version.get() + 1);
        Cached::invalidated(Version(version.get()))
    };
    group.bench_function("offer newer tombstone", |b| {
        b.iter(|| black_box(l1.offer(&pick(&keys), tombstone(), ttl)))
    });
    group.finish();

    // The same three on the moka L1 syncar had before (benches/common/moka_l1.rs), its copy
    // cloned out of the Arc as the hit path did.
    let mut group = c.benchmark_group("l1-moka");
    group.bench_function("get hit (100k entries)", |b| {
        b.to_async(&rt).iter(|| {
            let key = pick(&keys);
            let moka = &moka;
            async move { black_box(moka.get(&key).await.map(|c| (*c).clone())) }
        })
    });
    group.bench_function("get miss", |b| {
        b.to_async(&rt).iter(|| {
            let key = pick(&absent);
            let moka = &moka;
            async move { black_box(moka.get(&key).await) }
        })
    });
    group.bench_function("offer newer tombstone", |b| {
        b.to_async(&rt).iter(|| {
            let key = pick(&keys);
            let copy = tombstone();
            let moka = &moka;
            async move { black_box(moka.offer(&key, copy, ttl).await) }
        })
    });
    group.finish();
}

fn routing(c: &mut Criterion) {
    let ttl = TtlConfig::default();
    let catalog = Catalog::new([Resource::kv("public", ttl)]);
    let mut group = c.benchmark_group("routing");
    group.bench_function("target kv/user%3A4242", |b| {
        b.iter(|| black_box(target(&catalog, black_box("kv/user%3A4242"), 512).ok()))
    });
    group.bench_function("read_options none", |b| {
        b.iter(|| black_box(read_options(black_box(None)).ok()))
    });
    group.bench_function("read_options min_version", |b| {
        b.iter(|| {
            black_box(read_options(black_box(Some("min_version=42&consistency=default"))).ok())
        })
    });
    group.finish();
}

fn invalidations(c: &mut Criterion) {
    let postgres =
        br#"{"resource":"kv","key":"user:4242","version":9187263,"op":"put","ts_us":1763790000123456}"#;
    let redis = br#"{"resource":"kv","key":"user:4242","version":9187263,"op":"put","ts_us":1763790000123456,"instance":"pod-a-7f9c4:0b1e"}"#;
    let mut group = c.benchmark_group("invalidation");
    group.bench_function("parse postgres payload", |b| {
        b.iter(|| black_box(Message::parse(black_box(postgres)).ok()))
    });
    group.bench_function("parse redis payload", |b| {
        b.iter(|| black_box(Message::parse(black_box(redis)).ok()))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = l1, routing, invalidations
}
criterion_main!(benches);
