//! The simulated network. Nodes talk over links that behave as TCP connections do:
//! each direction delivers in order, after a delay drawn per message (so messages on
//! different links overtake each other); a link can reset (the message is lost and both
//! ends are told, as a reset connection tells both sides); a process that dies closes
//! its links (the peers are told), a machine that loses power goes silent (they are
//! not). A partition, when enabled, holds messages between the two sides until it
//! heals, as TCP's retransmissions would; so does a member's isolation (`Isolation`),
//! which need not split the nodes in two.
//!
//! Duplicated and reordered frames within one connection are outside what TCP (and RC
//! verbs) allow, and the protocol relies on that: a one-phase put delivered twice, the
//! second time after a later write, would undo it. `--raw-network` turns them on
//! anyway, to show that the checkers catch what breaks.

use std::collections::BTreeMap;

use rand::Rng;

use crate::proto::{encode, Frame, Kind, Op, Status};

use super::{Event, Micros, World};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct LinkId(pub u64);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// A member of the map authority group (by index).
    Member(usize),
    Brick(usize),
    Client(usize),
}

/// What travels on a link: one frame in the real wire format (control-plane requests
/// carry their JSON values, as over TCP).
pub(crate) type Msg = Vec<u8>;

/// A request on the wire, waiting for its reply as `rpc::Rpc::call` waits.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Call {
    pub link: LinkId,
    op: Op,
    id: u64,
    /// When it left.
    pub sent: Micros,
}

impl Call {
    /// The reply in `bytes` (a frame that came on `link`), or why it is not this
    /// call's reply: a malformed answer, which loses the connection.
    pub fn reply(&self, bytes: &[u8]) -> Result<(Status, Vec<u8>), String> {
        crate::rpc::reply_of(bytes, self.op, self.id).map_err(|e| format!("malformed reply: {e}"))
    }
}

struct Link {
    a: Endpoint,
    b: Endpoint,
    /// The core of brick `b` this link reaches (data links), and its incarnation.
    b_core: Option<(u64, usize)>,
    alive: bool,
    /// Last arrival time per direction (a→b, b→a): arrivals never overtake.
    last: [Micros; 2],
}

pub(crate) struct Net {
    links: BTreeMap<LinkId, Link>,
    next: u64,
    pub delay_us: Micros,
    pub jitter_us: Micros,
    pub reset_p: f64,
    /// Bricks cut off from everyone else, and when that heals.
    cut: Vec<usize>,
    /// The map authority is on the cut-off side.
    authority_cut: bool,
    heal_at: Micros,
    /// A member cut off alone, if one is, and when that heals.
    pub isolation: Option<Isolation>,
    isolation_heal_at: Micros,
}

/// A member (the leader, when it is drawn) cut off from the other members. Bricks in
/// `only_it` reach only it of the group: they keep asking it for leases while the rest
/// elect a new leader, which may remove them. It does not reach the bricks in `not_it`
/// (nor the clients, if `clients`). Bricks and clients reach each other throughout.
#[derive(Clone, Debug)]
pub(crate) struct Isolation {
    pub member: usize,
    pub only_it: Vec<usize>,
    pub not_it: Vec<usize>,
    pub clients: bool,
}

impl Isolation {
    fn apart(&self, x: Endpoint, y: Endpoint) -> bool {
        let one_way = |x: Endpoint, y: Endpoint| match (x, y) {
            (Endpoint::Member(m), Endpoint::Member(n)) => m == self.member && n != self.member,
            (Endpoint::Member(m), Endpoint::Brick(b)) if m == self.member => self.not_it.contains(&b),
            (Endpoint::Member(m), Endpoint::Client(_)) => m == self.member && self.clients,
            (Endpoint::Member(_), Endpoint::Brick(b)) => self.only_it.contains(&b),
            _ => false,
        };
        one_way(x, y) || one_way(y, x)
    }
}

impl Net {
    pub fn new(delay_us: Micros, jitter_us: Micros, reset_p: f64) -> Net {
        Net { links: BTreeMap::new(), next: 1, delay_us, jitter_us, reset_p, cut: Vec::new(), authority_cut: false, heal_at: 0, isolation: None, isolation_heal_at: 0 }
    }

    pub fn alive(&self, link: LinkId) -> bool {
        self.links.get(&link).is_some_and(|l| l.alive)
    }

    /// The end that opened `link`.
    pub fn opener(&self, link: LinkId) -> Option<Endpoint> {
        self.links.get(&link).map(|l| l.a)
    }

    /// The brick core a data link reaches: (incarnation, core).
    pub fn target_core(&self, link: LinkId) -> Option<(u64, usize)> {
        self.links.get(&link).and_then(|l| l.b_core)
    }

    pub fn partition(&mut self, side: &[usize], authority: bool) {
        self.cut = side.to_vec();
        self.authority_cut = authority;
    }

    pub fn heal(&mut self) {
        self.cut.clear();
        self.authority_cut = false;
    }

    /// Whether bricks (or the whole authority) are cut off (`partition`), or messages a
    /// partition or an isolation held are still on their way: healed before its time
    /// (when the faults stop, or by an earlier partition's heal), it held them until
    /// then, and what follows on their links waits behind them.
    pub fn partitioned(&self, now: Micros) -> bool {
        !self.cut.is_empty() || self.authority_cut || now < self.heal_at || (self.isolation.is_none() && now < self.isolation_heal_at)
    }

    fn apart(&self, x: Endpoint, y: Endpoint) -> bool {
        let inside = |e: Endpoint| match e {
            Endpoint::Brick(b) => self.cut.contains(&b),
            Endpoint::Member(_) => self.authority_cut,
            Endpoint::Client(_) => false,
        };
        (!self.cut.is_empty() || self.authority_cut) && inside(x) != inside(y)
    }
}

impl World {
    /// Opens a link from `a` to `b` (to core `b_core` of brick incarnation, for data).
    pub(crate) fn open_link(&mut self, a: Endpoint, b: Endpoint, b_core: Option<(u64, usize)>) -> LinkId {
        let id = LinkId(self.net.next);
        self.net.next += 1;
        self.net.links.insert(id, Link { a, b, b_core, alive: true, last: [0, 0] });
        id
    }

    /// Sends `msg` from the end `from` of `link`.
    pub(crate) fn send(&mut self, link: LinkId, from: Endpoint, msg: Msg) {
        let Some(l) = self.net.links.get(&link) else { return };
        if !l.alive {
            return;
        }
        let (to, dir) = if l.a == from { (l.b, 0) } else { (l.a, 1) };
        if self.net.reset_p > 0.0 && self.rng.random_bool(self.net.reset_p) {
            self.note(format!("link {} {:?}<->{:?} reset", link.0, l.a, l.b));
            self.break_link(link, true);
            return;
        }
        let jitter = if self.net.jitter_us > 0 { self.rng.random_range(0..=self.net.jitter_us) } else { 0 };
        let mut at = self.now + self.net.delay_us + jitter;
        if self.net.apart(from, to) {
            at = at.max(self.net.heal_at_or_later(self.now));
        }
        if self.net.isolation.as_ref().is_some_and(|i| i.apart(from, to)) {
            at = at.max(self.net.isolation_heal_at);
        }
        if self.options.raw_network {
            // Beyond TCP: this frame may overtake others on its link, or come twice.
            if self.rng.random_bool(0.01) {
                let again = at + self.rng.random_range(0..=5 * super::MS);
                self.schedule(again, Event::Deliver { link, to, msg: msg.clone() });
            }
            return self.schedule(at, Event::Deliver { link, to, msg });
        }
        let l = self.net.links.get_mut(&link).expect("checked");
        at = at.max(l.last[dir] + 1);
        l.last[dir] = at;
        self.schedule(at, Event::Deliver { link, to, msg });
    }

    /// Sends request `id` from `from` on `link`.
    pub(crate) fn call(&mut self, link: LinkId, from: Endpoint, op: Op, epoch: u64, value: &[u8], id: u64) -> Call {
        let mut bytes = Vec::new();
        encode(&mut bytes, &Frame { kind: Kind::Request(op), request_id: id, epoch, key: &[], value });
        self.send(link, from, bytes);
        Call { link, op, id, sent: self.now }
    }

    /// Sends `msg` back to the end that opened `link`.
    pub(crate) fn send_back(&mut self, link: LinkId, msg: Msg) {
        let Some(b) = self.net.links.get(&link).map(|l| l.b) else { return };
        self.send(link, b, msg);
    }

    /// The link breaks. `tell`: both ends learn it after a delay (a reset, or a process
    /// whose kernel closed its sockets); otherwise the link just goes silent.
    pub(crate) fn break_link(&mut self, link: LinkId, tell: bool) {
        let Some(l) = self.net.links.get_mut(&link) else { return };
        if !l.alive {
            return;
        }
        l.alive = false;
        let (a, b) = (l.a, l.b);
        if tell {
            let delay = self.net.delay_us;
            self.after(delay, Event::LinkDown { link, to: a });
            self.after(delay, Event::LinkDown { link, to: b });
        }
    }

    /// Every link with an end at `end` breaks (its process died or its machine lost
    /// power); the other ends learn it only if `tell`.
    pub(crate) fn break_links_of(&mut self, end: Endpoint, tell: bool) {
        let ids: Vec<LinkId> = self
            .net
            .links
            .iter()
            .filter(|(_, l)| l.alive && (l.a == end || l.b == end))
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            let l = self.net.links.get_mut(&id).expect("listed");
            l.alive = false;
            if tell {
                let other = if l.a == end { l.b } else { l.a };
                let delay = self.net.delay_us;
                self.after(delay, Event::LinkDown { link: id, to: other });
            }
        }
    }

    pub(crate) fn set_partition(&mut self, side: &[usize], authority: bool, heal_at: Micros) {
        self.net.partition(side, authority);
        self.net.heal_at = heal_at;
    }

    pub(crate) fn set_isolation(&mut self, isolation: Isolation, heal_at: Micros) {
        self.net.isolation = Some(isolation);
        self.net.isolation_heal_at = heal_at;
    }
}

impl Net {
    fn heal_at_or_later(&self, now: Micros) -> Micros {
        self.heal_at.max(now)
    }
}
