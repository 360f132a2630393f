//! The `syncar` binary: configuration errors, `migrate`, and secrets kept out of its output.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{free_port, Env};

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

#[test]
fn passwords_never_reach_the_logs() {
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
        .env("SYNCAR_LOG_FORMAT", "json")
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
    let logs = String::from_utf8_lossy(&out.stderr);
    assert!(logs.contains("syncar listening"), "{logs}");
    assert!(logs.contains("schema not ready"), "{logs}");
    assert!(!logs.contains("s3cret"), "a password leaked:\n{logs}");
    for line in logs.lines() {
        let event: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(
            event["level"].is_string() && event["message"].is_string(),
            "{line}"
        );
    }
}
