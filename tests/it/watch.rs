//! The change stream (`GET /v1/{resource}?watch=true`): events once applied to this
//! instance's L1, a key prefix, resuming with `Last-Event-ID`, resets when this instance
//! cannot vouch for every change, and streams ending on shutdown.

use std::time::{Duration, Instant};

use crate::support::{request, Env, RedisServer, Sse};

const WITHIN: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_watcher_hears_each_change_once_applied_here() {
    let server = RedisServer::start();
    let env = Env::new().await.on_redis(server.url());
    let a = env.start(|_| {}).await;
    let b = env.start(|_| {}).await;
    let mut stream = Sse::open(b.addr(), "/v1/kv?watch=true&prefix=w", &[]).await;
    assert_eq!(stream.status, 200);
    assert_eq!(stream.content_type, "text/event-stream");

    let v1 = a.put("/v1/kv/w1", "1").await.etag_version();
    let e = stream.next(WITHIN).await.expect("an event");
    assert_eq!(e.event, "change");
    assert_eq!(e.data["resource"], "kv");
    assert_eq!(e.data["key"], "w1");
    assert_eq!(e.data["op"], "put");
    assert!(e.data["version"].as_i64().unwrap() >= v1, "{e:?}");
    // Applied here before it was sent: a read now never gets the older copy.
    let read = b.get("/v1/kv/w1").await;
    assert!(read.etag_version() >= e.data["version"].as_i64().unwrap());

    a.put("/v1/kv/x1", "1").await; // outside the prefix
    let v2 = a.put("/v1/kv/w2", "2").await.etag_version();
    let e = stream.next(WITHIN).await.expect("an event");
    assert_eq!(
        (e.data["key"].as_str(), e.data["version"].as_i64()),
        (Some("w2"), Some(v2))
    );
    let last_id = e.id.clone().expect("changes carry an id");
    let del = a.delete("/v1/kv/w1").await.etag_version();
    let e = stream.next(WITHIN).await.expect("an event");
    assert_eq!(
        (e.data["op"].as_str(), e.data["version"].as_i64()),
        (Some("delete"), Some(del))
    );
    drop(stream);

    // Resuming from w2's id replays the delete it missed.
    let mut resumed = Sse::open(
        b.addr(),
        "/v1/kv?watch=true&prefix=w",
        &[("last-event-id", &last_id)],
    )
    .await;
    let e = resumed.next(WITHIN).await.expect("the missed event");
    assert_eq!(
        (e.event.as_str(), e.data["op"].as_str()),
        ("change", Some("delete"))
    );
    // An id this process never issued cannot be resumed from: a reset.
    let mut stranger =
        Sse::open(b.addr(), "/v1/kv?watch=true", &[("last-event-id", "abc-1")]).await;
    assert_eq!(stranger.next(WITHIN).await.expect("a reset").event, "reset");

    // A feed going down: this instance can no longer vouch, so every watcher is reset.
    let mut conn = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("CLIENT")
        .arg(&["KILL", "TYPE", "pubsub"])
        .query_async(&mut conn)
        .await
        .unwrap();
    let reset = loop {
        let e = resumed.next(WITHIN).await.expect("a reset");
        if e.event == "reset" {
            break e;
        }
    };
    assert!(
        reset.data["reason"].as_str().unwrap().contains("feed"),
        "{reset:?}"
    );
    let metrics = String::from_utf8_lossy(&b.get("/metrics").await.body).into_owned();
    assert!(metrics.contains("syncar_watch_resets_total"), "{metrics}");

    // Shutdown ends the streams rather than waiting out the grace period.
    let started = Instant::now();
    b.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(resumed.next(WITHIN).await.is_none(), "the stream ended");
}

#[tokio::test]
async fn a_watch_is_refused_clearly() {
    let env = Env::new().await;
    let a = env.start(|c| c.server.max_watchers = 1).await;
    for (path, status) in [
        ("/v1/nope?watch=true", 404),
        ("/v1/kv?watch=true&from=1", 400),
        ("/v1/kv", 405),
    ] {
        assert_eq!(
            request(a.addr(), "GET", path, &[], None).await.status,
            status,
            "{path}"
        );
    }
    let _first = Sse::open(a.addr(), "/v1/kv?watch=true", &[]).await;
    let second = Sse::open(a.addr(), "/v1/kv?watch=true", &[]).await;
    assert_eq!(second.status, 503, "server.max_watchers");
}

/// A watcher that falls behind (here: more changes at once than its buffer, before it could
/// read any) is sent a `reset` and closed; the changes were published without waiting.
#[tokio::test]
async fn a_watcher_that_falls_behind_is_reset_and_closed() {
    let env = Env::new().await;
    let a = env.start(|c| c.server.watch_buffer = 8).await;
    let mut stream = Sse::open(a.addr(), "/v1/kv?watch=true", &[]).await;
    let hub = a.state().tiers.watch().clone();
    // Synchronously: the stream's task cannot run in between.
    for v in 1..=100 {
        hub.change("kv", Some("k"), v, syncar::coherence::Op::Put);
    }
    let mut saw_reset = false;
    while let Some(e) = stream.next(WITHIN).await {
        if e.event == "reset" {
            assert!(
                e.data["reason"].as_str().unwrap().contains("fell behind"),
                "{e:?}"
            );
            saw_reset = true;
        }
    }
    assert!(saw_reset, "a reset before the stream closed");
}
