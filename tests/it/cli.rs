//! The `syncar` binary: configuration errors, `migrate`, secrets kept out of its output, and
//! graceful shutdown on a real SIGTERM.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{free_port, query_value, Env};

fn syncar() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_syncar"));
    for var in [
        "SYNCAR_CONFIG",
        "SYNCAR_LISTEN",
        "SYNCAR_POSTGRES_URL",
        "SYNCAR_REDIS_URL",
        "SYNCAR_INSTANCE",
        "SYNCAR_LOG",
        "SYNCAR_LOG_FORMAT",
    ] {
        c.env_remove(var);
    }
    c
}

#[test]
fn a_bad_config_is_reported_whole_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"everywhere\"\n[cache]\nttl_jitter = 3.0\n[[resource]]\nname = \"Users!\"\ntable = \"users\"\nkey = \"id\"\n",
    )
    .unwrap();
    let out = syncar()
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in ["server.listen", "cache.ttl_jitter", "resource[0].name"] {
        assert!(err.contains(key), "{key} missing from:\n{err}");
    }

    std::fs::write(&path, "[server]\nlisten_on = 1\n").unwrap();
    let out = syncar()
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen_on"));

    let out = syncar()
        .args(["check-config", "--config", "/nonexistent.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.toml"));

    let out = syncar()
        .args(["check-config", "--config", "config/syncar.toml"])
        .env("SYNCAR_LISTEN", "nowhere")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "the environment is validated too"
    );
}

#[tokio::test]
async fn migrate_reports_its_changes_then_nothing() {
    let env = Env::new().await;
    let run = || {
        syncar()
            .arg("migrate")
            .env("SYNCAR_POSTGRES_URL", &env.pg_url)
            .output()
            .unwrap()
    };
    let first = run();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(String::from_utf8_lossy(&first.stdout).contains("created sequence"));
    let second = run();
    assert!(second.status.success());
    assert_eq!(
        String::from_utf8_lossy(&second.stdout).trim(),
        "schema is up to date"
    );
}

/// Runs `syncar serve` against servers that do not exist until a failed connection attempt
/// is reported, then stops it with SIGTERM; returns its log.
fn logs_of_a_failed_start(format: &str) -> String {
    let port = free_port();
    let child = syncar()
        .arg("serve")
        .env("SYNCAR_LISTEN", format!("127.0.0.1:{port}"))
        .env(
            "SYNCAR_POSTGRES_URL",
            format!("postgres://app:pg-s3cret@127.0.0.1:{}/x", free_port()),
        )
        .env(
            "SYNCAR_REDIS_URL",
            format!("redis://:rd-s3cret@127.0.0.1:{}", free_port()),
        )
        .env("SYNCAR_LOG", "debug")
        .env("SYNCAR_LOG_FORMAT", format)
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until a connection attempt has failed (and been logged), then stop it.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut answer = String::new();
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            use std::io::{Read, Write};
            let _ = s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n");
            let _ = s.read_to_string(&mut answer);
        }
        if answer.contains("cannot connect") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no failed attempt reported: {answer}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "exits cleanly on SIGTERM");
    let logs = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(logs.contains("syncar listening"), "{logs}");
    assert!(logs.contains("schema not ready"), "{logs}");
    assert!(!logs.contains("s3cret"), "a password leaked:\n{logs}");
    logs
}

/// `check-config --db` finds what `check-config` alone cannot: a table that does not exist.
#[tokio::test]
async fn check_config_against_the_database_names_a_missing_table() {
    let env = Env::new().await;
    env.pg()
        .await
        .batch_execute("CREATE TABLE present (id bigint PRIMARY KEY, name text)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("syncar.toml");
    let resource = |name: &str, table: &str| {
        format!("[[resource]]\nname = \"{name}\"\ntable = \"{table}\"\nkey = \"id\"\n")
    };
    let check = |toml: String, db: bool| {
        std::fs::write(&path, toml).unwrap();
        let mut c = syncar();
        c.args(["check-config", "--config"]).arg(&path);
        if db {
            c.arg("--db");
        }
        c.env("SYNCAR_POSTGRES_URL", &env.pg_url).output().unwrap()
    };
    let good = check(resource("present", "present"), true);
    let out = String::from_utf8_lossy(&good.stdout);
    assert!(
        good.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&good.stderr)
    );
    assert!(
        out.contains("resource \"present\": table public.present"),
        "{out}"
    );
    assert!(out.contains("not migrated yet"), "{out}");

    let toml = resource("present", "present") + &resource("orders", "orders");
    assert!(
        check(toml.clone(), false).status.success(),
        "without --db the file alone is checked"
    );
    let bad = check(toml, true);
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("table public.orders does not exist"), "{err}");
    let untouched: bool = query_value(
        &env.pg().await,
        "SELECT to_regclass('syncar_version_seq') IS NULL",
    )
    .await;
    assert!(untouched, "the check changed nothing");
}

#[test]
fn passwords_never_reach_the_logs() {
    let logs = logs_of_a_failed_start("json");
    for line in logs.lines() {
        let event: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(
            event["level"].is_string() && event["message"].is_string(),
            "{line}"
        );
    }
}

/// Text logs into a pipe (a file, a collector) carry no ANSI colour escapes.
#[test]
fn text_logs_to_a_pipe_have_no_colour_codes() {
    let logs = logs_of_a_failed_start("text");
    assert!(logs.contains("WARN"), "{logs}");
    assert!(
        !logs.contains('\x1b'),
        "an escape code in a piped log:\n{logs:?}"
    );
}

/// SIGTERM to the real binary: it stops accepting at once, lets a request already in flight
/// finish, cuts one that outlives `server.shutdown_grace`, then closes feeds and pools and
/// exits 0.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_in_flight_requests_within_the_grace_then_exits() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    let env = Env::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("syncar.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nshutdown_grace = \"2s\"\nrequest_timeout = \"30s\"\n\
             [redis]\nkey_prefix = \"{}\"\n",
            env.prefix
        ),
    )
    .unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = syncar()
        .args(["serve", "--config"])
        .arg(&config)
        .env("SYNCAR_LISTEN", &addr)
        .env("SYNCAR_POSTGRES_URL", &env.pg_url)
        .env("SYNCAR_REDIS_URL", &env.redis_url)
        .env("SYNCAR_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Killed if an assertion fails before it exits on its own.
    struct KillOnDrop(Option<i32>);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            if let Some(pid) = self.0 {
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
    let mut guard = KillOnDrop(Some(child.id() as i32));
    let ready = async {
        loop {
            if let Ok(mut s) = TcpStream::connect(&addr).await {
                let mut answer = String::new();
                let _ = s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n").await;
                let _ = s.read_to_string(&mut answer).await;
                if answer.split_whitespace().nth(1) == Some("200") {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), ready)
        .await
        .expect("syncar becomes ready");

    // Two PUTs in flight: headers and half the body sent. One finishes after SIGTERM; the
    // other never does. `Expect: 100-continue` makes syncar say when it is reading the body,
    // so the signal is sent only once both are being handled.
    let body = br#"{"drained": true}"#;
    let in_flight = |key: &'static str| {
        let addr = addr.clone();
        async move {
            let mut conn = TcpStream::connect(&addr).await.unwrap();
            let head = format!(
                "PUT /v1/kv/{key} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nExpect: 100-continue\r\n\r\n",
                body.len()
            );
            conn.write_all(head.as_bytes()).await.unwrap();
            let mut continued = [0u8; 25];
            conn.read_exact(&mut continued).await.unwrap();
            assert_eq!(
                &continued, b"HTTP/1.1 100 Continue\r\n\r\n",
                "syncar reads the body"
            );
            conn.write_all(&body[..5]).await.unwrap();
            conn
        }
    };
    let mut finishing = in_flight("finishing").await;
    let mut stuck = in_flight("stuck").await;

    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let signalled = std::time::Instant::now();
    // New connections are refused from now on (the listener is closed)...
    let refused = async {
        while TcpStream::connect(&addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(2), refused)
        .await
        .expect("new connections refused after SIGTERM");
    // ...while the request in flight completes and is answered.
    finishing.write_all(&body[5..]).await.unwrap();
    let mut answer = String::new();
    finishing.read_to_string(&mut answer).await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 201"),
        "the in-flight PUT was answered: {answer}"
    );
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "and its connection closed: {answer}"
    );

    // The stuck one is cut once the grace has passed, and the process exits cleanly.
    let mut rest = Vec::new();
    let _ = stuck.read_to_end(&mut rest).await;
    assert!(rest.is_empty(), "no answer to an unfinished request");
    let status = tokio::task::spawn_blocking(move || {
        let status = child.wait().unwrap();
        let mut logs = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut logs).unwrap();
        (status, logs)
    });
    let (status, logs) = tokio::time::timeout(Duration::from_secs(15), status)
        .await
        .expect("syncar exits after the grace")
        .unwrap();
    guard.0 = None;
    let took = signalled.elapsed();
    assert!(status.success(), "exit status {status:?}\n{logs}");
    assert!(
        took >= Duration::from_secs(2),
        "waited the grace for the stuck request: {took:?}"
    );
    let steps = [
        "shutting down",
        "still open after the grace",
        "connections drained; stopping feeds",
        "syncar stopped",
    ];
    let at: Vec<usize> = steps
        .iter()
        .map(|m| {
            logs.find(m)
                .unwrap_or_else(|| panic!("{m:?} not logged:\n{logs}"))
        })
        .collect();
    assert!(
        at.windows(2).all(|w| w[0] < w[1]),
        "drain, cut, then feeds and pools closed, in that order:\n{logs}"
    );

    // The finished write was committed.
    let row = env
        .pg()
        .await
        .query_one(
            "SELECT value::text FROM syncar_kv WHERE key = 'finishing'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), r#"{"drained": true}"#);
}
