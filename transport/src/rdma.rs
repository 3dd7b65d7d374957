//! RDMA verbs (feature `rdma`). `probe` finds a usable device (the start-up check
//! behind `--transport rdma|auto`, whose failure is the cue to fall back to TCP);
//! `Loopback` is the bare verbs path on the `ibverbs` crate (two queue pairs in one
//! process, one message at a time: the floor the transport is measured against);
//! `RdmaTransport` carries frames over RC queue pairs with credit-based flow control,
//! small messages inline and selective signalling, on the raw verbs of `verbs.rs`.

use std::time::{Duration, Instant};

/// A verbs device that opened.
#[derive(Clone, Debug)]
pub struct Device {
    pub name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    #[error("no usable RDMA device: {0}")]
    NoDevice(String),
    #[error("rdma {op}: {source}")]
    Verbs {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("rdma {op}: completion failed: {status}")]
    Completion { op: &'static str, status: String },
    #[error("rdma {op}: no completion within {timeout_ms} ms")]
    Timeout { op: &'static str, timeout_ms: u64 },
    #[error("rdma: frame of {len} bytes does not fit a {max}-byte buffer")]
    TooLarge { len: usize, max: usize },
}

fn verbs(op: &'static str) -> impl FnOnce(std::io::Error) -> RdmaError {
    move |source| RdmaError::Verbs { op, source }
}

/// The first RDMA device that opens. Without kernel RDMA support the device list itself
/// fails (ENOSYS): the caller says so in one line and uses TCP.
pub fn probe() -> Result<Device, RdmaError> {
    let list = ibverbs::devices().map_err(|e| RdmaError::NoDevice(format!("listing devices: {e}")))?;
    let device = list.iter().next().ok_or_else(|| RdmaError::NoDevice("no device listed".into()))?;
    let name = device.name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "unnamed".into());
    device.open().map_err(|e| RdmaError::NoDevice(format!("opening {name}: {e}")))?;
    Ok(Device { name })
}

/// Bytes per registered buffer slot: a frame larger than this does not travel in one
/// message (the transport will split or refuse it).
pub const SLOT_BYTES: usize = 4096;
/// Receive buffers posted per queue pair, reposted as each completes (the ring is kept
/// full, so a sender within its credits never finds it empty).
pub const RECV_SLOTS: usize = 64;
/// Completions a poll takes at once.
const POLL_BATCH: usize = 32;

/// Two RC queue pairs of one device connected to each other in this process, each
/// with its registered buffers: the path frames take, exercised end to end. (Between
/// processes the endpoints travel over the TCP control channel instead.)
pub struct Loopback {
    cq: &'static ibverbs::CompletionQueue<'static>,
    a: ibverbs::QueuePair<'static>,
    b: ibverbs::QueuePair<'static>,
    /// Slot i of `a_mem`/`b_mem` is send slot 0 and receive slots 1..=RECV_SLOTS.
    a_mem: ibverbs::MemoryRegion<u8>,
    b_mem: ibverbs::MemoryRegion<u8>,
}

const SEND_SLOT: usize = 0;

/// Work request ids: which side, which slot, send or receive.
fn wr_id(side_b: bool, recv: bool, slot: usize) -> u64 {
    (side_b as u64) << 40 | (recv as u64) << 32 | slot as u64
}

impl Loopback {
    pub fn open() -> Result<Loopback, RdmaError> {
        let list = ibverbs::devices().map_err(|e| RdmaError::NoDevice(e.to_string()))?;
        let device = list.iter().next().ok_or_else(|| RdmaError::NoDevice("no device listed".into()))?;
        // A device context lives as long as the process that opened it (a brick or a
        // client opens one): leaked, so the queues and regions borrowing it can live in
        // one struct.
        let ctx: &'static ibverbs::Context = Box::leak(Box::new(device.open().map_err(verbs("open device"))?));
        let cq: &'static ibverbs::CompletionQueue<'static> =
            Box::leak(Box::new(ctx.create_cq((4 * RECV_SLOTS) as i32, 0).map_err(verbs("create cq"))?));
        let pd: &'static ibverbs::ProtectionDomain<'static> =
            Box::leak(Box::new(ctx.alloc_pd().map_err(|_| RdmaError::Verbs { op: "alloc pd", source: std::io::Error::last_os_error() })?));
        let build = |pd: &'static ibverbs::ProtectionDomain<'static>| {
            pd.create_qp(cq, cq, ibverbs::ibv_qp_type::IBV_QPT_RC)
                .set_gid_index(1)
                .set_max_send_wr(RECV_SLOTS as u32)
                .set_max_recv_wr(RECV_SLOTS as u32)
                .build()
        };
        let pa = build(pd).map_err(verbs("create qp"))?;
        let pb = build(pd).map_err(verbs("create qp"))?;
        let (ea, eb) = (pa.endpoint(), pb.endpoint());
        let a = pa.handshake(eb).map_err(verbs("connect qp"))?;
        let b = pb.handshake(ea).map_err(verbs("connect qp"))?;
        let a_mem = pd.allocate::<u8>((RECV_SLOTS + 1) * SLOT_BYTES).map_err(verbs("register memory"))?;
        let b_mem = pd.allocate::<u8>((RECV_SLOTS + 1) * SLOT_BYTES).map_err(verbs("register memory"))?;
        let mut lo = Loopback { cq, a, b, a_mem, b_mem };
        for slot in 1..=RECV_SLOTS {
            lo.post_recv(false, slot)?;
            lo.post_recv(true, slot)?;
        }
        Ok(lo)
    }

    fn post_recv(&mut self, side_b: bool, slot: usize) -> Result<(), RdmaError> {
        let range = slot * SLOT_BYTES..(slot + 1) * SLOT_BYTES;
        let (qp, mem) = if side_b { (&mut self.b, &mut self.b_mem) } else { (&mut self.a, &mut self.a_mem) };
        // SAFETY: the receive buffer is a slot of a memory region this struct owns and
        // keeps registered for its whole life; no slot is posted twice (it is reposted
        // only after its completion was taken), so the device never writes a buffer
        // Rust code is reading.
        unsafe { qp.post_receive(mem, range, wr_id(side_b, true, slot)) }.map_err(verbs("post receive"))
    }

    /// Sends `frame` from one side to the other and waits for both completions; returns
    /// the received bytes' copy. One message in flight: a ping-pong building block.
    pub fn transfer(&mut self, from_b: bool, frame: &[u8], timeout: Duration) -> Result<Vec<u8>, RdmaError> {
        if frame.len() > SLOT_BYTES {
            return Err(RdmaError::TooLarge { len: frame.len(), max: SLOT_BYTES });
        }
        {
            let (qp, mem) = if from_b { (&mut self.b, &mut self.b_mem) } else { (&mut self.a, &mut self.a_mem) };
            mem[SEND_SLOT * SLOT_BYTES..SEND_SLOT * SLOT_BYTES + frame.len()].copy_from_slice(frame);
            // SAFETY: the send slot lies in a registered region this struct owns; it is
            // not touched again until this send's completion has been taken below.
            unsafe { qp.post_send(mem, SEND_SLOT * SLOT_BYTES..SEND_SLOT * SLOT_BYTES + frame.len(), wr_id(from_b, false, SEND_SLOT)) }
                .map_err(verbs("post send"))?;
        }
        let deadline = Instant::now() + timeout;
        let mut sent = false;
        let mut received: Option<Vec<u8>> = None;
        let mut completions = [ibverbs::ibv_wc::default(); POLL_BATCH];
        while !sent || received.is_none() {
            if Instant::now() > deadline {
                return Err(RdmaError::Timeout { op: "transfer", timeout_ms: timeout.as_millis() as u64 });
            }
            let done: Vec<(u64, Option<String>, usize)> = self
                .cq
                .poll(&mut completions)
                .map_err(verbs("poll cq"))?
                .iter()
                .map(|wc| (wc.wr_id(), wc.error().map(|(status, _)| format!("{status:?}")), wc.len()))
                .collect();
            for (id, error, len) in done {
                if let Some(status) = error {
                    return Err(RdmaError::Completion { op: if id >> 32 & 1 == 1 { "receive" } else { "send" }, status });
                }
                let (side_b, recv, slot) = (id >> 40 == 1, id >> 32 & 1 == 1, (id & 0xffff_ffff) as usize);
                if !recv {
                    sent = true;
                    continue;
                }
                let mem = if side_b { &self.b_mem } else { &self.a_mem };
                received = Some(mem[slot * SLOT_BYTES..slot * SLOT_BYTES + len].to_vec());
                self.post_recv(side_b, slot)?;
            }
        }
        Ok(received.expect("loop ends once received"))
    }
}

// ---- The transport: frames over RC queue pairs, set up over TCP ----

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;

use crate::verbs::{Device as VerbsDevice, Qp, Region};

use crate::{CloseReason, ConnId, Framing, Handler, TcpConfig, TcpTransport, Transport, TransportError};

/// Send slots per connection (sends in flight at once).
pub const SEND_SLOTS: usize = 16;
/// Bytes of each message's header: the credits it returns to the peer.
const MSG_HEADER_BYTES: usize = 4;
/// Completion queue entries shared by every connection of a transport.
const CQ_ENTRIES: usize = 16384;
/// Connections a transport holds: every one's sends and receives fit the queue.
pub const RDMA_CONNECTIONS_MAX: usize = CQ_ENTRIES / (SEND_SLOTS + RECV_SLOTS);
/// Bytes a send carries inline (copied into the work request, no DMA read of the slot)
/// where the device allows: a credit header and a small frame (a get, a put of a short
/// value, most replies).
const INLINE_BYTES: usize = 256;
/// A send is signalled at least this often (the rest complete silently, covered by the
/// next signalled completion).
const SIGNAL_EVERY: usize = SEND_SLOTS / 4;
/// Longest control message (the JSON of a queue pair endpoint).
const HANDSHAKE_BYTES_MAX: usize = 1024;

#[derive(Clone, Debug)]
pub struct RdmaConfig {
    /// Queued bytes past which a connection whose peer grants no credits is closed.
    pub outbox_bytes_max: usize,
    /// How long `connect` waits for the peer's queue pair.
    pub handshake_timeout: Duration,
    /// The cluster's secret, proved on the control channel before any queue pair is
    /// made: a peer that cannot prove it never learns an endpoint to connect to.
    pub secret: Option<std::sync::Arc<crate::auth::Secret>>,
}

impl Default for RdmaConfig {
    fn default() -> Self {
        RdmaConfig { outbox_bytes_max: 32 << 20, handshake_timeout: Duration::from_secs(2), secret: None }
    }
}

/// Counters of a transport's sends (see `RdmaTransport::send_stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendStats {
    pub sends: u64,
    /// Of `sends`, those posted inline (no DMA read of the send slot).
    pub inline: u64,
    /// Send completions taken: one per signalled send, the rest complete silently.
    pub completions: u64,
}

/// Control messages on the TCP connection: a little-endian `u32` length, then bytes.
struct ControlFraming;

impl Framing for ControlFraming {
    fn frame_len(&self, buf: &[u8]) -> Result<Option<usize>, String> {
        let Some(len) = buf.get(..4).map(|b| u32::from_le_bytes(b.try_into().expect("4")) as usize) else { return Ok(None) };
        if len > HANDSHAKE_BYTES_MAX {
            return Err(format!("control message of {len} bytes (at most {HANDSHAKE_BYTES_MAX})"));
        }
        Ok(Some(4 + len))
    }
}

fn control_message(endpoint: &ibverbs::QueuePairEndpoint) -> Vec<u8> {
    let json = serde_json::to_vec(endpoint).expect("an endpoint serialises");
    let mut out = (json.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out
}

/// What the control channel reported during a TCP poll.
enum Control {
    Endpoint(ConnId, Result<ibverbs::QueuePairEndpoint, String>),
    Closed(ConnId, SocketAddr, CloseReason),
    /// A control connection that did not prove the secret (`auth`).
    Unauthenticated(ConnId, SocketAddr, String),
}

#[derive(Default)]
struct ControlEvents(Vec<Control>);

impl Handler for ControlEvents {
    fn on_frame(&mut self, conn: ConnId, frame: &[u8], _out: &mut Vec<u8>) -> Result<(), String> {
        let endpoint = serde_json::from_slice(&frame[4..]).map_err(|e| format!("bad queue pair endpoint: {e}"));
        self.0.push(Control::Endpoint(conn, endpoint));
        Ok(())
    }

    fn on_close(&mut self, conn: ConnId, peer: SocketAddr, reason: &CloseReason) {
        if let CloseReason::Unauthenticated(why) = reason {
            return self.0.push(Control::Unauthenticated(conn, peer, why.to_string()));
        }
        let reason = match reason {
            CloseReason::PeerClosed => CloseReason::PeerClosed,
            other => CloseReason::Io(std::io::Error::other(format!("control connection: {other}"))),
        };
        self.0.push(Control::Closed(conn, peer, reason));
    }
}

/// One connection: its queue pair, registered slots, and byte streams both ways.
struct RConn {
    /// Declared before `mem`: dropped (destroyed) before the region is deregistered.
    qp: Qp,
    /// `SEND_SLOTS` send slots, then `RECV_SLOTS` receive slots.
    mem: Region,
    free_send: Vec<usize>,
    /// Send slots posted and not yet covered by a completion, oldest first. Sends are
    /// signalled only now and then (`SIGNAL_EVERY`); a signalled send's completion
    /// frees it and every send posted before it (an RC send queue completes in order).
    posted: VecDeque<usize>,
    /// Sends posted since the last signalled one.
    unsignalled: usize,
    /// Received stream bytes not yet cut into frames: `inbound[ipos..]`.
    inbound: Vec<u8>,
    ipos: usize,
    /// Frames to send: `outbox[opos..]`.
    outbox: Vec<u8>,
    opos: usize,
    /// Messages the peer can take now; receives reposted here and not yet told.
    credits: u32,
    grant: u32,
    peer: SocketAddr,
}

fn conn_wr(conn: ConnId, recv: bool, slot: usize) -> u64 {
    (conn.slot as u64) << 32 | ((conn.generation & 0xffff) as u64) << 16 | (recv as u64) << 15 | slot as u64
}

fn wr_parts(wr: u64) -> (u32, u32, bool, usize) {
    ((wr >> 32) as u32, (wr >> 16 & 0xffff) as u32, wr >> 15 & 1 == 1, (wr & 0x7fff) as usize)
}

impl RConn {
    fn recv_range(slot: usize) -> std::ops::Range<usize> {
        let start = (SEND_SLOTS + slot) * SLOT_BYTES;
        start..start + SLOT_BYTES
    }

    fn post_recv(&mut self, conn: ConnId, slot: usize) -> Result<(), RdmaError> {
        // SAFETY: receive slot `slot` of this connection's registered region; it is posted
        // again only after its completion was taken, so the device never writes a slot
        // this code is reading, and the region outlives the queue pair (dropped after it).
        unsafe { self.qp.post_recv(&mut self.mem, Self::recv_range(slot), conn_wr(conn, true, slot)) }.map_err(verbs("post receive"))
    }

    /// A signalled send of `slot` completed: it and every send posted before it are done.
    fn sends_done(&mut self, slot: usize) {
        while let Some(s) = self.posted.pop_front() {
            self.free_send.push(s);
            if s == slot {
                return;
            }
        }
        panic!("a completion for send slot {slot}, which was not posted");
    }
}

/// Frames over RDMA RC queue pairs. Each connection starts as a TCP connection that
/// carries the two queue pairs' endpoints and then only tells whether the peer is
/// still there (its close closes the RDMA connection); frames travel as SENDs of up to
/// one slot, each led by the credits it returns, so a sender never posts more than the
/// receiver has receives for. Completions of every connection share one queue,
/// busy-polled by `poll`.
pub struct RdmaTransport<F: Framing> {
    framing: F,
    config: RdmaConfig,
    tcp: TcpTransport<ControlFraming>,
    device: &'static VerbsDevice,
    conns: HashMap<ConnId, RConn>,
    control: ControlEvents,
    /// Connections dialled by `connect` waiting for the peer's endpoint.
    dialling: HashMap<ConnId, Qp>,
    stats: SendStats,
}

impl<F: Framing> RdmaTransport<F> {
    pub fn new(framing: F, config: RdmaConfig) -> Result<Self, RdmaError> {
        // The device, its protection domain and completion queue live for the process.
        let device = VerbsDevice::open(CQ_ENTRIES).map_err(|e| RdmaError::NoDevice(e.to_string()))?;
        let tcp_config = TcpConfig { connections_max: RDMA_CONNECTIONS_MAX, secret: config.secret.clone(), ..TcpConfig::default() };
        let tcp = TcpTransport::new(ControlFraming, tcp_config).map_err(|e| RdmaError::Verbs { op: "control channel", source: std::io::Error::other(e.to_string()) })?;
        Ok(RdmaTransport {
            framing,
            config,
            tcp,
            device,
            conns: HashMap::new(),
            control: ControlEvents::default(),
            dialling: HashMap::new(),
            stats: SendStats::default(),
        })
    }

    /// Breaks `conn`'s queue pair (moves it to the error state) and leaves the rest as
    /// it is: the control connection stays open. For tests of what the peer does with a
    /// peer whose queue pair broke.
    pub fn break_queue_pair(&mut self, conn: ConnId) -> Result<(), RdmaError> {
        let c = self.conns.get_mut(&conn).ok_or_else(|| RdmaError::Verbs { op: "break qp", source: std::io::Error::other("no such connection") })?;
        c.qp.set_error().map_err(verbs("break qp"))
    }

    /// Descriptors an idle loop can sleep on in epoll and wake when this transport has
    /// work: the completion channel (after `arm`) and the control channel's epoll.
    pub fn wake_fds(&self) -> [std::os::fd::RawFd; 2] {
        [self.device.wake_fd(), self.tcp.poll_fd()]
    }

    /// Before sleeping: asks for a wake-up at the next completion, then takes what
    /// already came (a completion just before arming raises no event). Returns the
    /// frames delivered; if any, do not sleep.
    pub fn arm<H: Handler>(&mut self, handler: &mut H) -> Result<usize, TransportError> {
        if let Err(e) = self.device.arm() {
            return Err(TransportError::Poll(e));
        }
        self.poll(Some(Duration::ZERO), handler)
    }

    /// After waking: takes the completion channel's events (their completions are
    /// taken by the next `poll`).
    pub fn take_wakes(&mut self) {
        self.device.drain_events();
    }

    /// What this transport's sends have been: how many, how many inline, how many
    /// completions they raised.
    pub fn send_stats(&self) -> SendStats {
        self.stats
    }

    /// A queue pair with room for small sends inline; without it, where the device
    /// refuses that much inline room.
    fn prepare(&self) -> Result<Qp, RdmaError> {
        Qp::create(self.device, SEND_SLOTS, RECV_SLOTS, INLINE_BYTES)
            .or_else(|_| Qp::create(self.device, SEND_SLOTS, RECV_SLOTS, 0))
            .map_err(verbs("create qp"))
    }

    /// A queue pair connected to `remote`, its slots registered and receives posted.
    fn open_conn(&self, conn: ConnId, mut qp: Qp, remote: ibverbs::QueuePairEndpoint, peer: SocketAddr) -> Result<RConn, RdmaError> {
        qp.connect(self.device, &remote).map_err(verbs("connect qp"))?;
        let mem = Region::new(self.device, (SEND_SLOTS + RECV_SLOTS) * SLOT_BYTES).map_err(verbs("register memory"))?;
        let mut c = RConn {
            qp,
            mem,
            free_send: (0..SEND_SLOTS).collect(),
            posted: VecDeque::with_capacity(SEND_SLOTS),
            unsignalled: 0,
            inbound: Vec::new(),
            ipos: 0,
            outbox: Vec::new(),
            opos: 0,
            credits: RECV_SLOTS as u32,
            grant: 0,
            peer,
        };
        for slot in 0..RECV_SLOTS {
            c.post_recv(conn, slot)?;
        }
        Ok(c)
    }

    /// Handles what the control channel reported: endpoints of accepted and dialled
    /// connections, and closes.
    fn control<H: Handler>(&mut self, handler: &mut H) {
        for event in std::mem::take(&mut self.control.0) {
            match event {
                Control::Endpoint(conn, endpoint) => {
                    let peer = self.tcp.peer(conn).unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
                    let endpoint = match endpoint {
                        Ok(e) => e,
                        Err(why) => {
                            self.tcp.close(conn, CloseReason::Malformed(why.clone()), &mut ControlEvents::default());
                            self.dialling.remove(&conn);
                            handler.on_close(conn, peer, &CloseReason::Malformed(why));
                            continue;
                        }
                    };
                    if self.dialling.contains_key(&conn) {
                        // `connect` takes its own dialled connection's endpoint.
                        continue;
                    }
                    if self.conns.contains_key(&conn) {
                        let why = "a second queue pair endpoint on one connection".to_string();
                        self.close_conn(conn, CloseReason::Malformed(why), handler);
                        continue;
                    }
                    // Accepted: answer with our queue pair.
                    let opened = self.prepare().and_then(|p| {
                        let mine = p.endpoint(self.device);
                        self.open_conn(conn, p, endpoint, peer).map(|c| (c, mine))
                    });
                    match opened {
                        Ok((c, mine)) => {
                            if let Ok(out) = self.tcp.outbox(conn) {
                                out.extend_from_slice(&control_message(&mine));
                            }
                            self.conns.insert(conn, c);
                            handler.on_accept(conn, peer);
                        }
                        Err(e) => {
                            self.tcp.close(conn, CloseReason::Io(std::io::Error::other(e.to_string())), &mut ControlEvents::default());
                        }
                    }
                }
                Control::Closed(conn, peer, reason) => {
                    self.dialling.remove(&conn);
                    if self.conns.remove(&conn).is_some() {
                        handler.on_close(conn, peer, &reason);
                    }
                }
                Control::Unauthenticated(conn, peer, why) => {
                    self.dialling.remove(&conn);
                    handler.on_unauthenticated(peer, &why);
                }
            }
        }
        let mut scratch = ControlEvents::default();
        self.tcp.flush(&mut scratch);
        self.control.0.extend(scratch.0);
    }

    fn close_conn<H: Handler>(&mut self, conn: ConnId, reason: CloseReason, handler: &mut H) {
        let mut scratch = ControlEvents::default();
        self.tcp.close(conn, CloseReason::Local, &mut scratch);
        self.dialling.remove(&conn);
        if let Some(c) = self.conns.remove(&conn) {
            handler.on_close(conn, c.peer, &reason);
        }
    }

    /// Takes completions: received bytes join their connection's stream, credits come
    /// back, receives are reposted, send slots are freed. Returns how many it took.
    fn completions<H: Handler>(&mut self, handler: &mut H) -> usize {
        let mut wc = [ibverbs::ibv_wc::default(); POLL_BATCH];
        let done: Vec<(u64, Option<String>, usize)> = match self.device.poll(&mut wc) {
            Ok(n) => wc[..n].iter().map(|w| (w.wr_id(), w.error().map(|(s, _)| crate::verbs::status_name(s)), w.len())).collect(),
            Err(_) => return 0,
        };
        let n = done.len();
        for (wr, error, len) in done {
            let (slot_id, generation, recv, slot) = wr_parts(wr);
            let Some(conn) = self.conns.keys().copied().find(|c| c.slot == slot_id && c.generation & 0xffff == generation) else { continue };
            if let Some(status) = error {
                let why = format!("{} completion failed: {status}", if recv { "receive" } else { "send" });
                self.close_conn(conn, CloseReason::Io(std::io::Error::other(why)), handler);
                continue;
            }
            let c = self.conns.get_mut(&conn).expect("found");
            if !recv {
                c.sends_done(slot);
                self.stats.completions += 1;
                continue;
            }
            if len < MSG_HEADER_BYTES {
                let why = format!("a {len}-byte message is shorter than its header");
                self.close_conn(conn, CloseReason::Malformed(why), handler);
                continue;
            }
            let range = RConn::recv_range(slot);
            let message = &c.mem[range.start..range.start + len];
            let credits = u32::from_le_bytes(message[..4].try_into().expect("4"));
            c.credits += credits;
            c.inbound.extend_from_slice(&message[MSG_HEADER_BYTES..]);
            if c.credits > RECV_SLOTS as u32 || c.post_recv(conn, slot).is_err() {
                let why = format!("the peer granted {} credits for {RECV_SLOTS} receives", c.credits);
                self.close_conn(conn, CloseReason::Malformed(why), handler);
                continue;
            }
            c.grant += 1;
        }
        n
    }

    /// Cuts whole frames from each connection's stream and hands them to `handler`.
    fn deliver<H: Handler>(&mut self, handler: &mut H) -> usize {
        let mut delivered = 0;
        let mut bad: Vec<(ConnId, CloseReason)> = Vec::new();
        for (&conn, c) in self.conns.iter_mut() {
            loop {
                let rest = &c.inbound[c.ipos..];
                let len = match self.framing.frame_len(rest) {
                    Ok(Some(len)) if len <= rest.len() => len,
                    Ok(_) => break,
                    Err(why) => {
                        bad.push((conn, CloseReason::Malformed(why)));
                        break;
                    }
                };
                let frame = &c.inbound[c.ipos..c.ipos + len];
                if let Err(why) = handler.on_frame(conn, frame, &mut c.outbox) {
                    bad.push((conn, CloseReason::Refused(why)));
                    break;
                }
                c.ipos += len;
                delivered += 1;
            }
            if c.ipos == c.inbound.len() {
                c.inbound.clear();
                c.ipos = 0;
            }
        }
        for (conn, reason) in bad {
            self.close_conn(conn, reason, handler);
        }
        delivered
    }

    /// Posts what each connection's credits and free send slots allow.
    fn send_all<H: Handler>(&mut self, handler: &mut H) {
        let mut full: Vec<(ConnId, usize)> = Vec::new();
        for (&conn, c) in self.conns.iter_mut() {
            loop {
                let pending = c.outbox.len() - c.opos;
                // A data message needs a spare credit: the last one is kept for grants,
                // so two peers that both wait for credits can always tell each other.
                let data = pending > 0 && c.credits > 1;
                let grant_only = !data && c.grant as usize >= RECV_SLOTS / 2 && c.credits >= 1;
                if !(data || grant_only) {
                    break;
                }
                let Some(slot) = c.free_send.pop() else { break };
                let n = if data { pending.min(SLOT_BYTES - MSG_HEADER_BYTES) } else { 0 };
                let start = slot * SLOT_BYTES;
                c.mem[start..start + 4].copy_from_slice(&c.grant.to_le_bytes());
                c.mem[start + 4..start + 4 + n].copy_from_slice(&c.outbox[c.opos..c.opos + n]);
                // Signal every few sends, and always the one that takes the last free
                // slot, so a completion always comes to free the slots again.
                let signaled = c.unsignalled + 1 >= SIGNAL_EVERY || c.free_send.is_empty();
                // SAFETY: send slot `slot` was free (a completion covered its last send)
                // and stays in `posted`, out of `free_send`, until one covers this one.
                let posted = unsafe { c.qp.post_send(&c.mem, start..start + MSG_HEADER_BYTES + n, conn_wr(conn, false, slot), signaled) };
                if posted.is_err() {
                    c.free_send.push(slot);
                    break;
                }
                c.posted.push_back(slot);
                c.unsignalled = if signaled { 0 } else { c.unsignalled + 1 };
                self.stats.sends += 1;
                self.stats.inline += (MSG_HEADER_BYTES + n <= c.qp.inline_max) as u64;
                c.credits -= 1;
                c.grant = 0;
                c.opos += n;
            }
            if c.opos == c.outbox.len() {
                c.outbox.clear();
                c.opos = 0;
            } else if c.outbox.len() - c.opos > self.config.outbox_bytes_max {
                full.push((conn, c.outbox.len() - c.opos));
            }
        }
        for (conn, bytes) in full {
            // The peer stopped granting credits (or never reads): it is cut off.
            self.close_conn(conn, CloseReason::OutboxFull { bytes }, handler);
        }
    }

    /// One non-blocking round of the control channel.
    fn tcp_poll(&mut self) -> Result<(), TransportError> {
        let mut events = std::mem::take(&mut self.control);
        let r = self.tcp.poll(Some(Duration::ZERO), &mut events);
        self.control = events;
        r.map(|_| ())
    }
}

impl<F: Framing> Transport for RdmaTransport<F> {
    fn listen(&mut self, addr: SocketAddr) -> Result<SocketAddr, TransportError> {
        self.tcp.listen(addr)
    }

    fn connect(&mut self, addr: SocketAddr, timeout: Duration) -> Result<ConnId, TransportError> {
        let fail = |e: RdmaError| TransportError::Io { op: "rdma connect", addr, source: std::io::Error::other(e.to_string()) };
        let conn = self.tcp.connect(addr, timeout)?;
        let prepared = self.prepare().map_err(fail)?;
        self.tcp.outbox(conn)?.extend_from_slice(&control_message(&prepared.endpoint(self.device)));
        self.dialling.insert(conn, prepared);
        let deadline = std::time::Instant::now() + self.config.handshake_timeout.min(timeout.max(Duration::from_millis(100)));
        loop {
            self.tcp_poll()?;
            // Endpoints and closes of other connections wait in `control` for `poll`.
            let mut i = 0;
            while i < self.control.0.len() {
                match &self.control.0[i] {
                    Control::Endpoint(c, Ok(endpoint)) if *c == conn => {
                        let endpoint = *endpoint;
                        self.control.0.remove(i);
                        let prepared = self.dialling.remove(&conn).expect("dialling");
                        let c = self.open_conn(conn, prepared, endpoint, addr).map_err(fail)?;
                        self.conns.insert(conn, c);
                        return Ok(conn);
                    }
                    Control::Endpoint(c, Err(why)) if *c == conn => {
                        let why = why.clone();
                        self.control.0.remove(i);
                        self.dialling.remove(&conn);
                        self.tcp.close(conn, CloseReason::Local, &mut ControlEvents::default());
                        return Err(TransportError::Io { op: "rdma connect", addr, source: std::io::Error::other(why) });
                    }
                    Control::Unauthenticated(c, _, why) if *c == conn => {
                        let why = format!("not authenticated: {why}");
                        self.control.0.remove(i);
                        self.dialling.remove(&conn);
                        return Err(TransportError::Io { op: "rdma connect", addr, source: std::io::Error::other(why) });
                    }
                    Control::Closed(c, _, reason) if *c == conn => {
                        let why = reason.to_string();
                        self.control.0.remove(i);
                        self.dialling.remove(&conn);
                        return Err(TransportError::Io { op: "rdma connect", addr, source: std::io::Error::other(why) });
                    }
                    _ => i += 1,
                }
            }
            if std::time::Instant::now() > deadline {
                self.dialling.remove(&conn);
                self.tcp.close(conn, CloseReason::Local, &mut ControlEvents::default());
                return Err(TransportError::Io { op: "rdma connect", addr, source: std::io::Error::new(std::io::ErrorKind::TimedOut, "no queue pair endpoint from the peer") });
            }
        }
    }

    fn outbox(&mut self, conn: ConnId) -> Result<&mut Vec<u8>, TransportError> {
        self.conns.get_mut(&conn).map(|c| &mut c.outbox).ok_or(TransportError::Closed(conn))
    }

    fn flush<H: Handler>(&mut self, handler: &mut H) {
        self.send_all(handler);
    }

    fn poll<H: Handler>(&mut self, timeout: Option<Duration>, handler: &mut H) -> Result<usize, TransportError> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            self.send_all(handler);
            self.tcp_poll()?;
            self.control(handler);
            let took = self.completions(handler);
            let delivered = self.deliver(handler);
            self.send_all(handler);
            if delivered > 0 || deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                return Ok(delivered);
            }
            if took == 0 {
                std::hint::spin_loop();
            }
        }
    }

    fn close<H: Handler>(&mut self, conn: ConnId, reason: CloseReason, handler: &mut H) {
        self.close_conn(conn, reason, handler);
    }

    fn peer(&self, conn: ConnId) -> Option<SocketAddr> {
        self.conns.get(&conn).map(|c| c.peer)
    }

    fn connections_open(&self) -> usize {
        self.conns.len()
    }
}
