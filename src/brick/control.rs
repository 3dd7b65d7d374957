//! A brick's control plane: the map every core routes by, and the thread that keeps it
//! fresh by heartbeats to the map authority. Control state is shared through
//! `parking_lot` and atomics; cores only read it once per loop round.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use super::lease::{self, Answer, Lease, Step};
use super::round::{lease_expired, Control};
use crate::map::{BrickAddr, BrickId, ClusterMap};
use crate::proto::{Op, Status, HEARTBEAT_MS, LEASE_MS};
use crate::rpc::Rpc;
use dds_transport::auth::Secret;

/// What the cores and the control thread share.
pub struct Shared {
    pub me: BrickId,
    pub epoch: AtomicU64,
    map: RwLock<Arc<ClusterMap>>,
    pub fenced: AtomicBool,
    /// A core saw a request from a newer epoch: fetch the map now.
    pub refresh: AtomicBool,
    /// The authority removed this brick (declared it dead) while it ran: it stops.
    pub removed: AtomicBool,
    /// When the authority last answered (ms since `started`); `u64::MAX`: this brick
    /// runs alone and holds no lease.
    lease_ok_ms: AtomicU64,
    started: Instant,
    pub stop: Arc<AtomicBool>,
}

impl Shared {
    /// `started`: the clock the lease's times count from (`Lease`, `now_ms`).
    pub fn new(me: BrickId, map: ClusterMap, started: Instant, stop: Arc<AtomicBool>) -> Shared {
        Shared {
            me,
            epoch: AtomicU64::new(map.epoch()),
            map: RwLock::new(Arc::new(map)),
            fenced: AtomicBool::new(false),
            refresh: AtomicBool::new(false),
            removed: AtomicBool::new(false),
            lease_ok_ms: AtomicU64::new(u64::MAX),
            started,
            stop,
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Fences the cores now if the lease says so (before the session is dropped).
    fn raise_fence(&self, lease: &Lease) {
        if lease.fenced() {
            self.fenced.store(true, Ordering::SeqCst);
        }
    }

    /// Publishes the lease to the cores: it runs `LEASE_MS` from `lease.lease_from_ms()`,
    /// and a fence it holds goes up before the lease moves.
    pub fn publish(&self, lease: &Lease) {
        self.raise_fence(lease);
        self.lease_ok_ms.store(lease.lease_from_ms(), Ordering::Release);
        if !lease.fenced() {
            self.fenced.store(false, Ordering::SeqCst);
        }
    }

    /// Whether the cores must serve nothing: fenced by the control thread, or the lease
    /// ran out without the control thread noticing yet (after the whole process was
    /// paused, a core can run before the control thread does).
    pub fn is_fenced(&self) -> bool {
        if self.fenced.load(Ordering::Acquire) {
            return true;
        }
        let ok_ms = self.lease_ok_ms.load(Ordering::Acquire);
        ok_ms != u64::MAX && lease_expired(ok_ms, self.now_ms(), LEASE_MS)
    }

    pub fn map(&self) -> Arc<ClusterMap> {
        Arc::clone(&self.map.read())
    }

    /// Installs `map` if it is newer than the one held.
    pub fn offer(&self, map: ClusterMap) -> bool {
        let mut held = self.map.write();
        if map.epoch() <= held.epoch() {
            return false;
        }
        let epoch = map.epoch();
        *held = Arc::new(map);
        self.epoch.store(epoch, Ordering::Release);
        true
    }
}

impl Control for Shared {
    fn fenced(&self) -> bool {
        self.is_fenced()
    }

    fn newer_map(&self, epoch: u64) -> Option<Arc<ClusterMap>> {
        (self.epoch.load(Ordering::Acquire) > epoch).then(|| self.map())
    }
}

/// `<dir>/identity.json`: the id the authority gave this brick, kept across restarts.
#[derive(Serialize, Deserialize)]
struct Identity {
    id: u32,
}

const IDENTITY_FILE: &str = "identity.json";
const TOKEN_FILE: &str = "token";

pub fn load_identity(dir: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(dir.join(IDENTITY_FILE)).ok()?;
    serde_json::from_str::<Identity>(&text).ok().map(|i| i.id)
}

/// The directory's token (`BrickAddr::token`): drawn and made durable the first time,
/// before the brick ever registers, so a registration whose answer is lost can be
/// matched to the brick when it asks again.
pub fn load_or_make_token(dir: &Path) -> std::io::Result<u64> {
    let path = dir.join(TOKEN_FILE);
    if let Ok(text) = std::fs::read_to_string(&path) {
        if let Some(token) = text.trim().parse::<u64>().ok().filter(|t| *t != 0) {
            return Ok(token);
        }
    }
    let token = crate::hash::random_u64().max(1);
    crate::durable::write_file(dir, TOKEN_FILE, token.to_string().as_bytes())?;
    Ok(token)
}

pub fn store_identity(dir: &Path, id: u32) -> std::io::Result<()> {
    crate::durable::write_file(dir, IDENTITY_FILE, serde_json::to_string(&Identity { id }).expect("serialises").as_bytes())
}

/// The map authority's members, and the one a brick asks now: the leader as far as it
/// knows. A member that cannot be reached sends it to the next; one that does not lead
/// names the leader (`Status::NotLeader`), or, not knowing it, sends it to the next.
/// The most authority addresses a brick keeps (those it was given and those it learnt).
const AUTHORITIES_MAX: usize = 16;

#[derive(Clone, Debug)]
pub struct Authorities {
    addrs: Vec<SocketAddr>,
    at: usize,
}

impl Authorities {
    pub fn new(addrs: &[SocketAddr]) -> Authorities {
        assert!(!addrs.is_empty(), "an authority group has members");
        Authorities { addrs: addrs.to_vec(), at: 0 }
    }

    pub fn current(&self) -> SocketAddr {
        self.addrs[self.at]
    }

    fn next(&mut self) {
        self.at = (self.at + 1) % self.addrs.len();
    }

    /// What became of a call (`register`: a `Register` on a new connection; `reply`:
    /// its status and value, `None` if it got none) says whom to ask next: the leader a
    /// `NotLeader` answer names, the next member after a registration that got no
    /// answer, the same one otherwise.
    pub fn after_call(&mut self, register: bool, reply: Option<(Status, &[u8])>) {
        match reply {
            Some((Status::NotLeader, hint)) => self.redirect(hint),
            None if register => self.next(),
            _ => {}
        }
    }

    /// A `NotLeader` answer's value: the leader's address, if the member knew it (one
    /// that joined the group since this brick started is learnt so, up to
    /// `AUTHORITIES_MAX` addresses).
    fn redirect(&mut self, hint: &[u8]) {
        let named = std::str::from_utf8(hint).ok().and_then(|h| h.parse::<SocketAddr>().ok());
        if let Some(a) = named.filter(|a| !self.addrs.contains(a) && self.addrs.len() < AUTHORITIES_MAX) {
            self.addrs.push(a);
        }
        match named.and_then(|a| self.addrs.iter().position(|x| *x == a)) {
            Some(i) => self.at = i,
            None => self.next(),
        }
    }
}

impl std::fmt::Display for Authorities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let all: Vec<String> = self.addrs.iter().map(|a| a.to_string()).collect();
        write!(f, "{}", all.join(", "))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("register with the map authority at {meta}: {why}")]
    Register { meta: String, why: String },
    #[error("store the brick identity in {dir}: {source}")]
    Identity {
        dir: String,
        #[source]
        source: std::io::Error,
    },
}

/// Makes the lease's call (`Step::Register` or `Step::Beat`) on `session`, the
/// connection to the authority (a new one, to the member `meta` names, for
/// `Register`), and says what became of it.
fn call(step: &Step, session: &mut Option<Rpc>, meta: &mut Authorities, addr: &BrickAddr, secret: Option<&Secret>) -> Answer {
    let timeout = Duration::from_millis(LEASE_MS);
    let (op, epoch, value) = lease::request(step, addr);
    let register = op == Op::Register;
    if register {
        *session = None;
    }
    let rpc = match session {
        Some(rpc) => Ok(rpc),
        None if register => Rpc::connect(meta.current(), timeout / 2, secret).map(|rpc| session.insert(rpc)),
        None => return Answer::Lost("no session".into()),
    };
    let result = rpc.and_then(|rpc| rpc.call(op, epoch, &[], &value, timeout));
    meta.after_call(register, result.as_ref().ok().map(|(status, value)| (*status, &value[..])));
    let answer = match result {
        Ok(reply) => lease::answer_of(step, Ok(reply)),
        Err(e) => unanswered(e),
    };
    if register && !matches!(answer, Answer::Registered(_)) {
        *session = None;
    }
    answer
}

/// A call that got no answer: the session is lost, or, when the authority refused this
/// brick's credentials (a secret of another cluster, or none where one is wanted),
/// nothing a retry could mend.
fn unanswered(e: crate::rpc::RpcError) -> Answer {
    if e.is_refusal() {
        Answer::Unauthenticated(e.to_string())
    } else {
        Answer::Lost(e.to_string())
    }
}

/// Sleeps until `until_ms` by `now_ms`, at most `HEARTBEAT_MS`.
fn idle(until_ms: u64, now_ms: u64) {
    std::thread::sleep(Duration::from_millis(until_ms.saturating_sub(now_ms).clamp(1, HEARTBEAT_MS)));
}

/// A started brick's session with the authority, handed from `register` to the
/// control thread.
pub struct Session {
    pub lease: Lease,
    rpc: Option<Rpc>,
    meta: Authorities,
    secret: Option<Arc<Secret>>,
}

impl Session {
    /// The authority member this brick registered with: the leader.
    pub fn leader(&self) -> SocketAddr {
        self.meta.current()
    }
}

/// Registers with the authority (retrying until `lease::START_DEADLINE_MS`), keeps the
/// id it gives, and waits until the authority has a map. `started` is the clock of the
/// brick's `Shared`.
pub fn register(members: &[SocketAddr], dir: &Path, addr: &BrickAddr, secret: Option<Arc<Secret>>, started: Instant, stop: &AtomicBool) -> Result<(BrickId, ClusterMap, Session), ControlError> {
    let now_ms = || started.elapsed().as_millis() as u64;
    let mut meta = Authorities::new(members);
    let mut lease = Lease::starting(load_identity(dir).map(BrickId), now_ms());
    let mut rpc = None;
    while !stop.load(Ordering::Relaxed) {
        let step = lease.poll(now_ms(), false);
        match step {
            Step::Register { .. } | Step::Beat { .. } => {
                let answer = call(&step, &mut rpc, &mut meta, addr, secret.as_deref());
                lease.answer(answer, now_ms());
            }
            Step::HangUp => rpc = None,
            Step::Keep(id) => store_identity(dir, id.0).map_err(|source| ControlError::Identity { dir: dir.display().to_string(), source })?,
            Step::Boot(map) => {
                let me = lease.id().expect("a lease serves only once registered");
                return Ok((me, map, Session { lease, rpc, meta, secret }));
            }
            Step::Install(_) => unreachable!("a map installed before the first"),
            Step::Idle { until_ms } => idle(until_ms, now_ms()),
            Step::Note(note) => crate::log!("brick", "{note}"),
            Step::Stop(why) => return Err(ControlError::Register { meta: meta.to_string(), why }),
        }
    }
    Err(ControlError::Register { meta: meta.to_string(), why: "stopped while registering".into() })
}

/// The control thread: heartbeats carry the brick's epoch, and their replies bring newer
/// maps. Without a reply for `LEASE_MS` the brick fences itself until one comes.
pub fn heartbeat_loop(shared: &Shared, addr: &BrickAddr, session: Session) {
    let Session { mut lease, mut rpc, mut meta, secret } = session;
    shared.publish(&lease);
    while !shared.stop.load(Ordering::Relaxed) {
        let step = lease.poll(shared.now_ms(), shared.refresh.swap(false, Ordering::Relaxed));
        // A fence goes up at once (before a `HangUp`); it comes down only after the step,
        // so a map that came with the answer is installed before the cores serve again.
        shared.raise_fence(&lease);
        match step {
            Step::Register { .. } | Step::Beat { .. } => {
                let answer = call(&step, &mut rpc, &mut meta, addr, secret.as_deref());
                lease.answer(answer, shared.now_ms());
                shared.raise_fence(&lease);
            }
            Step::HangUp => rpc = None,
            Step::Keep(id) => unreachable!("{id}: a serving brick keeps its id or stops"),
            Step::Boot(_) => unreachable!("a second first map"),
            Step::Install(map) => {
                let epoch = map.epoch();
                if shared.offer(map) {
                    crate::log!("brick", "map epoch {epoch}");
                }
            }
            Step::Idle { until_ms } => idle(until_ms.min(shared.now_ms() + 5), shared.now_ms()),
            Step::Note(note) => crate::log!("brick", "{note} (authority at {})", meta.current()),
            Step::Stop(why) => {
                crate::log!(warn: "brick", "{why}");
                return stop_removed(shared);
            }
        }
        shared.publish(&lease);
    }
}

/// The authority removed this brick while it ran (a long pause, a broken session):
/// fence, and stop the whole brick. It is dead to the cluster; started again, it
/// rejoins as a new brick with a new id. (The lease's `Stop` says why, in the log.)
fn stop_removed(shared: &Shared) {
    shared.fenced.store(true, Ordering::SeqCst);
    shared.removed.store(true, Ordering::SeqCst);
    shared.stop.store(true, Ordering::SeqCst);
}

/// The map of a brick that runs alone (no authority): one brick, one replica, epoch 1.
pub fn standalone_map(partition_bits: u8, addr: &BrickAddr) -> ClusterMap {
    let bricks = [(BrickId(0), addr.clone())].into_iter().collect();
    ClusterMap::initial(partition_bits, bricks, 1).expect("a one-brick map is valid")
}
