//! Simulated clients: the real `ClientCore` on simulated links, running a bounded
//! random workload (puts of unique values, gets, removes on a few keys) and recording
//! what each operation returned, with its invocation and completion times, for the
//! linearizability checker. After the faults stop and the cluster settles, client 0
//! reads every key once more.

use std::net::SocketAddr;
use std::time::Duration;

use rand::Rng;

use crate::check::{Event as Seen, Operation};
use crate::client::{ClientConfig, ClientCore, ClientError, Completion, Outcome, Request};
use crate::hash::HashMap;

use super::net::{Call, Endpoint, LinkId, Msg};
use crate::proto::{Op, Status};
use crate::rpc::parse_map;
use super::{Event, Micros, World, MS};

#[derive(Clone, Debug)]
enum Kind {
    Get,
    Put(Vec<u8>),
    Remove,
}

pub(crate) struct SimClient {
    pub id: usize,
    pub core: ClientCore,
    started: bool,
    links: HashMap<SocketAddr, LinkId>,
    /// Addresses by link, to name a link that broke.
    addrs: HashMap<LinkId, SocketAddr>,
    authority: LinkId,
    /// The map request on the wire, if any, and how many were made.
    map_call: Option<Call>,
    map_calls: u64,
    issued: usize,
    open: HashMap<u64, (Kind, Vec<u8>, Micros)>,
    pub history: Vec<Operation>,
    /// Keys still to read in the final pass (client 0 only).
    finals: Vec<Vec<u8>>,
    final_phase: bool,
    wake_at: Option<Micros>,
    map_asked: Option<Micros>,
    /// A map fetch was lost with its link: ask again at the next wake.
    map_lost: bool,
    /// The last fetch brought nothing newer than the client's map (its member may be
    /// behind the group): the next one asks the next member, as `rpc::fetch_map` goes
    /// on to its next seed.
    next_member: bool,
    /// Think time: the next operation starts no earlier than this.
    next_issue: Micros,
    /// Operations that succeeded, ended `Unknown`, or failed (timed out, refused).
    pub outcomes: [u64; 3],
    /// Its process is stopped until then: what reaches it waits.
    pub paused_until: Micros,
}

impl SimClient {
    pub fn idle(&self) -> bool {
        self.open.is_empty() && self.core.in_flight() == 0
    }

    pub fn finished_final(&self) -> bool {
        self.final_phase && self.finals.is_empty() && self.open.is_empty()
    }
}

pub(crate) fn key_name(i: usize) -> Vec<u8> {
    format!("key-{i}").into_bytes()
}

impl World {
    pub(crate) fn add_client(&mut self, c: usize) {
        let link = self.open_link(Endpoint::Client(c), Endpoint::Member(c % self.members.len()), None);
        let config = ClientConfig { op_timeout: Duration::from_secs(10), connect_timeout: Duration::from_millis(100), suspect_after: Duration::from_millis(self.shape.suspect_after_ms), rdma: false, secret: None };
        let id = self.next_client_id;
        self.next_client_id += 1;
        // The client starts from a placeholder map of epoch 0 that its first fetch
        // replaces, as `Client::connect` starts from the map a seed gives.
        let bricks = std::iter::once((crate::map::BrickId(u32::MAX - 1), crate::map::BrickAddr::tcp(vec![]))).collect();
        let placeholder = crate::map::ClusterMap::initial(self.shape.base_bits, bricks, 1).expect("a one-brick map").placeholder();
        let core = ClientCore::new(placeholder, config, id, self.instant());
        self.clients.push(SimClient {
            id: c,
            core,
            started: false,
            links: HashMap::default(),
            addrs: HashMap::default(),
            authority: link,
            map_call: None,
            map_calls: 0,
            issued: 0,
            open: HashMap::default(),
            history: Vec::new(),
            finals: Vec::new(),
            final_phase: false,
            wake_at: None,
            map_asked: None,
            map_lost: false,
            next_member: false,
            next_issue: 0,
            outcomes: [0; 3],
            paused_until: 0,
        });
        self.ask_map(c, 0);
    }

    /// Asks the authority for a map newer than `epoch`, on a new connection if the
    /// last one broke (`rpc::fetch_map` connects per fetch).
    fn ask_map(&mut self, c: usize, epoch: u64) {
        if std::mem::take(&mut self.clients[c].next_member) || !self.net.alive(self.clients[c].authority) {
            // Any member serves the map it holds committed: the next one.
            let member = (c + self.clients[c].map_calls as usize) % self.members.len();
            self.clients[c].authority = self.open_link(Endpoint::Client(c), Endpoint::Member(member), None);
        }
        let client = &mut self.clients[c];
        client.map_calls += 1;
        let (link, id) = (client.authority, client.map_calls);
        let call = self.call(link, Endpoint::Client(c), Op::GetMap, epoch, &[], id);
        self.clients[c].map_call = Some(call);
    }

    pub(crate) fn client_receive(&mut self, c: usize, link: LinkId, bytes: Msg) {
        if link == self.clients[c].authority {
            // The answer to the last map request (one to an earlier request is dropped).
            let Some(Ok((status, value))) = self.clients[c].map_call.map(|call| call.reply(&bytes)) else { return };
            let client = &mut self.clients[c];
            client.map_call = None;
            client.map_asked = None;
            let fetched = parse_map(&value).ok().flatten().filter(|_| status == Status::Ok);
            client.next_member = fetched.as_ref().is_none_or(|m| m.epoch() <= client.core.map().epoch());
            match fetched {
                Some(map) if client.started => client.core.install_fetched(map),
                Some(map) => {
                    client.core.install(map);
                    client.started = true;
                }
                None if !client.started => {
                    // The cluster is still gathering its bricks: ask again soon.
                    client.map_asked = Some(self.now);
                    return self.schedule(self.now + 50 * MS, Event::ClientWake { client: c });
                }
                None => {}
            }
            return self.client_wake(c);
        }
        let Some(&from) = self.clients[c].addrs.get(&link) else { return };
        let now = self.instant();
        let client = &mut self.clients[c];
        client.core.set_now(now);
        if let Err(why) = client.core.on_frame(from, &bytes) {
            return self.fail(format!("client {c}: a brick sent a bad reply: {why}"));
        }
        self.client_wake(c);
    }

    pub(crate) fn client_link_down(&mut self, c: usize, link: LinkId) {
        if link == self.clients[c].authority && self.clients[c].map_call.take().is_some() {
            // The map fetch failed (its member died, or was removed for good): ask the
            // next member a moment later, as `rpc::fetch_map` goes on to its next seed.
            self.clients[c].map_lost = true;
            let at = self.now + 50 * MS;
            if self.clients[c].wake_at.is_none_or(|t| t > at || t <= self.now) {
                self.clients[c].wake_at = Some(at);
                self.schedule(at, Event::ClientWake { client: c });
            }
        }
        let now = self.instant();
        let client = &mut self.clients[c];
        if let Some(addr) = client.addrs.remove(&link) {
            client.links.remove(&addr);
            client.core.set_now(now);
            client.core.link_lost(addr);
            self.client_wake(c);
        }
    }

    /// Runs the client's core, issues more operations, sends what it queued.
    pub(crate) fn client_wake(&mut self, c: usize) {
        if self.clients[c].wake_at.is_some_and(|t| t == self.now) {
            self.clients[c].wake_at = None;
        }
        if std::mem::take(&mut self.clients[c].map_lost) && self.clients[c].started {
            let epoch = self.clients[c].core.map().epoch();
            self.ask_map(c, epoch);
        }
        if !self.clients[c].started {
            if self.clients[c].map_asked.is_none_or(|t| self.now >= t + 50 * MS) {
                self.clients[c].map_asked = Some(self.now);
                self.ask_map(c, 0);
            }
            return;
        }
        let now = self.instant();
        self.clients[c].core.set_now(now);
        self.clients[c].core.process();
        self.issue(c);
        let mut done = Vec::new();
        self.clients[c].core.take_completions(&mut done);
        for completion in done {
            self.record(c, completion);
        }
        self.issue(c);
        self.client_io(c);
        // Wake again for the core's timers while operations are open.
        if self.clients[c].core.in_flight() > 0 {
            let delay = self.clients[c].core.next_timer().as_micros() as Micros;
            let at = self.now + delay.max(MS);
            if self.clients[c].wake_at.is_none_or(|t| t > at || t <= self.now) {
                self.clients[c].wake_at = Some(at);
                self.schedule(at, Event::ClientWake { client: c });
            }
        }
    }

    /// Sends the core's frames over links (connecting on first use) and asks the
    /// authority for a map when the core wants one.
    fn client_io(&mut self, c: usize) {
        if self.clients[c].core.take_map_wanted() {
            let epoch = self.clients[c].core.map().epoch();
            self.ask_map(c, epoch);
        }
        let mut queued: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
        self.clients[c].core.drain_out(|at, frame| {
            queued.push((at, frame.to_vec()));
            true
        });
        let mut refused: Vec<SocketAddr> = Vec::new();
        for (at, frame) in queued {
            if refused.contains(&at) {
                continue;
            }
            let existing = self.clients[c].links.get(&at).copied().filter(|l| self.net.alive(*l));
            let link = match existing {
                Some(l) => l,
                None => match self.connect(Endpoint::Client(c), at) {
                    Some(l) => {
                        let client = &mut self.clients[c];
                        client.links.insert(at, l);
                        client.addrs.insert(l, at);
                        l
                    }
                    None => {
                        refused.push(at);
                        continue;
                    }
                },
            };
            self.send(link, Endpoint::Client(c), frame);
        }
        if !refused.is_empty() {
            // Connection refused: the messages are lost, as a failed connect reports.
            let now = self.instant();
            let client = &mut self.clients[c];
            client.core.set_now(now);
            for at in refused {
                client.core.link_lost(at);
            }
            let at = self.now + MS;
            if self.clients[c].wake_at.is_none_or(|t| t > at || t <= self.now) {
                self.clients[c].wake_at = Some(at);
                self.schedule(at, Event::ClientWake { client: c });
            }
        }
    }

    /// Starts operations while the workload has some left and the depth allows.
    fn issue(&mut self, c: usize) {
        let keys = self.shape.keys;
        loop {
            let client = &self.clients[c];
            let (kind, key) = if client.final_phase {
                if !client.open.is_empty() {
                    return;
                }
                let Some(key) = self.clients[c].finals.pop() else { return };
                (Kind::Get, key)
            } else {
                let idle_reader = self.shape.idle_reader && c + 1 == self.clients.len();
                let depth = if idle_reader { 1 } else { self.shape.depth };
                if client.issued >= self.shape.ops_per_client || client.open.len() >= depth || !self.faults_on_or_settling() {
                    return;
                }
                if self.now < client.next_issue {
                    let at = client.next_issue;
                    if self.clients[c].wake_at.is_none_or(|t| t > at || t <= self.now) {
                        self.clients[c].wake_at = Some(at);
                        self.schedule(at, Event::ClientWake { client: c });
                    }
                    return;
                }
                let mut key = key_name(self.rng.random_range(0..keys));
                if idle_reader && self.rng.random_bool(0.95) {
                    // What another client has just written: the read that must see it.
                    key = self.last_written.clone().unwrap_or(key);
                }
                let roll: f64 = self.rng.random();
                let kind = if idle_reader {
                    Kind::Get
                } else if roll < 0.45 {
                    Kind::Put(format!("c{c}-{}", client.issued).into_bytes())
                } else if roll < 0.85 {
                    Kind::Get
                } else {
                    Kind::Remove
                };
                (kind, key)
            };
            let request = match &kind {
                Kind::Get => Request::Get(&key),
                Kind::Put(v) => Request::Put(&key, v),
                Kind::Remove => Request::Remove(&key),
            };
            // Spread the workload over the time faults are injected.
            let think_mean_us = super::FAULTS_FOR_MS * MS * self.shape.depth as u64 / self.shape.ops_per_client as u64;
            let think = if self.shape.idle_reader && c + 1 == self.clients.len() {
                self.rng.random_range(500 * MS..=3000 * MS)
            } else {
                self.rng.random_range(0..=think_mean_us * 2)
            };
            let client = &mut self.clients[c];
            let token = client.core.submit(request).expect("keys and values are small");
            client.next_issue = self.now + think;
            client.issued += 1;
            client.open.insert(token, (kind, key, self.now));
        }
    }

    /// The workload runs while faults are injected; once they stop, operations still
    /// open finish but no new ones start until the final reads.
    fn faults_on_or_settling(&self) -> bool {
        self.faults_on
    }

    fn record(&mut self, c: usize, completion: Completion) {
        let client = &mut self.clients[c];
        let Some((kind, key, invoke)) = client.open.remove(&completion.token) else { return };
        let slot = match &completion.result {
            Ok(_) => 0,
            Err(ClientError::Unknown { .. }) => 1,
            Err(_) => 2,
        };
        client.outcomes[slot] += 1;
        let seen = match (&kind, completion.result) {
            (Kind::Get, Ok(Outcome::Value(v))) => Some(Seen::Read(Some(v))),
            (Kind::Get, Ok(Outcome::NotFound)) => Some(Seen::Read(None)),
            (Kind::Get, Err(e)) => {
                if client.final_phase {
                    // A final read must succeed on a quiet cluster.
                    let why = format!("client {c}: final read of {} failed: {e}", String::from_utf8_lossy(&key));
                    self.fail(why);
                }
                None
            }
            (Kind::Put(v), Ok(_)) => Some(Seen::Write(Some(v.clone()))),
            (Kind::Remove, Ok(_)) => Some(Seen::Write(None)),
            (Kind::Put(v), Err(ClientError::Unknown { .. })) => Some(Seen::MaybeWrite(Some(v.clone()))),
            (Kind::Remove, Err(ClientError::Unknown { .. })) => Some(Seen::MaybeWrite(None)),
            // Any other error says the write did not happen; the checker holds it to that.
            (Kind::Put(_) | Kind::Remove, Err(_)) => None,
            (_, Ok(other)) => unreachable!("{kind:?} answered {other:?}"),
        };
        if matches!(seen, Some(Seen::Write(_))) {
            self.last_written = Some(key.clone());
        }
        if let Some(event) = seen {
            let complete = self.now;
            self.clients[c].history.push(Operation { key, event, invoke, complete });
        }
    }

    /// The cluster is quiet: client 0 reads every key.
    pub(crate) fn final_reads(&mut self) {
        for (i, client) in self.clients.iter_mut().enumerate() {
            client.final_phase = true;
            if i == 0 {
                client.finals = (0..self.shape.keys).rev().map(key_name).collect();
            }
        }
        self.client_wake(0);
    }
}
