//! The map authority (`dds meta`): owns the cluster map, hears every brick's heartbeat,
//! removes bricks that die, and brings partitions short of replicas back to strength
//! by copying them to a live brick. It pushes nothing to clients: they learn new maps
//! lazily from the bricks. The decisions are `authority::Authority` (sans-I/O); this
//! module is its I/O shell: a thread per connection, the map file, and the copy driver.

pub mod authority;
pub mod copy;
pub mod session;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use dds_transport::auth::{self, Secret};

use crate::map::ClusterMap;
use crate::rpc::{read_frame, Rpc};
use authority::{Actions, Authority, AuthorityConfig, Join};
use copy::{Answer, CopyDriver, Step};
use session::Session;

pub const MAP_FILE: &str = "map.json";
/// `<dir>/meta.json`: written once the authority listens.
pub const META_FILE: &str = "meta.json";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MetaFile {
    pub pid: u32,
    pub addr: SocketAddr,
    /// Where its Prometheus metrics are served, if they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("meta: {op} {path}: {source}")]
    File {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("meta: {path} holds a bad map: {why}")]
    BadMap { path: PathBuf, why: String },
    #[error("meta: listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Clone, Debug)]
pub struct MetaConfig {
    pub dir: PathBuf,
    pub listen: SocketAddr,
    pub authority: AuthorityConfig,
    /// Serve Prometheus metrics over HTTP here (`/metrics`).
    pub metrics: Option<SocketAddr>,
    /// The cluster's secret: every connection proves it before its first request, and
    /// the copy driver proves it to the bricks. `None`: open to anyone.
    pub secret: Option<Arc<Secret>>,
}

struct State {
    authority: Authority,
    secret: Option<Arc<Secret>>,
    dir: PathBuf,
    started: Instant,
    /// A map could not be stored: the authority answers nothing more (its map in memory
    /// is one it could forget) and `run` returns `failure`.
    halted: bool,
    failure: Option<MetaError>,
    /// Since start: maps published, copies finished with some partitions copied, copies
    /// that copied nothing, and partitions copied.
    maps_published: u64,
    copies_done: u64,
    copies_failed: u64,
    partitions_copied: u64,
    /// A copy thread is running.
    copying: bool,
}

impl State {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

fn write_atomic(dir: &Path, name: &str, text: &str) -> Result<(), MetaError> {
    crate::durable::write_file(dir, name, text.as_bytes()).map_err(|source| MetaError::File { op: "store", path: dir.join(name), source })
}

/// Carries out a step's actions: the map is made durable before any brick or client
/// can see it; copies start on their own threads. A map that cannot be stored halts
/// the authority (it must never hand out a map it could forget): nothing is answered
/// from then on, and `run` returns the error.
fn apply(shared: &Arc<Mutex<State>>, state: &mut State, actions: Actions) {
    if state.halted {
        return;
    }
    for note in &actions.notes {
        crate::log!("meta", "{note}");
    }
    if actions.map_changed {
        state.maps_published += 1;
        let map = state.authority.map().expect("a changed map exists");
        if let Err(e) = write_atomic(&state.dir, MAP_FILE, &serde_json::to_string_pretty(map).expect("serialises")) {
            crate::log!(warn: "meta", "{e}; stopping");
            state.halted = true;
            state.failure = Some(e);
            return;
        }
    }
    if !actions.copy.is_empty() {
        let epoch = state.authority.map().expect("copying needs a map").epoch();
        let shared = Arc::clone(shared);
        let joins = actions.copy;
        let spawned = std::thread::Builder::new().name("dds-meta-copy".into()).spawn(move || copy_driver(shared, joins, epoch));
        state.copying = spawned.is_ok();
        if let Err(e) = spawned {
            crate::log!(warn: "meta", "cannot start the copy thread: {e}; copy failed, planned again at a later tick");
            state.authority.copy_failed();
        }
    }
}

/// Runs the authority until `stop` is set.
pub fn run(config: &MetaConfig, stop: Arc<AtomicBool>) -> Result<(), MetaError> {
    std::fs::create_dir_all(&config.dir).map_err(|source| MetaError::File { op: "create", path: config.dir.clone(), source })?;
    let map_path = config.dir.join(MAP_FILE);
    let map = match std::fs::read_to_string(&map_path) {
        Ok(text) => Some(ClusterMap::from_json(&text).map_err(|e| MetaError::BadMap { path: map_path.clone(), why: e.to_string() })?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => return Err(MetaError::File { op: "read", path: map_path, source }),
    };
    if let Some(map) = &map {
        crate::log!("meta", "loaded map epoch {} ({} bricks)", map.epoch(), map.bricks().len());
    }
    let listener = TcpListener::bind(config.listen).map_err(|source| MetaError::Listen { addr: config.listen, source })?;
    let addr = listener.local_addr().map_err(|source| MetaError::Listen { addr: config.listen, source })?;
    listener.set_nonblocking(true).map_err(|source| MetaError::Listen { addr, source })?;
    let started = Instant::now();
    let replicas_asked = config.authority.replicas;
    let shared = Arc::new(Mutex::new(State {
        authority: Authority::new(config.authority.clone(), map, 0),
        secret: config.secret.clone(),
        dir: config.dir.clone(),
        started,
        halted: false,
        failure: None,
        maps_published: 0,
        copies_done: 0,
        copies_failed: 0,
        partitions_copied: 0,
        copying: false,
    }));
    let metrics = match config.metrics {
        Some(at) => Some(crate::metrics::listen(at).map_err(|source| MetaError::Listen { addr: at, source })?),
        None => None,
    };
    let metrics_addr = metrics.as_ref().and_then(|l| l.local_addr().ok());
    if let Some(listener) = metrics {
        let (shared, stop, secret) = (Arc::clone(&shared), Arc::clone(&stop), config.secret.clone());
        std::thread::Builder::new()
            .name("dds-meta-metrics".into())
            .spawn(move || crate::metrics::serve(listener, &stop, secret.as_deref(), || samples(&shared.lock(), replicas_asked)))
            .map_err(|source| MetaError::File { op: "start the metrics thread for", path: config.dir.clone(), source })?;
    }
    write_atomic(&config.dir, META_FILE, &serde_json::to_string(&MetaFile { pid: std::process::id(), addr, metrics: metrics_addr }).expect("serialises"))?;
    crate::log!("meta", "map authority on {addr}, waiting for {} brick(s)", config.authority.bricks);
    if let Some(at) = metrics_addr {
        crate::log!("meta", "metrics on http://{at}/metrics");
    }
    let mut last_tick = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if let Some(e) = shared.lock().failure.take() {
            return Err(e);
        }
        match listener.accept() {
            Ok((stream, peer)) => {
                let shared = Arc::clone(&shared);
                // On failure the closure drops, and the connection with it.
                if let Err(e) = std::thread::Builder::new().name("dds-meta-conn".into()).spawn(move || serve(stream, shared)) {
                    crate::log!(warn: "meta", "cannot start a thread for {peer}: {e}; closing the connection");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => crate::log!(warn: "meta", "accept: {e}"),
        }
        if last_tick.elapsed() >= Duration::from_millis(50) {
            last_tick = Instant::now();
            let mut state = shared.lock();
            let now = state.now_ms();
            let actions = state.authority.tick(now);
            apply(&shared, &mut state, actions);
        }
    }
    crate::log!("meta", "stopped");
    Ok(())
}

/// One connection: a brick's session (after `Register`), or anyone asking for the map
/// (`session::Session` decides; this is its socket).
fn serve(mut stream: TcpStream, shared: Arc<Mutex<State>>) {
    use std::io::Write;
    let peer = stream.peer_addr().map_or_else(|_| "an unknown peer".to_string(), |a| a.to_string());
    let _ = stream.set_nodelay(true);
    let secret = shared.lock().secret.clone();
    if let Err(e) = auth::server_handshake(&mut stream, secret.as_deref()) {
        crate::log!(warn: "meta", "refused connection from {peer}: {e}");
        return;
    }
    let mut session = Session::new(peer.clone());
    let mut buf = Vec::new();
    let mut out = Vec::new();
    loop {
        match read_frame(&mut stream, &mut buf) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                if session.is_brick() {
                    crate::log!(warn: "meta", "session with {peer} ended: {e}");
                }
                break;
            }
        }
        {
            let mut state = shared.lock();
            if state.halted {
                break;
            }
            let now = state.now_ms();
            match session.on_frame(&mut state.authority, now, &buf, &mut out) {
                Ok(actions) => apply(&shared, &mut state, actions),
                Err(why) => {
                    crate::log!(warn: "meta", "{why}");
                    break;
                }
            }
            if state.halted {
                break;
            }
        }
        if stream.write_all(&out).is_err() {
            break;
        }
    }
    let mut state = shared.lock();
    let now = state.now_ms();
    let actions = session.on_close(&mut state.authority, now);
    apply(&shared, &mut state, actions);
}

/// The copy thread: drives a `copy::CopyDriver` over blocking rpcs, one connection
/// per line, then reports what finished to the authority.
fn copy_driver(shared: Arc<Mutex<State>>, joins: Vec<Join>, epoch: u64) {
    let now_ms = || shared.lock().now_ms();
    let mut driver = CopyDriver::new(joins, epoch, now_ms());
    let timeout = Duration::from_millis(copy::COPY_RPC_TIMEOUT_MS);
    let mut lines: [Option<Rpc>; copy::LINES.len()] = Default::default();
    let secret = shared.lock().secret.clone();
    loop {
        let map = shared.lock().authority.map().cloned();
        match driver.poll(map.as_ref(), now_ms()) {
            Step::Call { line, addr, op, epoch, value } => {
                let rpc = &mut lines[line as usize];
                let reply = match rpc {
                    Some(r) => Ok(r),
                    None => Rpc::connect(addr, timeout, secret.as_deref()).map(|r| rpc.insert(r)),
                }
                .and_then(|r| r.call(op, epoch, &[], &value, timeout));
                let answer = match reply {
                    Ok((status, value)) => Answer::Reply(status, value),
                    Err(e) => {
                        *rpc = None;
                        Answer::Lost(e.to_string())
                    }
                };
                driver.answer(answer, now_ms());
            }
            Step::HangUp(line) => lines[line as usize] = None,
            Step::Wait { ms } => std::thread::sleep(Duration::from_millis(ms)),
            Step::Note(note) => crate::log!("meta", "{note}"),
            Step::Finished(done) => {
                let mut state = shared.lock();
                state.copying = false;
                state.partitions_copied += done.len() as u64;
                if done.is_empty() {
                    state.copies_failed += 1;
                } else {
                    state.copies_done += 1;
                }
                let actions = if done.is_empty() {
                    state.authority.copy_failed();
                    Actions::default()
                } else {
                    state.authority.copied(&done)
                };
                return apply(&shared, &mut state, actions);
            }
        }
    }
}

/// What a scrape of the authority's metrics reports: its map and its copies.
fn samples(state: &State, replicas: usize) -> Vec<crate::metrics::Sample> {
    use crate::metrics::{Sample, Value};
    let gauge = |v: usize| Value::Gauge(vec![(vec![], v as i64)]);
    let counter = |v: u64| Value::Counter(vec![(vec![], v)]);
    let map = state.authority.map();
    let (epoch, bricks, partitions, joining, leaving, short) = map.map_or((0, 0, 0, 0, 0, 0), |m| {
        (
            m.epoch() as usize,
            m.bricks().len(),
            m.groups().len(),
            m.joining().values().map(|j| j.len()).sum(),
            m.leaving().values().map(|l| l.len()).sum(),
            m.groups().values().filter(|g| g.len() < replicas).count(),
        )
    });
    vec![
        Sample { name: "meta_map_epoch", help: "Epoch of the newest map published (0: none yet)", value: gauge(epoch) },
        Sample { name: "meta_bricks", help: "Bricks in the map", value: gauge(bricks) },
        Sample { name: "meta_partitions", help: "Partitions in the map", value: gauge(partitions) },
        Sample { name: "meta_partitions_under_replicated", help: "Partitions with fewer replicas than asked", value: gauge(short) },
        Sample { name: "meta_replicas_joining", help: "Replicas being copied to (joining their groups)", value: gauge(joining) },
        Sample { name: "meta_replicas_leaving", help: "Replicas leaving their groups", value: gauge(leaving) },
        Sample { name: "meta_copying", help: "1 while a copy runs", value: gauge(usize::from(state.copying)) },
        Sample { name: "meta_maps_published", help: "Maps published since start", value: counter(state.maps_published) },
        Sample { name: "meta_copies_done", help: "Copies that copied some partitions", value: counter(state.copies_done) },
        Sample { name: "meta_copies_failed", help: "Copies that copied nothing (planned again later)", value: counter(state.copies_failed) },
        Sample { name: "meta_partitions_copied", help: "Partitions copied to joining replicas", value: counter(state.partitions_copied) },
    ]
}
