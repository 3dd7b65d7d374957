//! The map authority (`dds meta`): owns the cluster map, hears every brick's heartbeat,
//! removes bricks that die, and brings partitions short of replicas back to strength
//! by copying them to a live brick. It pushes nothing to clients: they learn new maps
//! lazily from the bricks. The decisions are `authority::Authority` (sans-I/O); this
//! module is its I/O shell: a thread per connection, the map file, and the copy driver.

pub mod authority;
pub mod copy;
pub mod member;
pub mod raft_log;
pub mod session;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};

use dds_transport::auth::{self, Secret};

use crate::log::{FsDisk, LogError};
use crate::map::ClusterMap;
use crate::rpc::{read_frame, Rpc};
use authority::AuthorityConfig;
use copy::{Answer, CopyDriver, Step};
use member::{CopyPlan, Member, MemberConfig, MemberError, Output, Settled, TICK_MS};
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
    #[error("meta: raft log: {0}")]
    RaftLog(String),
    #[error("meta: {0}")]
    Members(String),
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
    /// This member's raft id, among `members`.
    pub id: u64,
    /// Every member of the authority group, this one included (its address must be
    /// `listen`'s). Empty: a group of one (or, with `join`, none given). Used only when
    /// the raft log is new: a log holds its own.
    pub members: Vec<(u64, SocketAddr)>,
    /// Members of a running group to join (`dds meta --join`): the leader adds this one
    /// (`id`, at its address) before it starts, if its raft log is new.
    pub join: Vec<SocketAddr>,
}

struct State {
    member: Member<FsDisk>,
    secret: Option<Arc<Secret>>,
    dir: PathBuf,
    started: Instant,
    /// The raft log failed (a write, an fsync): the member answers nothing more and
    /// `run` returns `failure` (fail-stop: never retried).
    halted: bool,
    failure: Option<MetaError>,
    /// Raft messages for each other member, to its sender thread.
    peers: Vec<(u64, SyncSender<Vec<u8>>)>,
    /// Since start: maps published, copies finished with some partitions copied, copies
    /// that copied nothing, and partitions copied.
    maps_published: u64,
    copies_done: u64,
    copies_failed: u64,
    partitions_copied: u64,
    /// A copy thread is running.
    copying: bool,
    /// Raft messages to each other member go through a sender thread of its own; these
    /// end them.
    stop: Arc<AtomicBool>,
    /// This member was removed from the group: `run` returns.
    removed: bool,
}

impl State {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

/// The member's state, and the condition a connection thread holding a reply waits on
/// (signalled after every step, when a reply may have settled).
struct Shared {
    state: Mutex<State>,
    settled: Condvar,
}

/// How long a reply waits for what it depends on to be committed before its connection
/// is closed instead (the peer asks again, and finds the leader).
const SETTLE_MAX: Duration = Duration::from_secs(2);
/// Raft messages queued for one member before more are dropped (raft sends again).
const PEER_QUEUE_MAX: usize = 1024;

fn write_atomic(dir: &Path, name: &str, text: &str) -> Result<(), MetaError> {
    crate::durable::write_file(dir, name, text.as_bytes()).map_err(|source| MetaError::File { op: "store", path: dir.join(name), source })
}

/// Carries out what a step of the member asked for: raft messages to their senders,
/// log lines, a copy of a newly committed map in `map.json` (for people: the raft log
/// is what counts), a copy thread. A step that failed on the raft log halts the member.
fn carry_out(shared: &Arc<Shared>, state: &mut State, step: Result<Output, impl Into<MetaError>>) {
    shared.settled.notify_all();
    let out = match step {
        Ok(out) => out,
        Err(e) => {
            let e = e.into();
            crate::log!(warn: "meta", "{e}; stopping");
            state.halted = true;
            state.failure.get_or_insert(e);
            return;
        }
    };
    if out.members_changed {
        sync_peers(state);
    }
    if out.removed {
        crate::log!("meta", "member {} was removed from the group; stopping", state.member.id());
        state.halted = true;
        state.removed = true;
    }
    for (to, frame) in out.messages {
        if let Some((_, tx)) = state.peers.iter().find(|(id, _)| *id == to) {
            let _ = tx.try_send(frame);
        }
    }
    for note in &out.notes {
        crate::log!("meta", "{note}");
    }
    if out.published {
        state.maps_published += 1;
        if let Some(map) = state.member.published() {
            if let Err(e) = write_atomic(&state.dir, MAP_FILE, &serde_json::to_string_pretty(map).expect("serialises")) {
                crate::log!(warn: "meta", "{e} (a copy for people; the raft log holds the map)");
            }
        }
    }
    if let Some(plan) = out.copy {
        let shared2 = Arc::clone(shared);
        let spawned = std::thread::Builder::new().name("dds-meta-copy".into()).spawn(move || copy_driver(shared2, plan));
        state.copying = spawned.is_ok();
        if let Err(e) = spawned {
            crate::log!(warn: "meta", "cannot start the copy thread: {e}; copy failed, planned again at a later tick");
        }
    }
}

impl From<LogError> for MetaError {
    fn from(e: LogError) -> MetaError {
        MetaError::RaftLog(e.to_string())
    }
}

impl From<MemberError> for MetaError {
    fn from(e: MemberError) -> MetaError {
        MetaError::RaftLog(e.to_string())
    }
}

/// A sender thread for every other member of the group, and none for one that left.
fn sync_peers(state: &mut State) {
    let now = state.member.peers();
    state.peers.retain(|(id, _)| now.iter().any(|(m, _)| m == id));
    for (peer, peer_addr) in now {
        if state.peers.iter().any(|(id, _)| *id == peer) {
            continue;
        }
        let (tx, rx) = sync_channel(PEER_QUEUE_MAX);
        let (stop, secret) = (Arc::clone(&state.stop), state.secret.clone());
        let spawned = std::thread::Builder::new().name(format!("dds-meta-peer-{peer}")).spawn(move || send_to_peer(peer_addr, rx, &stop, secret.as_deref()));
        match spawned {
            Ok(_) => state.peers.push((peer, tx)),
            // Raft sends again: the next membership change, or restart, tries anew.
            Err(e) => crate::log!(warn: "meta", "cannot start a sender thread for member {peer}: {e}; its messages are dropped"),
        }
    }
}

/// How long `dds meta --join` keeps asking the group to add it.
const JOIN_MAX: Duration = Duration::from_secs(30);

/// The members of the group this process belongs to, this one's id first checked.
fn membership(config: &MetaConfig, addr: SocketAddr) -> Result<(u64, Vec<(u64, SocketAddr)>), MetaError> {
    if !config.join.is_empty() {
        return Ok((config.id, config.members.clone()));
    }
    if config.members.is_empty() {
        return Ok((config.id, vec![(config.id, addr)]));
    }
    if !config.members.iter().any(|(id, _)| *id == config.id) {
        return Err(MetaError::Members(format!("member {} is not among --member {:?}", config.id, config.members)));
    }
    Ok((config.id, config.members.clone()))
}

/// Runs the authority member until `stop` is set.
pub fn run(config: &MetaConfig, stop: Arc<AtomicBool>) -> Result<(), MetaError> {
    std::fs::create_dir_all(&config.dir).map_err(|source| MetaError::File { op: "create", path: config.dir.clone(), source })?;
    let listener = TcpListener::bind(config.listen).map_err(|source| MetaError::Listen { addr: config.listen, source })?;
    let addr = listener.local_addr().map_err(|source| MetaError::Listen { addr: config.listen, source })?;
    listener.set_nonblocking(true).map_err(|source| MetaError::Listen { addr, source })?;
    let (id, mut members) = membership(config, addr)?;
    let mut known = Vec::new();
    let log_is_new = std::fs::metadata(config.dir.join(raft_log::RAFT_LOG_FILE)).map_or(true, |m| m.len() == 0);
    if !config.join.is_empty() && log_is_new {
        crate::log!("meta", "member {id} at {addr}: asking {:?} to add it to the group", config.join);
        let request = crate::proto::MemberRequest::Add { id, addr };
        let list = crate::rpc::ask_members(&config.join, &request, config.secret.as_deref(), JOIN_MAX).map_err(|e| MetaError::Members(format!("joining as member {id} at {addr}: {e}")))?;
        crate::log!("meta", "member {id} added: the group is now {:?}", list.members);
        (members, known) = (list.boot, list.members);
    }
    let member_config = MemberConfig { id, members, known, authority: config.authority.clone() };
    // A directory an authority of an earlier version left: its map seeds the group if
    // the raft log holds none (the member says so when it does).
    let map_path = config.dir.join(MAP_FILE);
    let initial = match std::fs::read_to_string(&map_path) {
        Ok(text) => Some(ClusterMap::from_json(&text).map_err(|e| MetaError::BadMap { path: map_path.clone(), why: e.to_string() })?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => return Err(MetaError::File { op: "read", path: map_path, source }),
    };
    let member = Member::open(member_config, FsDisk::default(), &config.dir, crate::hash::random_u64(), initial).map_err(|e| MetaError::RaftLog(e.to_string()))?;
    if let Some(map) = member.published() {
        crate::log!("meta", "member {id}: raft log replayed, map epoch {} ({} bricks)", map.epoch(), map.bricks().len());
    }
    let started = Instant::now();
    let replicas_asked = config.authority.replicas;
    let group_size = member.members().members.len();
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            member,
            secret: config.secret.clone(),
            dir: config.dir.clone(),
            started,
            halted: false,
            failure: None,
            peers: Vec::new(),
            maps_published: 0,
            copies_done: 0,
            copies_failed: 0,
            partitions_copied: 0,
            copying: false,
            stop: Arc::clone(&stop),
            removed: false,
        }),
        settled: Condvar::new(),
    });
    let metrics = match config.metrics {
        Some(at) => Some(crate::metrics::listen(at).map_err(|source| MetaError::Listen { addr: at, source })?),
        None => None,
    };
    let metrics_addr = metrics.as_ref().and_then(|l| l.local_addr().ok());
    if let Some(listener) = metrics {
        let (shared, stop, secret) = (Arc::clone(&shared), Arc::clone(&stop), config.secret.clone());
        std::thread::Builder::new()
            .name("dds-meta-metrics".into())
            .spawn(move || crate::metrics::serve(listener, &stop, secret.as_deref(), || samples(&shared.state.lock(), replicas_asked)))
            .map_err(|source| MetaError::File { op: "start the metrics thread for", path: config.dir.clone(), source })?;
    }
    write_atomic(&config.dir, META_FILE, &serde_json::to_string(&MetaFile { pid: std::process::id(), addr, metrics: metrics_addr }).expect("serialises"))?;
    // Senders for the group the log holds; later changes come as `members_changed`.
    sync_peers(&mut shared.state.lock());
    match group_size {
        1 => crate::log!("meta", "map authority on {addr}, waiting for {} brick(s)", config.authority.bricks),
        n => crate::log!("meta", "map authority member {id} of {n} on {addr}, waiting for {} brick(s)", config.authority.bricks),
    }
    if let Some(at) = metrics_addr {
        crate::log!("meta", "metrics on http://{at}/metrics");
    }
    let mut last_tick = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        {
            let mut state = shared.state.lock();
            if let Some(e) = state.failure.take() {
                return Err(e);
            }
            if state.removed {
                stop.store(true, Ordering::Relaxed);
                return Ok(());
            }
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
        if last_tick.elapsed() >= Duration::from_millis(TICK_MS) {
            last_tick = Instant::now();
            let mut state = shared.state.lock();
            if !state.halted {
                let now = state.now_ms();
                let step = state.member.tick(now);
                carry_out(&shared, &mut state, step);
            }
        }
    }
    crate::log!("meta", "stopped");
    Ok(())
}

/// Sends raft messages to member `addr` over one connection, made (and proved) again
/// after any failure; messages that come meanwhile are dropped (raft sends again).
fn send_to_peer(addr: SocketAddr, rx: Receiver<Vec<u8>>, stop: &AtomicBool, secret: Option<&Secret>) {
    use std::io::Write;
    let mut stream: Option<TcpStream> = None;
    let mut last_failure: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        let frame = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(frame) => frame,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        if stream.is_none() {
            if last_failure.is_some_and(|t| t.elapsed() < Duration::from_millis(TICK_MS)) {
                continue;
            }
            match Rpc::connect(addr, Duration::from_millis(200), secret) {
                Ok(rpc) => stream = Some(rpc.into_stream()),
                Err(_) => {
                    last_failure = Some(Instant::now());
                    continue;
                }
            }
        }
        let s = stream.as_mut().expect("connected");
        if s.write_all(&frame).is_err() {
            stream = None;
            last_failure = Some(Instant::now());
        }
    }
}

/// One connection: a brick's session (after `Register`), anyone asking for the map, or
/// another member's raft messages (`Member::on_frame` decides; this is its socket).
fn serve(mut stream: TcpStream, shared: Arc<Shared>) {
    use std::io::Write;
    let peer = stream.peer_addr().map_or_else(|_| "an unknown peer".to_string(), |a| a.to_string());
    let _ = stream.set_nodelay(true);
    let secret = shared.state.lock().secret.clone();
    if let Err(e) = auth::server_handshake(&mut stream, secret.as_deref()) {
        crate::log!(warn: "meta", "refused connection from {peer}: {e}");
        return;
    }
    let mut session = Session::new(peer.clone());
    let mut buf = Vec::new();
    let mut out = Vec::new();
    'frames: loop {
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
            let mut state = shared.state.lock();
            if state.halted {
                break;
            }
            let now = state.now_ms();
            let ticket = match state.member.on_frame(&mut session, now, &buf, &mut out) {
                Ok((ticket, step)) => {
                    carry_out(&shared, &mut state, Ok::<_, MetaError>(step));
                    ticket
                }
                Err(MemberError::Log(e)) => {
                    carry_out(&shared, &mut state, Err::<Output, _>(e));
                    break;
                }
                Err(why) => {
                    crate::log!(warn: "meta", "closing {peer}: {why}");
                    break;
                }
            };
            // The reply leaves once what it depends on is committed.
            let deadline = Instant::now() + SETTLE_MAX;
            loop {
                match state.member.settle(ticket) {
                    Settled::Send => break,
                    Settled::Lost => break 'frames,
                    Settled::Wait if state.halted || Instant::now() >= deadline => break 'frames,
                    Settled::Wait => {
                        shared.settled.wait_until(&mut state, deadline);
                    }
                }
            }
        }
        if !out.is_empty() && stream.write_all(&out).is_err() {
            break;
        }
    }
    let mut state = shared.state.lock();
    if !state.halted {
        let now = state.now_ms();
        let step = state.member.on_close(&session, now);
        carry_out(&shared, &mut state, step);
    }
}

/// The copy thread: drives a `copy::CopyDriver` by the committed map, a worker thread
/// per lane making its blocking rpcs (`lane_worker`), then reports what finished to the
/// member. It stops at once when the member no longer leads in the plan's term; the
/// workers end with their current call.
fn copy_driver(shared: Arc<Shared>, plan: CopyPlan) {
    let now_ms = || shared.state.lock().now_ms();
    let mut driver = CopyDriver::new(plan.joins, plan.epoch, now_ms());
    let secret = shared.state.lock().secret.clone();
    let (answer_tx, answers) = std::sync::mpsc::channel::<(usize, Answer)>();
    let mut lanes = Vec::with_capacity(copy::COPY_LANES);
    for lane in 0..copy::COPY_LANES {
        let (tx, rx) = std::sync::mpsc::channel();
        let (answer_tx, secret) = (answer_tx.clone(), secret.clone());
        match std::thread::Builder::new().name(format!("dds-meta-copy-{lane}")).spawn(move || lane_worker(lane, rx, answer_tx, secret)) {
            Ok(_) => lanes.push(tx),
            Err(e) => {
                crate::log!(warn: "meta", "cannot start copy lane {lane}: {e}; copy failed, planned again at a later tick");
                return copy_finished(&shared, plan.term, Vec::new());
            }
        }
    }
    // The committed map, cloned again only when its epoch changes.
    let mut map: Option<ClusterMap> = None;
    loop {
        {
            let mut state = shared.state.lock();
            if !state.member.leads_in(plan.term) {
                crate::log!("meta", "copy planned in term {} abandoned: this member no longer leads in it", plan.term);
                state.copying = false;
                return;
            }
            let newest = state.member.published();
            if newest.map(ClusterMap::epoch) != map.as_ref().map(ClusterMap::epoch) {
                map = newest.cloned();
            }
        }
        match driver.poll(map.as_ref(), now_ms()) {
            Step::Call { lane, line, addr, op, epoch, value } => {
                if lanes[lane].send(LaneJob::Call { line, addr, op, epoch, value }).is_err() {
                    driver.answer(lane, Answer::Lost("copy lane stopped".into()), now_ms());
                }
            }
            Step::HangUp { lane, line } => {
                let _ = lanes[lane].send(LaneJob::HangUp(line));
            }
            // Whichever comes first: an answer, the pause's end, or a look at whether
            // this member still leads.
            Step::Wait { ms } => {
                let wait = ms.unwrap_or(COPY_LEADER_CHECK_MS).min(COPY_LEADER_CHECK_MS);
                if let Ok((lane, answer)) = answers.recv_timeout(Duration::from_millis(wait)) {
                    driver.answer(lane, answer, now_ms());
                }
            }
            Step::Note(note) => crate::log!("meta", "{note}"),
            Step::Finished(done) => return copy_finished(&shared, plan.term, done),
        }
    }
}

/// How often a copy waiting for answers checks that its member still leads.
const COPY_LEADER_CHECK_MS: u64 = 100;

/// What the copy thread asks of a lane's worker.
enum LaneJob {
    Call { line: copy::Line, addr: SocketAddr, op: crate::proto::Op, epoch: u64, value: Vec<u8> },
    HangUp(copy::Line),
}

/// A copy lane's blocking rpcs, one connection per line (kept while calls go to the
/// same address); ends when the copy thread drops its sender or its answers.
fn lane_worker(lane: usize, jobs: std::sync::mpsc::Receiver<LaneJob>, answers: std::sync::mpsc::Sender<(usize, Answer)>, secret: Option<Arc<Secret>>) {
    let timeout = Duration::from_millis(copy::COPY_RPC_TIMEOUT_MS);
    let mut lines: [Option<Rpc>; copy::LINE_COUNT] = Default::default();
    for job in jobs {
        match job {
            LaneJob::HangUp(line) => lines[line.index()] = None,
            LaneJob::Call { line, addr, op, epoch, value } => {
                let rpc = &mut lines[line.index()];
                if rpc.as_ref().is_some_and(|r| r.addr() != addr) {
                    *rpc = None;
                }
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
                if answers.send((lane, answer)).is_err() {
                    return;
                }
            }
        }
    }
}

/// A copy is over: counts it and hands what finished to the member.
fn copy_finished(shared: &Arc<Shared>, term: u64, done: Vec<authority::Join>) {
    let mut state = shared.state.lock();
    state.copying = false;
    state.partitions_copied += done.len() as u64;
    if done.is_empty() {
        state.copies_failed += 1;
    } else {
        state.copies_done += 1;
    }
    if state.halted {
        return;
    }
    let now = state.now_ms();
    let step = state.member.copied(term, &done, now);
    carry_out(shared, &mut state, step)
}

/// What a scrape of the authority's metrics reports: its map and its copies.
fn samples(state: &State, replicas: usize) -> Vec<crate::metrics::Sample> {
    use crate::metrics::{Sample, Value};
    let gauge = |v: usize| Value::Gauge(vec![(vec![], v as i64)]);
    let counter = |v: u64| Value::Counter(vec![(vec![], v)]);
    let map = state.member.published();
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
    let member = &state.member;
    vec![
        Sample { name: "meta_raft_term", help: "This member's raft term", value: gauge(member.term() as usize) },
        Sample { name: "meta_leader", help: "1 while this member leads the authority group (sum over members: 1 when healthy)", value: gauge(usize::from(member.is_leader())) },
        Sample { name: "meta_members", help: "Voters of the authority group, as this member has them committed", value: gauge(member.members().members.len()) },
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
