//! Real Postgres and Redis servers on free ports, for the tests and the benchmarks: started
//! once per process, stopped when it exits. Nothing here mocks a server; a missing binary
//! fails with the package to install.

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The servers shared by every test of this binary.
pub struct Servers {
    pub pg_port: u16,
    pub redis_port: u16,
}

static SERVERS: OnceLock<Servers> = OnceLock::new();
/// What to stop when the test binary exits.
static CLEANUP: Mutex<Vec<Cleanup>> = Mutex::new(Vec::new());

enum Cleanup {
    Postgres {
        bin: PathBuf,
        data: PathBuf,
        root: PathBuf,
    },
    Kill(u32),
}

extern "C" fn stop_servers() {
    let items = std::mem::take(&mut *CLEANUP.lock().unwrap_or_else(|e| e.into_inner()));
    for item in items {
        match item {
            Cleanup::Postgres { bin, data, root } => {
                let _ = as_postgres(&bin.join("pg_ctl"))
                    .args([
                        "-D",
                        &data.to_string_lossy(),
                        "-m",
                        "immediate",
                        "-w",
                        "stop",
                    ])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
                let _ = std::fs::remove_dir_all(root);
            }
            Cleanup::Kill(pid) => unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            },
        }
    }
}

pub fn servers() -> &'static Servers {
    SERVERS.get_or_init(|| {
        // SAFETY: registering a plain extern "C" function with no captured state.
        unsafe {
            libc::atexit(stop_servers);
        }
        let (pg_port, _) = start_postgres(None, "");
        let redis = RedisServer::start();
        let redis_port = redis.port;
        // Shared for the whole run: hand it to the exit hook instead of dropping it.
        CLEANUP.lock().unwrap().push(Cleanup::Kill(
            redis.child.lock().unwrap().as_ref().unwrap().id(),
        ));
        std::mem::forget(redis);
        Servers {
            pg_port,
            redis_port,
        }
    })
}

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn pg_bindir() -> PathBuf {
    if let Ok(dir) = std::env::var("PG_BINDIR") {
        return PathBuf::from(dir);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return dir;
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    found.retain(|d| d.join("initdb").exists());
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!(
            "PostgreSQL server binaries (initdb, pg_ctl) not found: install them with \
             `apt-get install postgresql`, or set PG_BINDIR"
        )
    })
}

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// Postgres refuses to run as root: run its tools as the `postgres` user then.
fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// A Postgres of its own, set up as the shared one but for `settings` (`-c name=value`
/// options, which win over the usual ones: `-c wal_level=replica`), for a test of a server
/// set up otherwise. Stopped when the process exits. Returns its port.
pub fn postgres_with(settings: &str) -> u16 {
    servers();
    start_postgres(None, settings).0
}

/// A Postgres of its own on a free port; with `certs` (see [`tls_servers`]) it accepts TCP
/// connections over TLS only (`hostssl`; `certuser` only with its client certificate) and
/// plain ones on its Unix socket; `settings` are more `-c` options, after the usual ones.
/// Returns the port and the socket's directory.
fn start_postgres(certs: Option<&Path>, settings: &str) -> (u16, PathBuf) {
    let bin = pg_bindir();
    let root = tempfile::Builder::new()
        .prefix("syncar-test-pg-")
        .tempdir()
        .expect("temp dir")
        .keep();
    let data = root.join("data");
    if is_root() {
        chown_postgres(&root);
    }
    initdb(&bin, &data);
    let mut tls_opts = String::new();
    if let Some(certs) = certs {
        // The server's key, readable by the postgres user only (Postgres insists).
        for file in ["server.pem", "server.key", "ca.pem"] {
            std::fs::copy(certs.join(file), data.join(file)).expect("copy certificates");
        }
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&data)
                .status()
                .expect("chown");
            assert!(status.success());
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            data.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all certuser 127.0.0.1/32 cert\n\
             hostssl all all 127.0.0.1/32 trust\n\
             hostnossl all all 127.0.0.1/32 reject\n",
        )
        .unwrap();
        tls_opts = " -c ssl=on -c ssl_cert_file=server.pem -c ssl_key_file=server.key \
                     -c ssl_ca_file=ca.pem"
            .into();
    }
    for attempt in 0..5 {
        let port = free_port();
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c max_connections=400 -c wal_level=logical \
             -c max_replication_slots=200 -c max_wal_senders=200 -c max_slot_wal_keep_size=1GB{tls_opts} \
             {settings}",
            root.display()
        );
        let out = as_postgres(&bin.join("pg_ctl"))
            .args(["-D", &data.to_string_lossy(), "-o", &opts, "-l"])
            .arg(root.join("log"))
            .args(["-w", "start"])
            .output()
            .expect("run pg_ctl");
        if out.status.success() {
            CLEANUP.lock().unwrap().push(Cleanup::Postgres {
                bin,
                data,
                root: root.clone(),
            });
            return (port, root);
        }
        eprintln!("postgres did not start on port {port} (attempt {attempt}); retrying");
    }
    let log = std::fs::read_to_string(root.join("log")).unwrap_or_default();
    panic!("postgres would not start:\n{log}");
}

/// A primary and a physical standby streaming from it, each on a free port, for failover
/// tests: the standby is a cold copy of the primary's data directory (`standby.signal`,
/// `primary_conninfo`, a physical slot; no `pg_basebackup` needed). From Postgres 17 on,
/// the standby synchronizes failover slots (`sync_replication_slots`, `hot_standby_feedback`)
/// and the primary holds logical decoding back until the standby has the WAL
/// (`synchronized_standby_slots`), as README "Failover" asks of an operator. Stopped and
/// removed on drop.
pub struct PostgresPair {
    bin: PathBuf,
    root: PathBuf,
    pub primary_port: u16,
    pub standby_port: u16,
    /// The server's major version (14, 15, ... 18).
    pub major: u32,
}

/// The standby's physical slot on the primary.
pub const STANDBY_SLOT: &str = "syncar_test_standby";

impl PostgresPair {
    pub async fn start() -> PostgresPair {
        let bin = pg_bindir();
        let major = postgres_major(&bin);
        let root = tempfile::Builder::new()
            .prefix("syncar-test-pair-")
            .tempdir()
            .expect("temp dir")
            .keep();
        if is_root() {
            chown_postgres(&root);
        }
        let primary = root.join("primary");
        let standby = root.join("standby");
        initdb(&bin, &primary);
        append(
            &primary.join("postgresql.conf"),
            &format!(
                "listen_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
                 fsync = off\nwal_level = logical\nmax_connections = 200\n\
                 max_wal_senders = 40\nmax_replication_slots = 40\nwal_keep_size = '256MB'\n\
                 hot_standby = on\nhot_standby_feedback = on\n",
                root.display()
            ),
        );
        // A cold copy of a stopped primary is a valid base for a standby.
        let out = as_postgres(Path::new("cp"))
            .arg("-a")
            .arg(&primary)
            .arg(&standby)
            .output()
            .expect("run cp");
        assert!(out.status.success(), "copying the data directory failed");
        let mut pair = PostgresPair {
            bin,
            root,
            primary_port: 0,
            standby_port: 0,
            major,
        };
        pair.primary_port = pair.pg_ctl_start(&primary);
        let client = connect(pair.primary_port).await;
        client
            .query(
                "SELECT pg_create_physical_replication_slot($1)",
                &[&STANDBY_SLOT],
            )
            .await
            .expect("create the standby's physical slot");
        if major >= 17 {
            client
                .batch_execute(&format!(
                    "ALTER SYSTEM SET synchronized_standby_slots = '{STANDBY_SLOT}'"
                ))
                .await
                .unwrap();
            client
                .batch_execute("SELECT pg_reload_conf()")
                .await
                .unwrap();
        }
        let mut standby_conf = format!(
            "primary_conninfo = 'host=127.0.0.1 port={} user=postgres dbname=postgres'\n\
             primary_slot_name = '{STANDBY_SLOT}'\n",
            pair.primary_port
        );
        if major >= 17 {
            standby_conf.push_str("sync_replication_slots = on\n");
        }
        append(&standby.join("postgresql.conf"), &standby_conf);
        append(&standby.join("standby.signal"), "");
        pair.standby_port = pair.pg_ctl_start(&standby);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let streaming: i64 = client
                .query_one(
                    "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if streaming > 0 {
                break;
            }
            assert!(Instant::now() < deadline, "the standby never streamed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        pair
    }

    fn pg_ctl_start(&self, data: &Path) -> u16 {
        let name = data.file_name().unwrap().to_string_lossy().into_owned();
        for _ in 0..5 {
            let port = free_port();
            let out = as_postgres(&self.bin.join("pg_ctl"))
                .args([
                    "-D",
                    &data.to_string_lossy(),
                    "-o",
                    &format!("-p {port}"),
                    "-l",
                ])
                .arg(self.root.join(format!("{name}.log")))
                .args(["-w", "start"])
                .output()
                .expect("run pg_ctl");
            if out.status.success() {
                return port;
            }
        }
        let log =
            std::fs::read_to_string(self.root.join(format!("{name}.log"))).unwrap_or_default();
        panic!("postgres ({name}) would not start:\n{log}");
    }

    /// Stops the primary at once, as a crash would (`pg_ctl stop -m immediate`).
    pub fn kill_primary(&self) {
        self.pg_ctl(&[
            "-D",
            &self.root.join("primary").to_string_lossy(),
            "-m",
            "immediate",
            "-w",
            "stop",
        ]);
    }

    /// Promotes the standby and waits until it accepts writes.
    pub fn promote_standby(&self) {
        self.pg_ctl(&[
            "-D",
            &self.root.join("standby").to_string_lossy(),
            "-w",
            "promote",
        ]);
    }

    fn pg_ctl(&self, args: &[&str]) {
        let out = as_postgres(&self.bin.join("pg_ctl"))
            .args(args)
            .output()
            .expect("run pg_ctl");
        assert!(
            out.status.success(),
            "pg_ctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A libpq URL naming both servers, primary first, for a session that writes:
    /// `postgres://postgres@127.0.0.1:P,127.0.0.1:S/{db}?target_session_attrs=read-write`.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{db}?target_session_attrs=read-write",
            self.primary_port, self.standby_port
        )
    }

    /// The standby's server log, for a failing test's message.
    pub fn standby_log(&self) -> String {
        std::fs::read_to_string(self.root.join("standby.log")).unwrap_or_default()
    }
}

impl Drop for PostgresPair {
    fn drop(&mut self) {
        for data in ["primary", "standby"] {
            let _ = as_postgres(&self.bin.join("pg_ctl"))
                .args([
                    "-D",
                    &self.root.join(data).to_string_lossy(),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A plain connection to the server on `port` (database `postgres`).
async fn connect(port: u16) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(
        &format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        tokio_postgres::NoTls,
    )
    .await
    .expect("connect to the test postgres");
    tokio::spawn(conn);
    client
}

/// The major version of the server in `bin` (`postgres --version`: "postgres (PostgreSQL) 17.10").
pub fn postgres_major(bin: &Path) -> u32 {
    let out = Command::new(bin.join("postgres"))
        .arg("--version")
        .output()
        .expect("run postgres --version");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .last()
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the major version from {text:?}"))
}

fn chown_postgres(path: &Path) {
    let status = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(path)
        .status()
        .expect("chown");
    assert!(status.success(), "chown of {} failed", path.display());
}

fn initdb(bin: &Path, data: &Path) {
    let out = as_postgres(&bin.join("initdb"))
        .args([
            "-D",
            &data.to_string_lossy(),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
        ])
        .output()
        .expect("run initdb");
    assert!(
        out.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Appends `text` to a file the postgres user owns (creating it).
fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open a config file");
    f.write_all(text.as_bytes()).unwrap();
    drop(f);
    if is_root() {
        chown_postgres(path);
    }
}

/// A PgBouncer of its own on a free port in front of the shared Postgres, trusting every
/// client as Postgres does; stopped on drop. syncar connects through it as a deployment
/// whose `postgres.url` names a PgBouncer does.
pub struct PgBouncer {
    pub port: u16,
    child: Child,
    dir: PathBuf,
}

impl PgBouncer {
    /// Starts one pooling in `pool_mode` (`session` or `transaction`) with at most
    /// `pool_size` server connections per database. A missing binary fails with the package
    /// to install.
    pub fn start(pool_mode: &str, pool_size: usize) -> PgBouncer {
        let pg_port = servers().pg_port;
        let bin = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("pgbouncer"));
        let dir = tempfile::Builder::new()
            .prefix("syncar-test-pgbouncer-")
            .tempdir()
            .expect("temp dir")
            .keep();
        let log = dir.join("pgbouncer.log");
        for _ in 0..5 {
            let port = free_port();
            std::fs::write(dir.join("users.txt"), "\"postgres\" \"\"\n").unwrap();
            let settings = [
                "[databases]".to_string(),
                format!("* = host=127.0.0.1 port={pg_port}"),
                "[pgbouncer]".into(),
                "listen_addr = 127.0.0.1".into(),
                format!("listen_port = {port}"),
                "unix_socket_dir =".into(),
                "auth_type = trust".into(),
                format!("auth_file = {}", dir.join("users.txt").display()),
                format!("pool_mode = {pool_mode}"),
                "max_client_conn = 500".into(),
                format!("default_pool_size = {pool_size}"),
                format!("logfile = {}", log.display()),
                // PgBouncer refuses to run as root; started as root, it changes to `user`
                // once it has read its files.
                if is_root() { "user = postgres" } else { "" }.into(),
            ];
            std::fs::write(dir.join("pgbouncer.ini"), settings.join("\n") + "\n").unwrap();
            let _ = std::fs::remove_file(&log);
            if is_root() {
                chown_postgres(&dir);
            }
            let stderr = std::fs::File::create(dir.join("stderr")).expect("a stderr file");
            let mut child = Command::new(&bin)
                .arg(dir.join("pgbouncer.ini"))
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("pgbouncer not found ({e}): install it with `apt-get install pgbouncer`")
                });
            // Listening on the port itself, not another process that took it meanwhile.
            let listening = format!("listening on 127.0.0.1:{port}");
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // exited: the port was taken, or a setting refused
                }
                if std::fs::read_to_string(&log).is_ok_and(|l| l.contains(&listening)) {
                    return PgBouncer { port, child, dir };
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        let stderr = std::fs::read_to_string(dir.join("stderr")).unwrap_or_default();
        panic!("pgbouncer would not start:\n{log}\n{stderr}");
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A redis-server of its own, stopped on drop; restartable on the same port.
pub struct RedisServer {
    pub port: u16,
    child: Mutex<Option<Child>>,
    /// TLS options: then the port is a TLS port and the plain one is off.
    tls: Vec<String>,
    /// Other options (`--replicaof`…).
    extra: Vec<String>,
    /// Where `SAVE` writes `dump.rdb` and a restart loads it from; `None`: nothing persists.
    dir: Option<tempfile::TempDir>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// A server with `tls` options (`--tls-cert-file` and the like): its port is a TLS port.
    pub fn start_with(tls: &[&str]) -> RedisServer {
        RedisServer::launch(tls, &[], false)
    }

    /// A server with a data directory of its own: `SAVE` writes a snapshot there, and
    /// [`RedisServer::restart`] starts again from the last one (as a restore from an RDB
    /// does); `extra` options too (`--replicaof HOST PORT`).
    pub fn start_persistent(extra: &[&str]) -> RedisServer {
        RedisServer::launch(&[], extra, true)
    }

    fn launch(tls: &[&str], extra: &[&str], persistent: bool) -> RedisServer {
        for _ in 0..5 {
            let port = free_port();
            let server = RedisServer {
                port,
                child: Mutex::new(None),
                tls: tls.iter().map(|s| s.to_string()).collect(),
                extra: extra.iter().map(|s| s.to_string()).collect(),
                dir: persistent.then(|| tempfile::tempdir().expect("a temporary directory")),
            };
            if server.spawn() {
                return server;
            }
        }
        panic!("redis-server would not start");
    }

    fn spawn(&self) -> bool {
        let port = self.port.to_string();
        let mut command = Command::new("redis-server");
        if self.tls.is_empty() {
            command.args(["--port", &port]);
        } else {
            command
                .args(["--port", "0", "--tls-port", &port])
                .args(&self.tls);
        }
        if let Some(dir) = &self.dir {
            command.arg("--dir").arg(dir.path());
        }
        let child = command
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "redis-server not found ({e}): install it with `apt-get install redis-server`"
                )
            });
        *self.child.lock().unwrap() = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                if !self.tls.is_empty() {
                    return true; // listening; a handshake is the client's business
                }
                use std::io::{Read, Write};
                let _ = s.write_all(b"PING\r\n");
                let mut buf = [0u8; 7];
                if s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n" {
                    return true;
                }
            }
            if let Some(Ok(Some(_))) = self.child.lock().unwrap().as_mut().map(|c| c.try_wait()) {
                return false; // exited: port taken
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's process id, while it runs.
    #[allow(dead_code)] // the benchmarks pin it
    pub fn pid(&self) -> Option<u32> {
        self.child.lock().unwrap().as_ref().map(|c| c.id())
    }

    /// Whether it runs (was not killed).
    pub fn is_running(&self) -> bool {
        self.child.lock().unwrap().is_some()
    }

    /// Kills the server (SIGKILL); everything it held is gone.
    pub fn kill(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port: empty, or from the last `SAVE` when persistent.
    pub fn restart(&self) {
        self.kill();
        assert!(
            self.spawn(),
            "redis-server did not restart on port {}",
            self.port
        );
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis master with one replica, and three Sentinels that watch it as `name`, all on free
/// ports, for failover tests. The Sentinels call a master down after 500 ms without an
/// answer (`down-after-milliseconds`) and need two of them to agree (quorum 2).
pub struct SentinelGroup {
    pub name: String,
    pub master: RedisServer,
    pub replica: RedisServer,
    sentinels: Vec<(u16, Child)>,
    /// With TLS: the CA file, for the test's own connections.
    ca: Option<String>,
    _dir: tempfile::TempDir,
}

impl SentinelGroup {
    /// Starts them and waits until every Sentinel knows the replica and the other two, so
    /// that a failover can happen at once.
    pub fn start(name: &str) -> SentinelGroup {
        SentinelGroup::launch(name, None)
    }

    /// The same on TLS ports only (Redis, replication and the Sentinels), with the
    /// certificates in `certs` (as [`TlsServers`] makes them: `server.pem` names
    /// `localhost`). Every node is known by the name `localhost` (`sentinel
    /// resolve-hostnames` and `announce-hostnames`, `replica-announce-ip`), so a client that
    /// checks host names can follow what the Sentinels say.
    pub fn start_tls(name: &str, certs: &Path) -> SentinelGroup {
        SentinelGroup::launch(name, Some(certs))
    }

    fn launch(name: &str, certs: Option<&Path>) -> SentinelGroup {
        syncar::tls::install_crypto_provider();
        let file = |name: &str| certs.map(|c| c.join(name).to_string_lossy().into_owned());
        // Every client must show a certificate: the Sentinels, replication, syncar.
        let tls = certs
            .map(|c| tls_options(c, "yes", &[]))
            .unwrap_or_default();
        let tls: Vec<&str> = tls.iter().map(String::as_str).collect();
        let host = if certs.is_some() {
            "localhost"
        } else {
            "127.0.0.1"
        };
        let master = RedisServer::launch(&tls, &[], false);
        let master_port = master.port.to_string();
        let mut replica_args = vec!["--replicaof", host, &master_port];
        if certs.is_some() {
            replica_args.extend(["--replica-announce-ip", "localhost"]);
        }
        let replica = RedisServer::launch(&tls, &replica_args, true);
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut sentinels = Vec::new();
        for n in 0..3 {
            let port = free_port();
            let listen = match certs {
                None => format!("port {port}\n"),
                Some(_) => format!(
                    "port 0\ntls-port {port}\ntls-cert-file {}\ntls-key-file {}\n\
                     tls-client-cert-file {}\ntls-client-key-file {}\n\
                     tls-ca-cert-file {}\ntls-auth-clients yes\ntls-replication yes\n\
                     sentinel resolve-hostnames yes\nsentinel announce-hostnames yes\n",
                    file("server.pem").unwrap(),
                    file("server.key").unwrap(),
                    file("client.pem").unwrap(),
                    file("client.key").unwrap(),
                    file("ca.pem").unwrap(),
                ),
            };
            // Sentinel rewrites its configuration file: one of its own, writable.
            let conf = dir.path().join(format!("sentinel-{n}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "{listen}bind 127.0.0.1\nprotected-mode no\n\
                     sentinel monitor {name} {host} {} 2\n\
                     sentinel down-after-milliseconds {name} 500\n\
                     sentinel failover-timeout {name} 3000\n\
                     sentinel parallel-syncs {name} 1\n",
                    master.port
                ),
            )
            .expect("write a Sentinel configuration");
            let child = Command::new("redis-server")
                .arg(&conf)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("redis-server not found ({e}): install it with `apt-get install redis-server`")
                });
            sentinels.push((port, child));
        }
        let group = SentinelGroup {
            name: name.to_string(),
            master,
            replica,
            sentinels,
            ca: file("ca.pem"),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        for (port, _) in &group.sentinels {
            loop {
                let replicas = group.ask(*port, &["SENTINEL", "REPLICAS", name]);
                let peers = group.ask(*port, &["SENTINEL", "SENTINELS", name]);
                let ready = replicas.is_some_and(|r| r.iter().any(|w| w == "slave"))
                    && peers.is_some_and(|p| p.iter().filter(|w| *w == "runid").count() >= 2);
                if ready {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the Sentinel on port {port} never saw the replica and its peers"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        group
    }

    /// The Sentinels' addresses, `host:port` (`localhost` with TLS, as the certificate
    /// names it).
    pub fn sentinels(&self) -> Vec<String> {
        let host = if self.ca.is_some() {
            "localhost"
        } else {
            "127.0.0.1"
        };
        self.sentinels
            .iter()
            .map(|(port, _)| format!("{host}:{port}"))
            .collect()
    }

    /// Asks a Sentinel to fail over now (`SENTINEL FAILOVER`): the replica is promoted and
    /// the old master, still up, becomes its replica.
    pub fn failover(&self) {
        let (port, _) = &self.sentinels[0];
        self.ask(*port, &["SENTINEL", "FAILOVER", &self.name])
            .expect("SENTINEL FAILOVER is accepted");
    }

    /// The master's port as the first Sentinel that answers names it.
    pub fn master_port(&self) -> Option<u16> {
        self.sentinels.iter().find_map(|(port, _)| {
            let answer = self.ask(*port, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", &self.name])?;
            answer.get(1)?.parse().ok()
        })
    }

    /// [`ask_client`] for the node or Sentinel on `port` (over TLS when the group has a CA).
    fn ask(&self, port: u16, args: &[&str]) -> Option<Vec<String>> {
        ask_client(&node_client(port, self.ca.as_deref()), args)
    }
}

/// The options of a Redis on TLS ports only, replication included, with the certificates in
/// `certs` (`server.pem`, `server.key`, `ca.pem`, and `client.pem`, `client.key` for its own
/// connections to other nodes), asking clients for a certificate when `auth_clients` is
/// `yes`, then `extra`.
fn tls_options(certs: &Path, auth_clients: &str, extra: &[&str]) -> Vec<String> {
    let file = |name: &str| certs.join(name).to_string_lossy().into_owned();
    let mut options: Vec<String> = [
        "--tls-cert-file",
        &file("server.pem"),
        "--tls-key-file",
        &file("server.key"),
        "--tls-ca-cert-file",
        &file("ca.pem"),
        // `server.pem` is for servers only: replication and the cluster bus connect with
        // the client certificate.
        "--tls-client-cert-file",
        &file("client.pem"),
        "--tls-client-key-file",
        &file("client.key"),
        "--tls-auth-clients",
        auth_clients,
        "--tls-replication",
        "yes",
    ]
    .map(String::from)
    .to_vec();
    options.extend(extra.iter().map(|s| s.to_string()));
    options
}

/// A client for the node on `port`: plain, or over TLS to `localhost` with the CA file `ca`
/// and the client certificate beside it (`client.pem`, `client.key`).
fn node_client(port: u16, ca: Option<&str>) -> redis::Client {
    match ca {
        None => redis::Client::open(format!("redis://127.0.0.1:{port}")),
        Some(ca) => {
            let dir = Path::new(ca).parent().expect("the certificates' directory");
            let read = |name: &str| std::fs::read(dir.join(name)).expect("a certificate file");
            redis::Client::build_with_tls(
                format!("rediss://localhost:{port}"),
                redis::TlsCertificates {
                    client_tls: Some(redis::ClientTlsConfig {
                        client_cert: read("client.pem"),
                        client_key: read("client.key"),
                    }),
                    root_cert: Some(read("ca.pem")),
                },
            )
        }
    }
    .expect("a valid Redis URL")
}

/// A command through `client`, and its answer in RESP's words, flattened; `None` when it
/// cannot be asked or refuses.
fn ask_client(client: &redis::Client, args: &[&str]) -> Option<Vec<String>> {
    fn words(v: redis::Value, out: &mut Vec<String>) {
        match v {
            redis::Value::Array(items) => items.into_iter().for_each(|i| words(i, out)),
            redis::Value::Map(pairs) => pairs.into_iter().for_each(|(k, v)| {
                words(k, out);
                words(v, out);
            }),
            redis::Value::BulkString(b) => out.push(String::from_utf8_lossy(&b).into()),
            redis::Value::SimpleString(s) => out.push(s),
            redis::Value::Int(i) => out.push(i.to_string()),
            _ => {}
        }
    }
    let mut conn = client
        .get_connection_with_timeout(Duration::from_secs(2))
        .ok()?;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    let value: redis::Value = cmd.query(&mut conn).ok()?;
    let mut out = Vec::new();
    words(value, &mut out);
    Some(out)
}

/// A Redis Cluster of three masters with one replica each, on free ports, made by
/// `redis-cli --cluster create`. A node is called failing after 1 s without an answer
/// (`cluster-node-timeout`), and its replica then takes over.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    /// With TLS: the CA file, for the test's own connections.
    ca: Option<String>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        RedisCluster::launch(None)
    }

    /// A cluster on TLS ports only (clients, the cluster bus and replication), with the
    /// certificates in `certs` (as [`TlsServers`] makes them: `server.pem` names
    /// `localhost`). Nodes announce themselves as `localhost`
    /// (`cluster-preferred-endpoint-type hostname`), so a client verifying host names can
    /// follow `CLUSTER SLOTS`, as with managed clusters that announce DNS names.
    pub fn start_tls(certs: &Path) -> RedisCluster {
        RedisCluster::launch(Some(certs))
    }

    fn launch(certs: Option<&Path>) -> RedisCluster {
        // The test's own TLS connections, made before any syncar starts.
        syncar::tls::install_crypto_provider();
        let file = |name: &str| certs.map(|c| c.join(name).to_string_lossy().into_owned());
        let tls = certs
            .map(|c| {
                tls_options(
                    c,
                    "no",
                    &[
                        "--tls-cluster",
                        "yes",
                        "--cluster-announce-hostname",
                        "localhost",
                        "--cluster-preferred-endpoint-type",
                        "hostname",
                    ],
                )
            })
            .unwrap_or_default();
        let tls: Vec<&str> = tls.iter().map(String::as_str).collect();
        let nodes: Vec<RedisServer> = (0..6)
            .map(|_| {
                // The cluster bus port defaults to port + 10000, which a free port may not
                // leave room for: one of its own.
                let bus = free_port().to_string();
                let extra = [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    &bus,
                    "--cluster-node-timeout",
                    "1000",
                    // A replica of a fresh cluster may not have heard from its master for
                    // longer than the default allows, and would refuse to take over.
                    "--cluster-replica-validity-factor",
                    "0",
                ];
                RedisServer::launch(&tls, &extra, true)
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut create = Command::new("redis-cli");
        if let Some(ca) = file("ca.pem") {
            create.args(["--tls", "--cacert", &ca]);
        }
        create.args(["--cluster", "create"]).args(&addrs).args([
            "--cluster-replicas",
            "1",
            "--cluster-yes",
        ]);
        run_tool(&mut create, "redis-tools");
        let cluster = RedisCluster {
            nodes,
            ca: file("ca.pem"),
        };
        cluster.wait_ok();
        cluster
    }

    /// Until every live node says `cluster_state:ok` and agrees on the masters.
    pub fn wait_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let states: Vec<bool> = self
                .live()
                .map(|n| {
                    self.ask(n.port, &["CLUSTER", "INFO"])
                        .is_some_and(|w| w.concat().contains("cluster_state:ok"))
                })
                .collect();
            let views: Vec<_> = self.live().map(|n| self.masters_seen_by(n.port)).collect();
            if states.iter().all(|ok| *ok) && views.windows(2).all(|w| w[0] == w[1]) {
                return;
            }
            assert!(Instant::now() < deadline, "the cluster never came up");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn live(&self) -> impl Iterator<Item = &RedisServer> {
        self.nodes.iter().filter(|n| n.is_running())
    }

    /// The first node's URL, a seed.
    pub fn url(&self) -> String {
        self.nodes[0].url()
    }

    /// The other nodes, `host:port`, more seeds.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes[1..]
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect()
    }

    /// The port of the master serving hash slot `slot`, as a live node sees it.
    pub fn master_of(&self, slot: u16) -> Option<u16> {
        let node = self.live().next()?;
        self.masters_seen_by(node.port)?
            .into_iter()
            .find(|(a, b, _)| (*a..=*b).contains(&slot))
            .map(|(_, _, port)| port)
    }

    /// The ports of the masters, as a live node sees them.
    pub fn masters(&self) -> Vec<u16> {
        let node = self.live().next().expect("a live node");
        let mut ports: Vec<u16> = self
            .masters_seen_by(node.port)
            .unwrap_or_default()
            .into_iter()
            .map(|(_, _, port)| port)
            .collect();
        ports.sort();
        ports.dedup();
        ports
    }

    /// The port of a live replica of the master on `master`.
    pub fn replica_of(&self, master: u16) -> Option<u16> {
        self.live().map(|n| n.port).find(|&port| {
            // ROLE: slave, master host, master port, ...
            self.ask(port, &["ROLE"]).is_some_and(|role| {
                role.first().map(String::as_str) == Some("slave")
                    && role.get(2) == Some(&master.to_string())
            })
        })
    }

    /// Moves hash slot `slot`, its keys included, to the master on `to`, as
    /// `redis-cli --cluster reshard` does for each slot: `CLUSTER SETSLOT` `IMPORTING` and
    /// `MIGRATING`, `MIGRATE` of its keys, then `SETSLOT ... NODE` on every master.
    pub fn move_slot(&self, slot: u16, to: u16) {
        let from = self.master_of(slot).expect("a master serves the slot");
        let id = |port: u16| {
            self.ask(port, &["CLUSTER", "MYID"])
                .and_then(|w| w.into_iter().next())
                .expect("CLUSTER MYID")
        };
        let (from_id, to_id) = (id(from), id(to));
        let s = slot.to_string();
        let to_port = to.to_string();
        self.ask(to, &["CLUSTER", "SETSLOT", &s, "IMPORTING", &from_id])
            .expect("SETSLOT IMPORTING");
        self.ask(from, &["CLUSTER", "SETSLOT", &s, "MIGRATING", &to_id])
            .expect("SETSLOT MIGRATING");
        loop {
            let keys = self
                .ask(from, &["CLUSTER", "GETKEYSINSLOT", &s, "100"])
                .expect("GETKEYSINSLOT");
            if keys.is_empty() {
                break;
            }
            let mut migrate = vec!["MIGRATE", "127.0.0.1", &to_port, "", "0", "5000", "KEYS"];
            migrate.extend(keys.iter().map(String::as_str));
            self.ask(from, &migrate).expect("MIGRATE");
        }
        let mut masters: Vec<u16> = vec![to, from];
        masters.extend(
            self.live()
                .map(|n| n.port)
                .filter(|p| *p != to && *p != from),
        );
        for port in masters {
            // A replica refuses; only the masters' answers matter.
            let _ = self.ask(port, &["CLUSTER", "SETSLOT", &s, "NODE", &to_id]);
        }
    }

    /// The node on `port`.
    pub fn node(&self, port: u16) -> &RedisServer {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .expect("a node of this cluster")
    }
}

impl RedisCluster {
    /// A client for the node on `port` (over TLS with the cluster's CA, if it has one).
    pub fn client(&self, port: u16) -> redis::Client {
        node_client(port, self.ca.as_deref())
    }

    /// [`ask_client`] for the node on `port`.
    pub fn ask(&self, port: u16, args: &[&str]) -> Option<Vec<String>> {
        ask_client(&self.client(port), args)
    }

    /// `CLUSTER SLOTS` as the node on `port` answers it: (first slot, last slot, master
    /// port).
    fn masters_seen_by(&self, port: u16) -> Option<Vec<(u16, u16, u16)>> {
        let client = self.client(port);
        let mut conn = client
            .get_connection_with_timeout(Duration::from_secs(2))
            .ok()?;
        // Each range: first, last, then the master as [ip, port, id, hostname info...].
        let slots: Vec<Vec<redis::Value>> =
            redis::cmd("CLUSTER").arg("SLOTS").query(&mut conn).ok()?;
        let mut out = Vec::new();
        for range in slots {
            let [first, last, master, ..] = range.as_slice() else {
                return None;
            };
            let master: Vec<redis::Value> = redis::from_redis_value_ref(master).ok()?;
            let port: u16 = redis::from_redis_value_ref(master.get(1)?).ok()?;
            out.push((
                redis::from_redis_value_ref(first).ok()?,
                redis::from_redis_value_ref(last).ok()?,
                port,
            ));
        }
        out.sort();
        Some(out)
    }
}

impl Drop for SentinelGroup {
    fn drop(&mut self) {
        for (_, child) in &mut self.sentinels {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A Postgres that accepts TCP connections over TLS only, and a Redis on a TLS port only,
/// with certificates made for them by Debian's `openssl`, for the TLS tests.
pub struct TlsServers {
    pub pg_port: u16,
    /// The directory of the TLS Postgres' Unix socket (the tests' own connections use it).
    pub pg_socket_dir: PathBuf,
    pub redis_port: u16,
    /// `ca.pem`, `other-ca.pem` (signs nothing of ours), `server.pem`/`server.key` (for
    /// `localhost` only), `client.pem`/`client.key` (CN `certuser`).
    pub certs: PathBuf,
}

static TLS_SERVERS: OnceLock<TlsServers> = OnceLock::new();

/// The TLS servers, started once per process.
pub fn tls_servers() -> &'static TlsServers {
    TLS_SERVERS.get_or_init(|| {
        servers();
        let certs = tempfile::Builder::new()
            .prefix("syncar-test-certs-")
            .tempdir()
            .expect("temp dir")
            .keep();
        make_certificates(&certs);
        let (pg_port, pg_socket_dir) = start_postgres(Some(&certs), "");
        let redis = RedisServer::start_with(&[
            "--tls-cert-file",
            &certs.join("server.pem").to_string_lossy(),
            "--tls-key-file",
            &certs.join("server.key").to_string_lossy(),
            "--tls-ca-cert-file",
            &certs.join("ca.pem").to_string_lossy(),
            "--tls-auth-clients",
            "optional",
        ]);
        let redis_port = redis.port;
        CLEANUP.lock().unwrap().push(Cleanup::Kill(
            redis.child.lock().unwrap().as_ref().unwrap().id(),
        ));
        std::mem::forget(redis);
        TlsServers {
            pg_port,
            pg_socket_dir,
            redis_port,
            certs,
        }
    })
}

fn openssl(dir: &Path, args: &[&str]) {
    run_tool(
        Command::new("openssl").args(args).current_dir(dir),
        "openssl",
    );
}

/// Runs `command` to the end; panics, with its output, if it fails, or with the Debian
/// `package` to install if it is missing.
fn run_tool(command: &mut Command, package: &str) {
    let out = command.output().unwrap_or_else(|e| {
        panic!(
            "{:?} not found ({e}): install it with `apt-get install {package}`",
            command.get_program()
        )
    });
    assert!(
        out.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two CAs, a server certificate for `localhost` and a client certificate for `certuser`
/// from the first, all X.509 v3 (rustls refuses v1) with P-256 keys.
fn make_certificates(dir: &Path) {
    let key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    for ca in ["ca", "other-ca"] {
        let (keyout, out, subj) = (
            format!("{ca}.key"),
            format!("{ca}.pem"),
            format!("/CN=syncar test {ca}"),
        );
        let mut args = vec!["req", "-x509"];
        args.extend(key);
        args.extend([
            "-keyout",
            &keyout,
            "-out",
            &out,
            "-days",
            "2",
            "-subj",
            &subj,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(dir, &args);
    }
    for (name, cn, usage) in [
        (
            "server",
            "localhost",
            "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "certuser", "extendedKeyUsage=clientAuth\n"),
    ] {
        let (keyout, csr, pem, ext, subj) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
            format!("/CN={cn}"),
        );
        std::fs::write(
            dir.join(&ext),
            format!("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n{usage}"),
        )
        .unwrap();
        let mut args = vec!["req"];
        args.extend(key);
        args.extend(["-keyout", &keyout, "-out", &csr, "-subj", &subj]);
        openssl(dir, &args);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
    }
    // The tests run as root; syncar reads the client key as whoever runs it.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
}
