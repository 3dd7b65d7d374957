//! Helpers for tests that drive the real `dds` binary.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use dds::cli::cluster::{is_brick_process, ClusterFile};
use dds::{Client, Completion, Outcome, Request};

pub fn dds() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dds"))
}

/// Runs `dds ARGS` and returns its output; panics with both streams if it fails to start.
pub fn run(args: &[&str]) -> Output {
    dds().args(args).output().unwrap_or_else(|e| panic!("run dds {args:?}: {e}"))
}

pub fn run_ok(args: &[&str]) -> Output {
    let out = run(args);
    assert!(out.status.success(), "dds {args:?} failed: {}\nstdout:\n{}\nstderr:\n{}", out.status, text(&out.stdout), text(&out.stderr));
    out
}

pub fn run_with_stdin(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = dds().args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn dds");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A local cluster in a temporary directory, brought down (and checked gone) on drop.
pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub down: bool,
}

impl TestCluster {
    pub fn up(bricks: usize, cores: usize) -> TestCluster {
        Self::up_with(bricks, cores, &[])
    }

    /// `cluster up` with more flags.
    pub fn up_with(bricks: usize, cores: usize, extra: &[&str]) -> TestCluster {
        let dir = tempfile::Builder::new().prefix("dds-test-").tempdir().unwrap();
        let (bricks, cores) = (bricks.to_string(), cores.to_string());
        let mut args = vec!["cluster", "up", "--dir", dir.path().to_str().unwrap(), "--bricks", &bricks, "--cores", &cores];
        args.extend_from_slice(extra);
        run_ok(&args);
        TestCluster { dir, down: false }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn dir_arg(&self) -> String {
        self.dir.path().to_str().unwrap().to_string()
    }

    pub fn file(&self) -> ClusterFile {
        ClusterFile::load(self.path()).unwrap()
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.file().addrs(), self.file().client_config()).unwrap()
    }

    pub fn brick_log(&self, brick: usize) -> String {
        std::fs::read_to_string(self.path().join(format!("brick-{brick}/brick.log"))).unwrap_or_default()
    }

    /// Every authority member's log, one after another (the leader's decisions are in
    /// its own).
    pub fn meta_logs(&self) -> String {
        self.file().meta_logs().iter().map(|p| std::fs::read_to_string(p).unwrap_or_default()).collect()
    }

    pub fn brick_dirs(&self) -> Vec<PathBuf> {
        self.file().bricks.iter().map(|b| b.dir.clone()).collect()
    }

    /// `dds cluster down`, then checks that no brick process is left.
    pub fn down(&mut self) {
        let file = self.file();
        run_ok(&["cluster", "down", "--dir", &self.dir_arg()]);
        self.down = true;
        for b in &file.bricks {
            assert!(!is_brick_process(b), "brick {} (pid {}) still running after cluster down", b.index, b.pid);
            assert!(!Path::new(&format!("/proc/{}", b.pid)).exists() || process_is_zombie(b.pid), "pid {} still exists", b.pid);
        }
    }
}

fn process_is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')))
        .unwrap_or(true)
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if !self.down {
            let _ = run(&["cluster", "down", "--dir", &self.dir_arg()]);
        }
    }
}

pub fn key(prefix: &str, i: usize) -> Vec<u8> {
    format!("{prefix}-{i:05}").into_bytes()
}

pub fn value(prefix: &str, i: usize) -> Vec<u8> {
    format!("value of {prefix} {i} ").repeat(1 + i % 5).into_bytes()
}

/// Writes `n` keys, 32 in flight; every write must succeed.
pub fn write_all(client: &mut Client, prefix: &str, n: usize) {
    write_all_with(client, prefix, n, |i| value(prefix, i));
}

/// `write_all` with the values `value_of` gives.
pub fn write_all_with(client: &mut Client, prefix: &str, n: usize, value_of: impl Fn(usize) -> Vec<u8>) {
    let mut done: Vec<Completion> = Vec::new();
    let mut next = 0;
    let mut finished = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while finished < n {
        while next < n && client.in_flight() < 32 {
            client.submit(Request::Put(&key(prefix, next), &value_of(next))).unwrap();
            next += 1;
        }
        done.clear();
        client.poll(&mut done, Duration::from_millis(10)).unwrap();
        for c in &done {
            assert!(c.result.is_ok(), "write failed: {:?}", c.result);
        }
        finished += done.len();
        assert!(Instant::now() < deadline, "writes did not finish");
    }
}

/// Reads `n` keys back, 32 in flight, and checks each byte for byte.
pub fn check_all(client: &mut Client, prefix: &str, n: usize) {
    check_all_with(client, prefix, n, |i| value(prefix, i));
}

/// `check_all` against the values `value_of` gives.
pub fn check_all_with(client: &mut Client, prefix: &str, n: usize, value_of: impl Fn(usize) -> Vec<u8>) {
    let mut tokens = std::collections::HashMap::new();
    let mut done: Vec<Completion> = Vec::new();
    let mut next = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while next < n || !tokens.is_empty() {
        while next < n && client.in_flight() < 32 {
            tokens.insert(client.submit(Request::Get(&key(prefix, next))).unwrap(), next);
            next += 1;
        }
        done.clear();
        client.poll(&mut done, Duration::from_millis(10)).unwrap();
        for c in done.drain(..) {
            let i = tokens.remove(&c.token).expect("our token");
            match c.result {
                Ok(Outcome::Value(v)) => assert_eq!(v, value_of(i), "{prefix} {i}: wrong value"),
                other => panic!("{prefix} {i}: {other:?}"),
            }
        }
        assert!(Instant::now() < deadline, "reads did not finish");
    }
}

/// Whether `pid` is a running process (a zombie is not).
pub fn process_alive(pid: u32) -> bool {
    !process_is_zombie(pid)
}

/// One recorded operation for a linearizability history: a put when `value` is given,
/// else a get. A put that fails has an unknown outcome (timeouts included,
/// conservatively); a get that fails saw nothing and is not recorded.
pub fn recorded_op(client: &mut Client, key: Vec<u8>, value: Option<Vec<u8>>, now: impl Fn() -> u64) -> Option<dds::check::Operation> {
    use dds::check::{Event, Operation};
    let invoke = now();
    let event = match value {
        Some(value) => match client.put(&key, &value) {
            Ok(()) => Event::Write(Some(value)),
            Err(_) => Event::MaybeWrite(Some(value)),
        },
        None => Event::Read(client.get(&key).ok()?),
    };
    Some(Operation { key, event, invoke, complete: now() })
}

impl TestCluster {
    /// A raw connection to `addr` that has proved the cluster's secret, as every client
    /// does before its first frame.
    pub fn raw_connect(&self, addr: std::net::SocketAddr) -> std::net::TcpStream {
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        dds::auth::client_handshake(&mut s, self.file().secret.as_deref()).expect("the cluster's handshake");
        s.set_read_timeout(None).unwrap();
        s
    }

    /// The map the cluster's authority serves now.
    pub fn authority_map(&self) -> dds::map::ClusterMap {
        dds::rpc::fetch_map(&self.file().meta_addrs(), Duration::from_secs(2), self.file().secret.as_deref()).expect("the authority's map")
    }

    /// Whether the authority's map still holds the brick whose core 0 is at `addr`.
    pub fn authority_holds(&self, addr: std::net::SocketAddr) -> bool {
        self.authority_map().bricks().values().any(|a| a.cores[0] == addr)
    }

    /// Waits until the authority's map no longer holds the brick whose core 0 is at
    /// `addr`; false if it still does after `within`.
    pub fn authority_drops(&self, addr: std::net::SocketAddr, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while self.authority_holds(addr) {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }
}

/// Waits until `pid` has exited, polling every `poll`; false if it still runs after
/// `within`.
pub fn wait_exit(pid: u32, within: Duration, poll: Duration) -> bool {
    let deadline = Instant::now() + within;
    while process_alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(poll);
    }
    true
}

/// Reads `key` from `brick`'s core that stores it, at `map`'s epoch (not through a
/// client's routing), asking again for up to 2 s while the brick has not seen `map`.
pub fn get_on(map: &dds::map::ClusterMap, secret: Option<&dds::Secret>, brick: dds::map::BrickId, key: &[u8]) -> (dds::proto::Status, Vec<u8>) {
    let hash = dds::map::key_hash(key);
    let cores = &map.bricks()[&brick].cores;
    let mut rpc = dds::rpc::Rpc::connect(cores[map.core_of(hash, cores.len())], Duration::from_secs(1), secret).unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let reply = rpc.call(dds::proto::Op::Get, map.epoch(), key, &[], Duration::from_secs(1)).unwrap();
        if reply.0 != dds::proto::Status::Behind || Instant::now() > deadline {
            return reply;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
