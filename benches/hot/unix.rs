//! An L1 hit over a Unix domain socket against the same over loopback TCP, with one client
//! for both (a Rust hyper client on a 2-thread runtime, like wrk's `-t2`): what the socket
//! saves. And [`raw_get_run`]: one connection from a blocking client that writes prebuilt
//! requests and reads the answers itself, as `redis-benchmark` does for Redis. `redis-benchmark` GET over TCP and over Redis' own `unixsocket` is run beside it by
//! the caller.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

/// Where the client connects.
#[derive(Clone)]
pub enum Target {
    Tcp(u16),
    Unix(PathBuf),
}

/// Requests per second and latency percentiles (ms) of one run.
pub struct Run {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
}

impl Run {
    /// From every request's latency (ms) over `elapsed` seconds.
    fn from_latencies(mut ms: Vec<f64>, elapsed: f64) -> Run {
        ms.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| ms[((ms.len() as f64 * q) as usize).min(ms.len() - 1)];
        Run {
            rps: ms.len() as f64 / elapsed,
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            p999_ms: at(0.999),
        }
    }
}

async fn connection(target: &Target) -> http1::SendRequest<Full<Bytes>> {
    match target {
        Target::Tcp(port) => {
            let s = tokio::net::TcpStream::connect(("127.0.0.1", *port))
                .await
                .unwrap();
            s.set_nodelay(true).unwrap();
            let (sender, conn) = http1::handshake(TokioIo::new(s)).await.unwrap();
            tokio::spawn(conn);
            sender
        }
        Target::Unix(path) => {
            let s = tokio::net::UnixStream::connect(path).await.unwrap();
            let (sender, conn) = http1::handshake(TokioIo::new(s)).await.unwrap();
            tokio::spawn(conn);
            sender
        }
    }
}

/// `conns` keep-alive connections, each sending GETs of random keys `k1..=k{keys}` one after
/// another for `secs`, on a 2-thread runtime.
pub fn get_run(target: &Target, conns: usize, keys: usize, secs: u64) -> Run {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    get_run_on(&runtime, target, conns, keys, secs)
}

fn get_run_on(
    runtime: &tokio::runtime::Runtime,
    target: &Target,
    conns: usize,
    keys: usize,
    secs: u64,
) -> Run {
    runtime.block_on(async {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for _ in 0..conns {
            let target = target.clone();
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let mut sender = connection(&target).await;
                let mut ms = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let path = format!("/v1/kv/k{}", fastrand::usize(1..=keys));
                    let req = http::Request::builder()
                        .uri(path)
                        .header("host", "bench")
                        .body(Full::new(Bytes::new()))
                        .unwrap();
                    let t = Instant::now();
                    sender.ready().await.unwrap();
                    let resp = sender.send_request(req).await.unwrap();
                    assert_eq!(resp.status(), 200);
                    resp.into_body().collect().await.unwrap();
                    ms.push(t.elapsed().as_secs_f64() * 1e3);
                }
                ms
            }));
        }
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs(secs)).await;
        stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        Run::from_latencies(all, start.elapsed().as_secs_f64())
    })
}

/// One keep-alive connection from a blocking client on the calling thread: prebuilt
/// `GET /v1/kv/k{n}` requests (random keys `k1..=k{keys}`), each answer read up to its
/// `content-length` (status 200 asserted), one after another for `secs`. No runtime, no
/// parser beyond the header it needs: a `redis-benchmark`-class client, so that a hit's
/// latency is the server's and the kernel's, not the client's.
pub fn raw_get_run(target: &Target, keys: usize, secs: u64) -> Run {
    use std::io::{Read, Write};
    let mut stream: Box<dyn ReadWrite> = match target {
        Target::Tcp(port) => {
            let s = std::net::TcpStream::connect(("127.0.0.1", *port)).unwrap();
            s.set_nodelay(true).unwrap();
            Box::new(s)
        }
        Target::Unix(path) => Box::new(std::os::unix::net::UnixStream::connect(path).unwrap()),
    };
    let requests: Vec<Vec<u8>> = (1..=keys)
        .map(|k| format!("GET /v1/kv/k{k} HTTP/1.1\r\nHost: bench\r\n\r\n").into_bytes())
        .collect();
    let mut buf = vec![0u8; 64 * 1024];
    let mut ms = Vec::new();
    let start = Instant::now();
    let until = start + Duration::from_secs(secs);
    while Instant::now() < until {
        let request = &requests[fastrand::usize(..keys)];
        let t = Instant::now();
        stream.write_all(request).unwrap();
        let mut filled = 0;
        let total = loop {
            let n = stream.read(&mut buf[filled..]).unwrap();
            assert!(n > 0, "syncar closed the connection");
            filled += n;
            if let Some(end) = buf[..filled].windows(4).position(|w| w == b"\r\n\r\n") {
                let head = std::str::from_utf8(&buf[..end]).unwrap();
                assert!(head.starts_with("HTTP/1.1 200"), "not a 200: {head}");
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse().ok())?
                    })
                    .expect("an answer with a content-length");
                break end + 4 + length;
            }
        };
        while filled < total {
            let n = stream.read(&mut buf[filled..total]).unwrap();
            assert!(n > 0, "syncar closed the connection");
            filled += n;
        }
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Run::from_latencies(ms, start.elapsed().as_secs_f64())
}

/// A byte stream the raw client reads and writes: TCP or a Unix socket.
trait ReadWrite: std::io::Read + std::io::Write {}
impl<T: std::io::Read + std::io::Write> ReadWrite for T {}

/// A path for a socket in `dir`.
pub fn socket(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}
