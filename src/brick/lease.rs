//! A brick's lease with the map authority, sans-I/O: registration (and the wait for
//! the first map), heartbeats every `HEARTBEAT_MS`, the fence when the authority has
//! not answered for `LEASE_MS` or the session breaks, and the stop when the authority
//! removed the brick. The control thread (`control::register`, `control::heartbeat_loop`,
//! blocking rpcs) and the simulator (simulated links and timers) both drive it: `poll`
//! says what to do next, `answer` takes the reply to the last `Register` or `Beat`.
//!
//! The lease runs from when the answered heartbeat was *sent*, not from when its answer
//! was read: a brick paused with an answer in its socket must not take that answer for
//! fresh word from the authority (which may have removed it meanwhile).

use std::collections::VecDeque;

use crate::map::{BrickAddr, BrickId, ClusterMap};
use crate::proto::{Op, Registered, Registration, Status, HEARTBEAT_MS, LEASE_MS};

/// A starting brick that has not registered and received its first map in this long
/// gives up.
pub const START_DEADLINE_MS: u64 = 60_000;
/// The pause between failed registrations while starting.
const REGISTER_RETRY_MS: u64 = 100;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Open a new session with the authority (closing any open one) and register as
    /// `id` (`None`: a brick the authority has never seen).
    Register { id: Option<u32> },
    /// A heartbeat carrying `epoch` on the session.
    Beat { epoch: u64 },
    /// Close the session. The fence it follows is already up (`fenced()`).
    HangUp,
    /// The authority gave this id: keep it (durably) before anything else.
    Keep(BrickId),
    /// The first map: recover and serve by it.
    Boot(ClusterMap),
    /// A newer map for the cores.
    Install(ClusterMap),
    /// Nothing is due before this (or before a core asks for a fresh map).
    Idle { until_ms: u64 },
    Note(String),
    /// Stop the brick (fenced first): removed by the authority, or it never started.
    Stop(String),
}

/// What became of a `Register` or `Beat`.
#[derive(Clone, Debug)]
pub enum Answer {
    /// `Register` answered with this id.
    Registered(u32),
    /// `Beat` answered: the authority knows the session; a map if it has a newer one.
    Map(Option<ClusterMap>),
    /// `Beat` refused: the authority no longer knows the session (it removed the brick).
    Refused(String),
    /// No answer: refused connection, timeout, closed, malformed. The session is gone.
    Lost(String),
    /// The authority refused this brick's credentials (another cluster's secret, a
    /// wrong one, none): no retry can help.
    Unauthenticated(String),
}

/// The request a call (`Step::Register`, `Step::Beat`) sends: its op, epoch and value.
/// `addr`: where this brick serves, and its directory's token.
pub fn request(step: &Step, addr: &BrickAddr) -> (Op, u64, Vec<u8>) {
    match step {
        Step::Register { id } => (Op::Register, 0, serde_json::to_vec(&Registration { id: *id, addr: addr.clone() }).expect("serialises")),
        Step::Beat { epoch } => (Op::Heartbeat, *epoch, Vec::new()),
        other => unreachable!("{other:?} is not a call"),
    }
}

/// What the authority's reply to a call (or why there is none) means for the lease.
pub fn answer_of(step: &Step, reply: Result<(Status, Vec<u8>), String>) -> Answer {
    let (status, value) = match reply {
        Ok(reply) => reply,
        Err(why) => return Answer::Lost(why),
    };
    let text = || format!("{}: {}", status.name(), String::from_utf8_lossy(&value));
    match (step, status) {
        (Step::Register { .. }, Status::Ok) => match serde_json::from_slice::<Registered>(&value) {
            Ok(reply) => Answer::Registered(reply.id),
            Err(e) => Answer::Lost(format!("bad reply: {e}")),
        },
        (Step::Register { .. }, _) => Answer::Lost(text()),
        // A member that does not lead (any more): not a removal, the session is lost.
        (_, Status::NotLeader) => Answer::Lost(text()),
        (_, Status::Ok) => Answer::Map(crate::rpc::parse_map(&value).unwrap_or_else(|e| {
            crate::log!(warn: "brick", "ignoring a bad map from the authority: {e}");
            None
        })),
        _ => Answer::Refused(text()),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Registering,
    AwaitingMap,
    Serving,
    Stopped,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Asked {
    Register,
    Beat { sent_ms: u64 },
}

pub struct Lease {
    phase: Phase,
    id: Option<BrickId>,
    epoch: u64,
    session: bool,
    fenced: bool,
    /// When the last answered heartbeat was sent.
    lease_from_ms: u64,
    next_ms: u64,
    deadline_ms: u64,
    asked: Option<Asked>,
    last_error: String,
    out: VecDeque<Step>,
}

impl Lease {
    /// A brick starting with the id it kept (if any).
    pub fn starting(id: Option<BrickId>, now_ms: u64) -> Lease {
        Lease {
            phase: Phase::Registering,
            id,
            epoch: 0,
            session: false,
            fenced: false,
            lease_from_ms: now_ms,
            next_ms: now_ms,
            deadline_ms: now_ms + START_DEADLINE_MS,
            asked: None,
            last_error: String::new(),
            out: VecDeque::new(),
        }
    }

    pub fn id(&self) -> Option<BrickId> {
        self.id
    }

    /// The cores must serve nothing: the lease ran out (as of the last `poll`), the
    /// session broke, or the brick was removed. Cores also check `lease_from_ms`
    /// against a fresh clock read (`round::lease_expired`).
    pub fn fenced(&self) -> bool {
        self.fenced || self.phase == Phase::Stopped
    }

    pub fn lease_from_ms(&self) -> u64 {
        self.lease_from_ms
    }

    fn fence(&mut self, why: &str) {
        if !self.fenced {
            self.fenced = true;
            self.out.push_back(Step::Note(why.to_string()));
        }
    }

    fn stop(&mut self, why: String) {
        self.fenced = true;
        self.session = false;
        self.phase = Phase::Stopped;
        self.out.push_back(Step::HangUp);
        self.out.push_back(Step::Stop(why));
    }

    /// The next step; `refresh`: a core saw a request from a newer epoch, beat now.
    pub fn poll(&mut self, now_ms: u64, refresh: bool) -> Step {
        assert!(self.asked.is_none(), "the lease was polled while its call was out");
        if self.phase == Phase::Serving && now_ms.saturating_sub(self.lease_from_ms) > LEASE_MS {
            self.fence(&format!("no word from the map authority for {LEASE_MS} ms: fenced, serving nothing"));
        }
        if let Some(step) = self.out.pop_front() {
            return step;
        }
        match self.phase {
            Phase::Stopped => return Step::Idle { until_ms: u64::MAX },
            Phase::Registering | Phase::AwaitingMap if now_ms > self.deadline_ms => {
                let why = match self.phase {
                    Phase::Registering => format!("could not register with the map authority: {}", self.last_error),
                    _ => "the map authority has no cluster map yet".to_string(),
                };
                self.stop(why);
                return self.poll(now_ms, false);
            }
            _ => {}
        }
        let due = now_ms >= self.next_ms || (refresh && self.phase == Phase::Serving);
        if !due {
            return Step::Idle { until_ms: self.next_ms };
        }
        self.next_ms = now_ms + if self.phase == Phase::Registering { REGISTER_RETRY_MS } else { HEARTBEAT_MS };
        if !self.session {
            self.asked = Some(Asked::Register);
            return Step::Register { id: self.id.map(|i| i.0) };
        }
        self.asked = Some(Asked::Beat { sent_ms: now_ms });
        Step::Beat { epoch: self.epoch }
    }

    /// The answer to the last `Register` or `Beat`.
    pub fn answer(&mut self, answer: Answer, now_ms: u64) {
        let asked = self.asked.take().expect("the lease got an answer it did not ask for");
        match (asked, answer) {
            (Asked::Register, Answer::Registered(id)) => {
                if self.phase == Phase::Serving && self.id != Some(BrickId(id)) {
                    // A new id: the authority had removed this brick. Fail-stop.
                    let me = self.id.map_or("this brick".to_string(), |id| id.to_string());
                    return self.stop(format!("{me} was removed from the cluster by the map authority (it was given a new id): stopping"));
                }
                self.session = true;
                if self.id != Some(BrickId(id)) {
                    self.id = Some(BrickId(id));
                    self.out.push_back(Step::Keep(BrickId(id)));
                }
                if self.phase == Phase::Registering {
                    self.phase = Phase::AwaitingMap;
                }
                // Beat at once on the new session.
                self.next_ms = now_ms;
            }
            (Asked::Beat { sent_ms }, Answer::Map(map)) => {
                if self.phase == Phase::AwaitingMap {
                    let Some(map) = map else { return };
                    self.epoch = map.epoch();
                    self.phase = Phase::Serving;
                    self.lease_from_ms = sent_ms;
                    self.next_ms = now_ms;
                    self.out.push_back(Step::Boot(map));
                    return;
                }
                self.lease_from_ms = self.lease_from_ms.max(sent_ms);
                // The newer map first: the shell installs it before it lowers a fence.
                if let Some(map) = map.filter(|m| m.epoch() > self.epoch) {
                    self.epoch = map.epoch();
                    self.out.push_back(Step::Install(map));
                }
                if now_ms.saturating_sub(self.lease_from_ms) <= LEASE_MS && self.fenced {
                    self.fenced = false;
                    self.out.push_back(Step::Note("in touch with the map authority again: serving".into()));
                }
            }
            (_, Answer::Unauthenticated(why)) => {
                self.stop(format!("the map authority refused this brick's credentials: {why}: stopping"));
            }
            (Asked::Beat { .. }, Answer::Refused(why)) if self.phase == Phase::Serving => {
                // The authority no longer knows this brick's session: it was removed
                // (declared dead) and others may have taken over its partitions.
                self.stop(format!("heartbeat refused ({why}): removed from the cluster by the map authority: stopping"));
            }
            // Refused or lost; or an answer of the other call's kind, a malformed reply
            // (as `Rpc::call` takes a reply to another request): the session is lost.
            (_, other) => {
                self.last_error = match other {
                    Answer::Refused(why) | Answer::Lost(why) => why,
                    _ => "an answer to another call".into(),
                };
                if self.phase == Phase::Serving && self.session {
                    // The lease runs on (from the last answered beat's sending) while the
                    // brick registers again, with the same authority or a new leader of
                    // its group: an authority removes a brick whose session closed only
                    // once that lease has surely run out (`CLOSED_REMOVAL_MS`), and a new
                    // leader only `BRICK_TIMEOUT_MS` after it took office.
                    self.out.push_back(Step::Note(format!("lost the map authority's session ({}): registering again, serving until the lease runs out", self.last_error)));
                }
                if self.phase == Phase::AwaitingMap {
                    // Registered, but the session broke before the first map: anew.
                    self.phase = Phase::Registering;
                }
                self.session = false;
                self.out.push_back(Step::HangUp);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(epoch: u64) -> ClusterMap {
        let bricks = [(BrickId(7), crate::map::BrickAddr::tcp(vec!["127.0.0.1:1".parse().expect("addr")]))].into_iter().collect();
        let map = ClusterMap::initial(2, bricks, 1).expect("a one-brick map");
        assert_eq!(map.epoch(), epoch);
        map
    }

    /// Registers as brick 7 and boots with the first map at `now_ms`.
    fn serving(now_ms: u64) -> Lease {
        let mut lease = Lease::starting(None, now_ms);
        assert_eq!(lease.poll(now_ms, false), Step::Register { id: None });
        lease.answer(Answer::Registered(7), now_ms);
        assert_eq!(lease.poll(now_ms, false), Step::Keep(BrickId(7)));
        assert_eq!(lease.poll(now_ms, false), Step::Beat { epoch: 0 });
        lease.answer(Answer::Map(Some(map(1))), now_ms);
        assert!(matches!(lease.poll(now_ms, false), Step::Boot(m) if m.epoch() == 1));
        assert!(!lease.fenced());
        lease
    }

    #[test]
    fn an_answer_read_after_a_pause_does_not_renew_the_lease() {
        let mut lease = serving(0);
        assert_eq!(lease.poll(100, false), Step::Beat { epoch: 1 });
        // The process stops with the answer in its socket and reads it 3 s later.
        lease.answer(Answer::Map(None), 3_100);
        assert!(matches!(lease.poll(3_100, false), Step::Note(_)));
        assert!(lease.fenced(), "a lease renewed from an answer to a beat sent 3 s ago");
        // The next beat, answered at once, is fresh word: serving again.
        assert_eq!(lease.poll(3_100, false), Step::Beat { epoch: 1 });
        lease.answer(Answer::Map(None), 3_101);
        assert!(matches!(lease.poll(3_101, false), Step::Note(_)));
        assert!(!lease.fenced());
    }

    #[test]
    fn a_lost_session_serves_out_its_lease_while_it_registers_again_and_a_new_id_stops() {
        let mut lease = serving(0);
        assert_eq!(lease.poll(50, false), Step::Beat { epoch: 1 });
        lease.answer(Answer::Lost("reset".into()), 60);
        assert!(!lease.fenced(), "the lease, from the beat sent at 0, runs to {LEASE_MS}");
        assert!(matches!(lease.poll(60, false), Step::Note(_)));
        assert_eq!(lease.poll(60, false), Step::HangUp);
        assert_eq!(lease.poll(110, false), Step::Register { id: Some(7) });
        lease.answer(Answer::Registered(8), 111);
        assert_eq!(lease.poll(111, false), Step::HangUp);
        assert!(matches!(lease.poll(111, false), Step::Stop(_)));
        assert!(lease.fenced());
    }

    #[test]
    fn a_brick_that_finds_no_leader_fences_when_its_lease_runs_out() {
        let mut lease = serving(0);
        assert_eq!(lease.poll(50, false), Step::Beat { epoch: 1 });
        lease.answer(Answer::Lost("reset".into()), 60);
        assert!(matches!(lease.poll(60, false), Step::Note(_)));
        assert_eq!(lease.poll(60, false), Step::HangUp);
        let mut now = 110;
        while now <= LEASE_MS {
            assert!(!lease.fenced(), "fenced at {now} ms, inside the lease");
            if let Step::Register { .. } = lease.poll(now, false) {
                lease.answer(Answer::Lost("not the leader".into()), now);
            }
            now += 10;
        }
        loop {
            match lease.poll(now, false) {
                Step::Register { .. } => break,
                Step::Idle { .. } => now += 10,
                _ => {}
            }
        }
        lease.answer(Answer::Lost("not the leader".into()), now);
        assert!(lease.fenced(), "serving past the lease with no authority");
    }

    #[test]
    fn a_refused_heartbeat_stops_the_brick() {
        let mut lease = serving(0);
        assert_eq!(lease.poll(50, false), Step::Beat { epoch: 1 });
        lease.answer(Answer::Refused("session ended".into()), 51);
        assert_eq!(lease.poll(51, false), Step::HangUp);
        assert!(matches!(lease.poll(51, false), Step::Stop(_)));
    }
}
