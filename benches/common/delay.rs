//! A userspace delay line on loopback: a TCP proxy that holds every chunk it reads for a fixed
//! delay in each direction before writing it on, for benchmarks that put a network between
//! the tiers on a kernel without `netem` (`tc qdisc ... netem` answers "unknown qdisc" here).
//!
//! Each direction of a connection is a queue with a release time per chunk, not a sleep per
//! read: a reader thread stamps what it reads with `now + delay` and queues it, a writer
//! thread writes each chunk at its release time. So pipelined and concurrent traffic keeps
//! its shape (a chunk read while an earlier one waits is not held up behind it), and a
//! round trip through the line costs twice the delay plus the proxy's own work. Threads
//! sleep with a timer slack of 1 ns (`PR_SET_TIMERSLACK`), else Linux adds 50 µs to every
//! wake-up.
//!
//! The line runs in a process of its own (the benchmark's binary again, started with
//! `--delay-line`), so that its CPU can be read from `/proc/[pid]/stat` apart from
//! everything else. Every packet stays on loopback addresses.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The flag that makes the benchmark's binary a delay line: `--delay-line LISTEN_PORT
/// TARGET_PORT ONE_WAY_US`.
pub const FLAG: &str = "--delay-line";

/// A delay line in front of `127.0.0.1:{target}`, listening on `port`; killed when dropped.
pub struct DelayLine {
    pub port: u16,
    child: Child,
}

impl DelayLine {
    /// Starts a line in front of `target` that holds each chunk `one_way` in each direction.
    pub fn spawn(target: u16, one_way: Duration, port: u16) -> DelayLine {
        let exe = std::env::current_exe().expect("the benchmark's own binary");
        let child = Command::new(exe)
            .args([
                FLAG,
                &port.to_string(),
                &target.to_string(),
                &one_way.as_micros().to_string(),
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("start the delay line");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the delay line on {port} never listened"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        DelayLine { port, child }
    }

    /// The line's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time the line has used so far (user + system), in seconds.
    pub fn cpu_secs(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .expect("the delay line's /proc stat");
        let tail = stat.rsplit_once(") ").expect("a stat line").1;
        let fields: Vec<&str> = tail.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        // SAFETY: sysconf has no preconditions.
        ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// If this process was started as a delay line (see [`FLAG`]), serves until killed.
pub fn serve_if_asked() {
    let args: Vec<String> = std::env::args().collect();
    let Some(at) = args.iter().position(|a| a == FLAG) else {
        return;
    };
    let number = |i: usize| -> u64 {
        args.get(at + i)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{FLAG} LISTEN_PORT TARGET_PORT ONE_WAY_US"))
    };
    let (listen, target, one_way) = (
        number(1) as u16,
        number(2) as u16,
        Duration::from_micros(number(3)),
    );
    // SAFETY: prctl with PR_SET_TIMERSLACK takes a plain integer; threads inherit it.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
    let listener = TcpListener::bind(("127.0.0.1", listen)).expect("bind the delay line");
    for client in listener.incoming() {
        let Ok(client) = client else { continue };
        let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
            continue;
        };
        for s in [&client, &server] {
            let _ = s.set_nodelay(true);
        }
        let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        direction(client, server, one_way);
        direction(s2, c2, one_way);
    }
    std::process::exit(0);
}

/// One direction of a connection: what `from` sends reaches `to` `delay` later.
fn direction(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (queue, chunks) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if queue
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        let _ = from.shutdown(Shutdown::Read);
    });
    std::thread::spawn(move || {
        for (release, chunk) in chunks {
            let now = Instant::now();
            if release > now {
                std::thread::sleep(release - now);
            }
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
