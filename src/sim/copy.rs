//! The copy driver's shell in the simulator: `meta::copy::CopyDriver` over simulated
//! links and timers, as `meta::copy_driver` drives it over blocking rpcs (a worker per
//! lane); each member of the authority group drives the copies it planned while it led.

use std::net::SocketAddr;

use crate::meta::copy::{Answer, CopyDriver, Step, COPY_LANES, COPY_RPC_TIMEOUT_MS, LINE_COUNT};
use crate::meta::member::CopyPlan;

use super::net::{Call, Endpoint, LinkId};
use super::{Event, Micros, World, MS};

pub(crate) struct SimCopy {
    driver: CopyDriver,
    /// The leader's term that planned it (`Member::copied`).
    term: u64,
    /// Each lane's open link of each line (`copy::Line`), and where it goes.
    lines: [[Option<(LinkId, SocketAddr)>; LINE_COUNT]; COPY_LANES],
    /// Each lane's call on the wire.
    waiting: [Option<Call>; COPY_LANES],
    /// The earliest `CopyStep` timer set for a pause, if any is pending (a pause
    /// sets one only if it would come sooner, so timers do not pile up).
    timer_at: Option<Micros>,
    next_id: u64,
    /// Partitions copied so far, with their target's incarnation when the job began
    /// (the authority takes no copy from a target that restarted since).
    pub copied: Vec<(crate::map::PartitionId, crate::map::BrickId, u64)>,
    lives: Vec<(crate::map::BrickId, u64)>,
}

impl SimCopy {
    /// `lives`: every brick's incarnation now.
    pub fn new(plan: CopyPlan, now_ms: u64, lives: Vec<(crate::map::BrickId, u64)>) -> SimCopy {
        SimCopy {
            driver: CopyDriver::new(plan.joins, plan.epoch, now_ms),
            term: plan.term,
            lines: [[None; LINE_COUNT]; COPY_LANES],
            waiting: [None; COPY_LANES],
            timer_at: None,
            next_id: 1,
            copied: Vec::new(),
            lives,
        }
    }

    /// Records the partitions the driver finished since last asked (on an answer, or
    /// within a poll: a catch-up ends when its last range compares equal).
    fn record_done(&mut self) {
        let new: Vec<_> = self.driver.done()[self.copied.len()..].to_vec();
        for (p, target) in new {
            let life = self.lives.iter().find(|(b, _)| *b == target).map_or(u64::MAX, |(_, life)| *life);
            self.copied.push((p, target, life));
        }
    }

    fn links(&self) -> impl Iterator<Item = LinkId> + '_ {
        self.lines.iter().flatten().flatten().map(|(link, _)| *link)
    }
}

impl World {
    /// Polls member `m`'s driver until it waits: for replies, a pause, or nothing
    /// (finished).
    pub(crate) fn copy_step(&mut self, m: usize) {
        if let Some(job) = &mut self.members[m].copy {
            if job.timer_at.is_some_and(|at| at <= self.now) {
                job.timer_at = None;
            }
        }
        loop {
            let now_ms = self.now_ms();
            let Some(job) = &mut self.members[m].copy else { return };
            let late = job.waiting.iter().enumerate().find_map(|(lane, c)| c.filter(|c| self.now >= c.sent + COPY_RPC_TIMEOUT_MS * MS).map(|c| (lane, c)));
            if let Some((lane, call)) = late {
                // The call timed out, as `Rpc::call` does: the link is as good as lost.
                self.break_link(call.link, false);
                self.copy_answer(m, lane, call.link, Answer::Lost("timed out".into()));
                continue;
            }
            // As the authority's copy thread: a plan of a term this member no longer
            // leads in is abandoned.
            let term = job.term;
            if !self.members[m].member.as_ref().is_some_and(|x| x.leads_in(term)) {
                let job = self.members[m].copy.take().expect("present");
                for link in job.links() {
                    self.break_link(link, false);
                }
                self.note(format!("copy: planned in term {term}, abandoned: member {m} no longer leads in it"));
                return;
            }
            let map = self.members[m].member.as_ref().and_then(|x| x.published()).cloned();
            let job = self.members[m].copy.as_mut().expect("present");
            let step = job.driver.poll(map.as_ref(), now_ms);
            job.record_done();
            match step {
                Step::Call { lane, line, addr, op, epoch, value } => {
                    // A held line that closed fails the call, as a closed socket does; one
                    // open to another address is closed first, as the worker does.
                    let held = job.lines[lane][line.index()];
                    if let Some((l, _)) = held.filter(|(_, a)| *a != addr) {
                        job.lines[lane][line.index()] = None;
                        self.break_link(l, false);
                    }
                    let job = self.members[m].copy.as_mut().expect("present");
                    let link = match job.lines[lane][line.index()] {
                        Some((l, _)) if self.net.alive(l) => Ok(l),
                        Some(_) => Err("connection closed".to_string()),
                        None => self.connect(Endpoint::Member(m), addr).ok_or(format!("connect to {addr}: refused")),
                    };
                    let job = self.members[m].copy.as_mut().expect("present");
                    let link = match link {
                        Ok(l) => l,
                        Err(why) => {
                            job.lines[lane][line.index()] = None;
                            job.driver.answer(lane, Answer::Lost(why), now_ms);
                            continue;
                        }
                    };
                    job.lines[lane][line.index()] = Some((link, addr));
                    let id = job.next_id;
                    job.next_id += 1;
                    let call = self.call(link, Endpoint::Member(m), op, epoch, &value, id);
                    self.members[m].copy.as_mut().expect("present").waiting[lane] = Some(call);
                    self.after(COPY_RPC_TIMEOUT_MS * MS, Event::CopyStep { member: m });
                }
                Step::HangUp { lane, line } => {
                    if let Some((link, _)) = job.lines[lane][line.index()].take() {
                        self.break_link(link, false);
                    }
                }
                Step::Wait { ms } => {
                    if let Some(ms) = ms {
                        let at = self.now + ms * MS;
                        if job.timer_at.is_none_or(|t| at < t) {
                            job.timer_at = Some(at);
                            self.after(ms * MS, Event::CopyStep { member: m });
                        }
                    }
                    return;
                }
                Step::Note(note) => self.note(format!("copy: {note}")),
                Step::Finished(done) => {
                    let term = job.term;
                    self.members[m].copy = None;
                    let Some(member) = self.members[m].member.as_mut() else { return };
                    let step = member.copied(term, &done, now_ms).map_err(|e| e.to_string());
                    return self.member_apply(m, step);
                }
            }
        }
    }

    /// Hands member `m`'s driver what became of `lane`'s call on `link`; the line is
    /// closed if lost.
    fn copy_answer(&mut self, m: usize, lane: usize, link: LinkId, answer: Answer) {
        let now_ms = self.now_ms();
        let Some(job) = &mut self.members[m].copy else { return };
        job.waiting[lane] = None;
        if matches!(answer, Answer::Lost(_)) {
            job.lines[lane].iter_mut().filter(|l| l.is_some_and(|(x, _)| x == link)).for_each(|l| *l = None);
        }
        job.driver.answer(lane, answer, now_ms);
        job.record_done();
    }

    /// The lane whose call is waiting on `link`, and the call.
    fn copy_waiting_on(&self, m: usize, link: LinkId) -> Option<(usize, Call)> {
        let job = self.members[m].copy.as_ref()?;
        job.waiting.iter().enumerate().find_map(|(lane, c)| c.filter(|c| c.link == link).map(|c| (lane, c)))
    }

    pub(crate) fn copy_receive(&mut self, m: usize, link: LinkId, bytes: Vec<u8>) {
        let Some((lane, call)) = self.copy_waiting_on(m, link) else { return };
        let answer = match call.reply(&bytes) {
            Ok((status, value)) => Answer::Reply(status, value),
            Err(why) => Answer::Lost(why),
        };
        if matches!(answer, Answer::Lost(_)) {
            self.break_link(link, false);
        }
        self.copy_answer(m, lane, link, answer);
        self.copy_step(m);
    }

    pub(crate) fn copy_link_down(&mut self, m: usize, link: LinkId) {
        if let Some((lane, _)) = self.copy_waiting_on(m, link) {
            self.copy_answer(m, lane, link, Answer::Lost("connection closed".into()));
            self.copy_step(m);
        }
    }
}
