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

use super::round::{lease_expired, Control};
use crate::map::{BrickAddr, BrickId, ClusterMap};
use crate::proto::{Op, Registered, Registration, Status, HEARTBEAT_MS, LEASE_MS};
use crate::rpc::Rpc;

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
    pub fn new(me: BrickId, map: ClusterMap, stop: Arc<AtomicBool>) -> Shared {
        Shared {
            me,
            epoch: AtomicU64::new(map.epoch),
            map: RwLock::new(Arc::new(map)),
            fenced: AtomicBool::new(false),
            refresh: AtomicBool::new(false),
            removed: AtomicBool::new(false),
            lease_ok_ms: AtomicU64::new(u64::MAX),
            started: Instant::now(),
            stop,
        }
    }

    /// The authority answered now: the lease runs `LEASE_MS` from here.
    pub fn renew_lease(&self) {
        self.lease_ok_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Release);
    }

    /// Whether the cores must serve nothing: fenced by the control thread, or the lease
    /// ran out without the control thread noticing yet (after the whole process was
    /// paused, a core can run before the control thread does).
    pub fn is_fenced(&self) -> bool {
        if self.fenced.load(Ordering::Acquire) {
            return true;
        }
        let ok_ms = self.lease_ok_ms.load(Ordering::Acquire);
        ok_ms != u64::MAX && lease_expired(ok_ms, self.started.elapsed().as_millis() as u64, LEASE_MS)
    }

    pub fn map(&self) -> Arc<ClusterMap> {
        Arc::clone(&self.map.read())
    }

    /// Installs `map` if it is newer than the one held.
    pub fn offer(&self, map: ClusterMap) -> bool {
        let mut held = self.map.write();
        if map.epoch <= held.epoch {
            return false;
        }
        let epoch = map.epoch;
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

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("register with the map authority at {meta}: {why}")]
    Register { meta: SocketAddr, why: String },
    #[error("store the brick identity in {dir}: {source}")]
    Identity {
        dir: String,
        #[source]
        source: std::io::Error,
    },
}

const RPC_TIMEOUT: Duration = Duration::from_millis(1000);

/// Sends `Register` on `rpc`; returns the id the authority answered with.
fn send_registration(rpc: &mut Rpc, id: Option<u32>, addr: &BrickAddr, timeout: Duration) -> Result<u32, String> {
    let reg = Registration { id, addr: addr.clone() };
    let body = serde_json::to_string(&reg).expect("serialises");
    let (status, value) = rpc.call(Op::Register, 0, &[], body.as_bytes(), timeout).map_err(|e| e.to_string())?;
    if status != Status::Ok {
        return Err(format!("{status:?}: {}", String::from_utf8_lossy(&value)));
    }
    let reply: Registered = serde_json::from_slice(&value).map_err(|e| format!("bad reply: {e}"))?;
    Ok(reply.id)
}

/// Registers with the authority (retrying until `deadline`), records the id it gives,
/// and waits until the authority has a map. Returns the id and the map.
pub fn register(meta: SocketAddr, dir: &Path, addr: &BrickAddr, stop: &AtomicBool) -> Result<(BrickId, ClusterMap, Rpc), ControlError> {
    let fail = |why: String| ControlError::Register { meta, why };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last_err = String::new();
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        let attempt = (|| {
            let mut rpc = Rpc::connect(meta, RPC_TIMEOUT).map_err(|e| e.to_string())?;
            let id = send_registration(&mut rpc, load_identity(dir), addr, RPC_TIMEOUT)?;
            Ok((rpc, id))
        })();
        match attempt {
            Ok((rpc, id)) => {
                store_identity(dir, id).map_err(|source| ControlError::Identity { dir: dir.display().to_string(), source })?;
                let me = BrickId(id);
                // The map may not exist yet (the cluster is still gathering its bricks).
                let mut rpc = rpc;
                loop {
                    let (status, value) = rpc.call(Op::Heartbeat, 0, &[], &[], RPC_TIMEOUT).map_err(|e| fail(e.to_string()))?;
                    if status == Status::Ok && !value.is_empty() {
                        let map = ClusterMap::from_json(&String::from_utf8_lossy(&value)).map_err(|e| fail(e.to_string()))?;
                        return Ok((me, map, rpc));
                    }
                    if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                        return Err(fail("no cluster map yet".into()));
                    }
                    std::thread::sleep(Duration::from_millis(HEARTBEAT_MS));
                }
            }
            Err(e) => last_err = e,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(fail(last_err))
}

/// The control thread: heartbeats carry the brick's epoch, and their replies bring newer
/// maps. Without a reply for `LEASE_MS` the brick fences itself until one comes.
pub fn heartbeat_loop(shared: &Shared, meta: SocketAddr, addr: &BrickAddr, mut rpc: Option<Rpc>) {
    let mut last_ok = Instant::now();
    shared.renew_lease();
    let mut last_beat = Instant::now() - Duration::from_millis(HEARTBEAT_MS);
    while !shared.stop.load(Ordering::Relaxed) {
        let due = last_beat.elapsed() >= Duration::from_millis(HEARTBEAT_MS) || shared.refresh.swap(false, Ordering::Relaxed);
        if !due {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        last_beat = Instant::now();
        if rpc.is_none() {
            let mut id = None;
            rpc = Rpc::connect(meta, Duration::from_millis(LEASE_MS / 2)).ok().and_then(|mut r| {
                id = send_registration(&mut r, Some(shared.me.0), addr, Duration::from_millis(LEASE_MS)).ok();
                id.map(|_| r)
            });
            if id.is_some_and(|id| id != shared.me.0) {
                // A new id: the authority had removed this brick. Fail-stop.
                return stop_removed(shared);
            }
        }
        let beat = rpc.as_mut().map(|r| r.call(Op::Heartbeat, shared.epoch.load(Ordering::Acquire), &[], &[], Duration::from_millis(LEASE_MS)));
        match beat {
            Some(Ok((Status::Ok, value))) => {
                if !value.is_empty() {
                    match ClusterMap::from_json(&String::from_utf8_lossy(&value)) {
                        Ok(map) => {
                            let epoch = map.epoch;
                            if shared.offer(map) {
                                crate::log!("brick", "map epoch {epoch}");
                            }
                        }
                        Err(e) => crate::log!("brick", "ignoring a bad map from the authority: {e}"),
                    }
                }
                last_ok = Instant::now();
                shared.renew_lease();
                if shared.fenced.swap(false, Ordering::AcqRel) {
                    crate::log!("brick", "in touch with the map authority again: serving");
                }
            }
            other => {
                if let Some(Ok((status, value))) = &other {
                    crate::log!("brick", "heartbeat refused: {status:?}: {}", String::from_utf8_lossy(value));
                    // The authority no longer knows this brick's session: it was removed
                    // (declared dead) and others may have taken over its partitions.
                    return stop_removed(shared);
                }
                // Fence before the connection drops: the authority takes a closed session
                // for a dead brick and may write without it at once.
                if rpc.is_some() && !shared.fenced.swap(true, Ordering::AcqRel) {
                    crate::log!("brick", "lost the map authority's session: fenced until it answers again");
                }
                rpc = None;
            }
        }
        if last_ok.elapsed() > Duration::from_millis(LEASE_MS) && !shared.fenced.swap(true, Ordering::AcqRel) {
            crate::log!("brick", "no word from the map authority at {meta} for {LEASE_MS} ms: fenced, serving nothing");
        }
    }
}

/// The authority removed this brick while it ran (a long pause, a broken session):
/// fence, and stop the whole brick. It is dead to the cluster; started again, it
/// rejoins as a new brick with a new id.
fn stop_removed(shared: &Shared) {
    shared.fenced.store(true, Ordering::SeqCst);
    shared.removed.store(true, Ordering::SeqCst);
    shared.stop.store(true, Ordering::SeqCst);
    crate::log!("brick", "{} was removed from the cluster by the map authority: stopping", shared.me);
}

/// The map of a brick that runs alone (no authority): one brick, one replica, epoch 1.
pub fn standalone_map(partition_bits: u8, addr: &BrickAddr) -> ClusterMap {
    let bricks = [(BrickId(0), addr.clone())].into_iter().collect();
    ClusterMap::initial(partition_bits, bricks, 1).expect("a one-brick map is valid")
}
