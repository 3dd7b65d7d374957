//! TCP transport: non-blocking sockets on epoll (through mio), TCP_NODELAY, one
//! receive buffer and one send buffer per connection reused for its whole life, so the
//! steady state allocates nothing per request.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

use crate::auth::{self, AuthError, ClientHandshake, Secret, ServerHandshake};
use crate::{CloseReason, ConnId, Framing, Handler, Transport, TransportError};

const LISTENER: Token = Token(usize::MAX);
/// Descriptors watched for another transport (`watch_fd`): an event only wakes `poll`.
const WATCHED: Token = Token(usize::MAX - 1);

#[derive(Clone, Debug)]
pub struct TcpConfig {
    /// Size of each `read` into a connection's receive buffer.
    pub read_chunk_bytes: usize,
    /// Reads on one connection per poll round before others get a turn.
    pub reads_per_round_max: usize,
    /// Queued reply bytes past which a connection's input is no longer read; twice
    /// this closes it (a peer that sends but never reads).
    pub outbox_bytes_max: usize,
    /// Open connections past which new ones are refused.
    pub connections_max: usize,
    /// Events taken from epoll per poll.
    pub events_max: usize,
    /// The cluster's secret: every connection, accepted or opened, proves it before
    /// its first frame (`auth`). `None`: connections are open to anyone.
    pub secret: Option<Arc<Secret>>,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            read_chunk_bytes: 64 << 10,
            reads_per_round_max: 16,
            outbox_bytes_max: 32 << 20,
            connections_max: 4096,
            events_max: 256,
            secret: None,
        }
    }
}

struct Conn {
    stream: TcpStream,
    peer: SocketAddr,
    /// Received bytes live in `rbuf[rstart..rend]`.
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    /// Bytes to send live in `wbuf[wpos..]`.
    wbuf: Vec<u8>,
    wpos: usize,
    /// In `TcpTransport::dirty`.
    dirty: bool,
    /// In `TcpTransport::unread`: input may be waiting in the socket or the buffer.
    unread: bool,
    /// Input left unread until the queued replies drain.
    paused: bool,
    auth: ConnAuth,
}

/// Where a connection is in its handshake.
#[derive(Debug)]
enum ConnAuth {
    Done,
    /// Accepted: its `Hello` went out; no frame is taken before the client's proof.
    AwaitProof(ServerHandshake),
    /// Opened: nothing is written until the server's `Hello` has been answered (the
    /// proof goes out first, then the frames queued meanwhile).
    AwaitHello,
    /// Opened, proof queued at the head of the output: only those `proof_unsent` bytes
    /// may leave before the server's verdict has proved the server a member; the
    /// frames queued behind them wait for it.
    AwaitVerdict { handshake: ClientHandshake, proof_unsent: usize },
    /// Opened by a process without a secret: an authenticating peer's `Hello` (instead
    /// of a frame) is refused with the reason, not taken for a malformed frame.
    WatchForHello,
}

impl Conn {
    fn queued_bytes(&self) -> usize {
        self.wbuf.len() - self.wpos
    }
}

struct Slot {
    generation: u32,
    conn: Option<Conn>,
}

/// One per brick core or per client thread; never shared between threads.
pub struct TcpTransport<F: Framing> {
    framing: F,
    config: TcpConfig,
    poll: Poll,
    events: Events,
    /// (slot or LISTENER, readable, writable) of the last poll, reused.
    ready: Vec<(Token, Readable, bool)>,
    listener: Option<TcpListener>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    open: usize,
    /// Slots with bytes queued to send.
    dirty: Vec<u32>,
    /// Slots whose input was not read to the end last round (fairness bound, or paused
    /// because their replies were not being read).
    unread: Vec<u32>,
    /// Connections in their handshake, by deadline (`auth::HANDSHAKE_TIMEOUT`): one
    /// that has not finished by then is closed, so strangers cannot hold slots.
    handshakes: VecDeque<(Instant, ConnId)>,
    /// A watched descriptor became readable since `take_woken`.
    woken: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Readable {
    No,
    Data,
    /// The peer closed or the socket failed: read to the end.
    Closing,
}

enum ReadOutcome {
    /// The socket said WouldBlock: epoll reports the next input.
    Drained,
    /// The round's read bound was hit: read again next round.
    MoreToRead,
    /// Replies are piling up: read again once they drain.
    Paused,
}

impl<F: Framing> TcpTransport<F> {
    pub fn new(framing: F, config: TcpConfig) -> Result<Self, TransportError> {
        assert!(config.read_chunk_bytes >= 1024 && config.reads_per_round_max > 0 && config.events_max > 0);
        Ok(TcpTransport {
            framing,
            poll: Poll::new().map_err(TransportError::Poll)?,
            events: Events::with_capacity(config.events_max),
            ready: Vec::with_capacity(config.events_max),
            config,
            listener: None,
            slots: Vec::new(),
            free: Vec::new(),
            open: 0,
            dirty: Vec::new(),
            unread: Vec::new(),
            handshakes: VecDeque::new(),
            woken: false,
        })
    }

    /// Wakes `poll` when `fd` becomes readable (an RDMA completion channel, another
    /// transport's epoll); nothing is read from it here.
    pub fn watch_fd(&mut self, fd: std::os::fd::RawFd) -> Result<(), TransportError> {
        self.poll.registry().register(&mut mio::unix::SourceFd(&fd), WATCHED, Interest::READABLE).map_err(TransportError::Poll)
    }

    /// The secret every connection proves (`TcpConfig::secret`).
    pub fn secret(&self) -> Option<&Arc<Secret>> {
        self.config.secret.as_ref()
    }

    /// Whether a watched descriptor woke `poll` since the last call.
    pub fn take_woken(&mut self) -> bool {
        std::mem::take(&mut self.woken)
    }

    /// This transport's epoll descriptor: readable when it has events, so another
    /// transport's loop can watch it (`watch_fd`).
    pub fn poll_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.poll.as_raw_fd()
    }

    fn conn_mut(&mut self, id: ConnId) -> Option<&mut Conn> {
        let slot = self.slots.get_mut(id.slot as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        slot.conn.as_mut()
    }

    fn id_of(&self, slot: u32) -> ConnId {
        ConnId { slot, generation: self.slots[slot as usize].generation }
    }

    fn register(&mut self, mut stream: TcpStream, peer: SocketAddr, auth: ConnAuth, hello: &[u8]) -> io::Result<ConnId> {
        stream.set_nodelay(true)?;
        let in_handshake = matches!(auth, ConnAuth::AwaitProof(_) | ConnAuth::AwaitHello);
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.slots.push(Slot { generation: 0, conn: None });
                u32::try_from(self.slots.len() - 1).expect("connection slots fit u32")
            }
        };
        if let Err(e) = self.poll.registry().register(&mut stream, Token(slot as usize), Interest::READABLE | Interest::WRITABLE) {
            self.free.push(slot);
            return Err(e);
        }
        let s = &mut self.slots[slot as usize];
        assert!(s.conn.is_none(), "slot {slot} handed out twice");
        s.conn = Some(Conn {
            stream,
            peer,
            rbuf: vec![0; self.config.read_chunk_bytes],
            rstart: 0,
            rend: 0,
            wbuf: hello.to_vec(),
            wpos: 0,
            dirty: !hello.is_empty(),
            unread: true,
            paused: false,
            auth,
        });
        self.open += 1;
        if !hello.is_empty() {
            self.dirty.push(slot);
        }
        let id = ConnId { slot, generation: s.generation };
        if in_handshake {
            self.handshakes.push_back((Instant::now() + auth::HANDSHAKE_TIMEOUT, id));
        }
        // Data may have arrived before registration; edge-triggered epoll would not
        // report it, so read it on the next round.
        self.unread.push(slot);
        Ok(id)
    }

    fn close_slot<H: Handler>(&mut self, slot: u32, reason: CloseReason, handler: &mut H) {
        let id = self.id_of(slot);
        let Some(mut conn) = self.slots[slot as usize].conn.take() else { return };
        let _ = self.poll.registry().deregister(&mut conn.stream);
        let s = &mut self.slots[slot as usize];
        s.generation = s.generation.wrapping_add(1);
        self.free.push(slot);
        self.open -= 1;
        handler.on_close(id, conn.peer, &reason);
    }

    fn accept_all<H: Handler>(&mut self, handler: &mut H) {
        loop {
            let Some(listener) = self.listener.as_ref() else { return };
            match listener.accept() {
                Ok((stream, peer)) => {
                    if self.open >= self.config.connections_max {
                        handler.on_refused(peer, self.open);
                        drop(stream);
                        continue;
                    }
                    let mut hello = Vec::new();
                    let auth = match &self.config.secret {
                        None => ConnAuth::Done,
                        Some(secret) => match ServerHandshake::start(secret, &mut hello) {
                            Ok(h) => ConnAuth::AwaitProof(h),
                            Err(_) => {
                                handler.on_refused(peer, self.open);
                                continue;
                            }
                        },
                    };
                    match self.register(stream, peer, auth, &hello) {
                        Ok(id) => handler.on_accept(id, peer),
                        Err(_) => handler.on_refused(peer, self.open),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // Per-connection failures (the peer reset before accept, fd limits):
                // try again on the next readiness event rather than spin here.
                Err(_) => return,
            }
        }
    }

    /// Delivers whole frames, then reads, up to the round's bound. With `short_read_drains`
    /// a read that fills less than the space offered counts as having drained the socket:
    /// under edge-triggered epoll, bytes that arrive later raise a new event, so the read
    /// that would only say WouldBlock is saved. Not when the peer has closed (its FIN
    /// raises no further event) nor for connections read outside an event.
    fn service_read<H: Handler>(
        &mut self,
        slot: u32,
        short_read_drains: bool,
        handler: &mut H,
    ) -> Result<(usize, ReadOutcome), CloseReason> {
        let id = self.id_of(slot);
        let chunk = self.config.read_chunk_bytes;
        let outbox_max = self.config.outbox_bytes_max;
        let reads_max = self.config.reads_per_round_max;
        let framing = &self.framing;
        let secret = self.config.secret.as_deref();
        let conn = self.slots[slot as usize].conn.as_mut().expect("service_read on an open slot");
        let mut delivered = 0;
        let mut reads = 0;
        let mut drained = false;
        loop {
            // Deliver every whole frame already buffered.
            loop {
                if conn.queued_bytes() > outbox_max && matches!(conn.auth, ConnAuth::Done | ConnAuth::WatchForHello) {
                    // The peer is not reading its replies: stop reading its requests
                    // until the replies drain (the write path puts it back in `unread`).
                    // Not during a handshake, whose bytes must be read for anything to
                    // leave.
                    return Ok((delivered, ReadOutcome::Paused));
                }
                let buffered = &conn.rbuf[conn.rstart..conn.rend];
                if !matches!(conn.auth, ConnAuth::Done) {
                    match authenticate(conn, secret)? {
                        Some(()) => continue,
                        None => break,
                    }
                }
                match framing.frame_len(buffered).map_err(CloseReason::Malformed)? {
                    Some(len) if len <= buffered.len() => {
                        let frame = &conn.rbuf[conn.rstart..conn.rstart + len];
                        handler.on_frame(id, frame, &mut conn.wbuf).map_err(CloseReason::Refused)?;
                        conn.rstart += len;
                        delivered += 1;
                    }
                    Some(len) => {
                        // Make room for the whole frame once, then read into it.
                        if conn.rbuf.len() - conn.rstart < len {
                            conn.rbuf.copy_within(conn.rstart..conn.rend, 0);
                            conn.rend -= conn.rstart;
                            conn.rstart = 0;
                            if conn.rbuf.len() < len {
                                conn.rbuf.resize(len, 0);
                            }
                        }
                        break;
                    }
                    None => break,
                }
            }
            if drained {
                return Ok((delivered, ReadOutcome::Drained));
            }
            if conn.rstart == conn.rend {
                conn.rstart = 0;
                conn.rend = 0;
                if conn.rbuf.len() > 4 * chunk {
                    // A large frame went by; give its memory back.
                    conn.rbuf.truncate(chunk);
                    conn.rbuf.shrink_to_fit();
                }
            } else if conn.rbuf.len() - conn.rend < chunk / 4 {
                conn.rbuf.copy_within(conn.rstart..conn.rend, 0);
                conn.rend -= conn.rstart;
                conn.rstart = 0;
            }
            if conn.rend == conn.rbuf.len() {
                conn.rbuf.resize(conn.rbuf.len() + chunk, 0);
            }
            if reads == reads_max {
                return Ok((delivered, ReadOutcome::MoreToRead));
            }
            reads += 1;
            let space = conn.rbuf.len() - conn.rend;
            match conn.stream.read(&mut conn.rbuf[conn.rend..]) {
                Ok(0) => {
                    let buffered_bytes = conn.rend - conn.rstart;
                    return Err(if buffered_bytes == 0 {
                        CloseReason::PeerClosed
                    } else {
                        CloseReason::PeerClosedMidFrame { buffered_bytes }
                    });
                }
                Ok(n) => {
                    conn.rend += n;
                    drained = short_read_drains && n < space;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((delivered, ReadOutcome::Drained)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(CloseReason::Io(e)),
            }
        }
    }

    fn read_slot<H: Handler>(&mut self, slot: u32, short_read_drains: bool, handler: &mut H) -> usize {
        let delivered = match self.service_read(slot, short_read_drains, handler) {
            Ok((n, ReadOutcome::Drained)) => n,
            Ok((n, ReadOutcome::MoreToRead)) => {
                let conn = self.slots[slot as usize].conn.as_mut().expect("open");
                if !conn.unread {
                    conn.unread = true;
                    self.unread.push(slot);
                }
                n
            }
            Ok((n, ReadOutcome::Paused)) => {
                self.slots[slot as usize].conn.as_mut().expect("open").paused = true;
                n
            }
            Err(reason) => {
                self.close_slot(slot, reason, handler);
                return 0;
            }
        };
        let conn = self.slots[slot as usize].conn.as_mut().expect("open");
        if conn.queued_bytes() > 0 && !conn.dirty {
            conn.dirty = true;
            self.dirty.push(slot);
        }
        delivered
    }

    /// Writes as much of `slot`'s queue as the socket takes.
    fn service_write<H: Handler>(&mut self, slot: u32, handler: &mut H) {
        let outbox_max = self.config.outbox_bytes_max;
        let Some(conn) = self.slots[slot as usize].conn.as_mut() else { return };
        // An opened connection's frames wait until the server has proved itself: only
        // the proof leaves before (the connection stays dirty meanwhile).
        let writable_end = |conn: &Conn| match &conn.auth {
            ConnAuth::AwaitHello => conn.wpos,
            ConnAuth::AwaitVerdict { proof_unsent, .. } => conn.wpos + proof_unsent,
            _ => conn.wbuf.len(),
        };
        let mut failure = None;
        while conn.wpos < writable_end(conn) {
            match conn.stream.write(&conn.wbuf[conn.wpos..writable_end(conn)]) {
                Ok(0) => {
                    failure = Some(CloseReason::Io(io::ErrorKind::WriteZero.into()));
                    break;
                }
                Ok(n) => {
                    conn.wpos += n;
                    if let ConnAuth::AwaitVerdict { proof_unsent, .. } = &mut conn.auth {
                        *proof_unsent -= n;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    failure = Some(CloseReason::Io(e));
                    break;
                }
            }
        }
        if failure.is_none() && conn.queued_bytes() > 2 * outbox_max {
            failure = Some(CloseReason::OutboxFull { bytes: conn.queued_bytes() });
        }
        if let Some(reason) = failure {
            self.close_slot(slot, reason, handler);
            return;
        }
        if conn.wpos == conn.wbuf.len() {
            conn.wbuf.clear();
            conn.wpos = 0;
            if conn.wbuf.capacity() > 4 * self.config.read_chunk_bytes {
                conn.wbuf.shrink_to(self.config.read_chunk_bytes);
            }
            conn.dirty = false;
            // Input paused behind a full outbox can go on.
            if conn.paused && !conn.unread {
                conn.paused = false;
                conn.unread = true;
                self.unread.push(slot);
            }
        } else if conn.wpos > outbox_max {
            // Keep the buffer from growing without end while the peer reads slowly.
            conn.wbuf.drain(..conn.wpos);
            conn.wpos = 0;
        }
    }

    /// Closes the connections whose handshake ran past its deadline.
    fn expire_handshakes<H: Handler>(&mut self, handler: &mut H) {
        if self.handshakes.is_empty() {
            return;
        }
        let now = Instant::now();
        while let Some(&(_, id)) = self.handshakes.front().filter(|(deadline, _)| *deadline <= now) {
            self.handshakes.pop_front();
            let waiting = self.conn_mut(id).is_some_and(|c| !matches!(c.auth, ConnAuth::Done | ConnAuth::WatchForHello));
            if waiting {
                self.close_slot(id.slot, CloseReason::Unauthenticated(AuthError::Silent), handler);
            }
        }
    }

    fn flush_dirty<H: Handler>(&mut self, handler: &mut H) {
        // Slots that stay dirty (socket full) are re-queued when epoll says writable.
        let mut dirty = std::mem::take(&mut self.dirty);
        for &slot in &dirty {
            if let Some(conn) = self.slots[slot as usize].conn.as_mut() {
                conn.dirty = false;
            }
            self.service_write(slot, handler);
            if let Some(conn) = self.slots[slot as usize].conn.as_mut() {
                if conn.queued_bytes() > 0 {
                    conn.dirty = true;
                }
            }
        }
        dirty.retain(|&slot| self.slots[slot as usize].conn.as_ref().is_some_and(|c| c.dirty));
        dirty.append(&mut self.dirty);
        self.dirty = dirty;
    }
}

impl<F: Framing> Transport for TcpTransport<F> {
    fn listen(&mut self, addr: SocketAddr) -> Result<SocketAddr, TransportError> {
        assert!(self.listener.is_none(), "one listener per transport");
        let mut listener = TcpListener::bind(addr).map_err(|source| TransportError::Io { op: "listen", addr, source })?;
        self.poll
            .registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(|source| TransportError::Io { op: "listen", addr, source })?;
        let bound = listener.local_addr().map_err(|source| TransportError::Io { op: "listen", addr, source })?;
        self.listener = Some(listener);
        Ok(bound)
    }

    fn connect(&mut self, addr: SocketAddr, timeout: Duration) -> Result<ConnId, TransportError> {
        let io_err = |source| TransportError::Io { op: "connect", addr, source };
        let stream = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(io_err)?;
        // The handshake runs in `poll`, not here: a brick core that connects to a peer
        // core must not wait for that core, which may be connecting to it. A refusal
        // closes the connection with `CloseReason::Unauthenticated`.
        let auth = if self.config.secret.is_some() { ConnAuth::AwaitHello } else { ConnAuth::WatchForHello };
        stream.set_nonblocking(true).map_err(io_err)?;
        self.register(TcpStream::from_std(stream), addr, auth, &[]).map_err(io_err)
    }

    fn outbox(&mut self, conn: ConnId) -> Result<&mut Vec<u8>, TransportError> {
        if self.conn_mut(conn).is_none() {
            return Err(TransportError::Closed(conn));
        }
        let c = self.slots[conn.slot as usize].conn.as_mut().expect("checked");
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(conn.slot);
        }
        Ok(&mut self.slots[conn.slot as usize].conn.as_mut().expect("checked").wbuf)
    }

    fn flush<H: Handler>(&mut self, handler: &mut H) {
        self.flush_dirty(handler);
    }

    fn poll<H: Handler>(&mut self, timeout: Option<Duration>, handler: &mut H) -> Result<usize, TransportError> {
        self.flush_dirty(handler);
        let timeout = if self.unread.is_empty() { timeout } else { Some(Duration::ZERO) };
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(TransportError::Poll(e)),
        }
        self.ready.clear();
        for event in self.events.iter() {
            let closing = event.is_read_closed() || event.is_error();
            let readable = if closing { Readable::Closing } else if event.is_readable() { Readable::Data } else { Readable::No };
            self.ready.push((event.token(), readable, event.is_writable()));
        }
        let mut delivered = 0;
        for i in 0..self.ready.len() {
            let (token, readable, writable) = self.ready[i];
            if token == LISTENER {
                self.accept_all(handler);
                continue;
            }
            if token == WATCHED {
                self.woken = true;
                continue;
            }
            let slot = token.0 as u32;
            if self.slots.get(slot as usize).is_none_or(|s| s.conn.is_none()) {
                continue;
            }
            if writable {
                self.service_write(slot, handler);
            }
            if readable != Readable::No && self.slots[slot as usize].conn.as_ref().is_some_and(|c| !c.unread && !c.paused) {
                delivered += self.read_slot(slot, readable == Readable::Data, handler);
            }
        }
        let unread = std::mem::take(&mut self.unread);
        for &slot in &unread {
            if let Some(conn) = self.slots[slot as usize].conn.as_mut() {
                conn.unread = false;
                delivered += self.read_slot(slot, false, handler);
            }
        }
        self.expire_handshakes(handler);
        self.flush_dirty(handler);
        Ok(delivered)
    }

    fn close<H: Handler>(&mut self, conn: ConnId, reason: CloseReason, handler: &mut H) {
        if self.conn_mut(conn).is_some() {
            self.close_slot(conn.slot, reason, handler);
        }
    }

    fn peer(&self, conn: ConnId) -> Option<SocketAddr> {
        let slot = self.slots.get(conn.slot as usize)?;
        (slot.generation == conn.generation).then_some(())?;
        slot.conn.as_ref().map(|c| c.peer)
    }

    fn connections_open(&self) -> usize {
        self.open
    }
}

/// One step of a connection's handshake on what it has buffered: `Some`: done (the
/// proof, if any, consumed); `None`: more bytes needed. A refusal tells the peer why
/// (best effort: one write on a fresh socket) and closes the connection.
fn authenticate(conn: &mut Conn, secret: Option<&Secret>) -> Result<Option<()>, CloseReason> {
    let buffered = &conn.rbuf[conn.rstart..conn.rend];
    match &conn.auth {
        ConnAuth::Done => Ok(Some(())),
        ConnAuth::WatchForHello => match auth::opens_with_magic(buffered) {
            Some(false) => {
                conn.auth = ConnAuth::Done;
                Ok(Some(()))
            }
            None => Ok(None),
            Some(true) => Err(CloseReason::Unauthenticated(AuthError::NoSecret)),
        },
        ConnAuth::AwaitHello => {
            let secret = secret.expect("a hello is awaited only with a secret");
            if auth::opens_with_magic(buffered) == Some(false) {
                return Err(CloseReason::Unauthenticated(AuthError::PeerUnproven { cluster: secret.cluster_id() }));
            }
            if buffered.len() < auth::HELLO_LEN {
                return Ok(None);
            }
            let mut proof = Vec::with_capacity(auth::PROOF_LEN);
            let handshake = ClientHandshake::on_hello(secret, &buffered[..auth::HELLO_LEN], &mut proof);
            conn.rstart += auth::HELLO_LEN;
            match handshake {
                Ok(handshake) => {
                    // Ahead of the frames queued while the hello was awaited.
                    let proof_unsent = proof.len();
                    conn.wbuf.splice(conn.wpos..conn.wpos, proof);
                    conn.auth = ConnAuth::AwaitVerdict { handshake, proof_unsent };
                    Ok(Some(()))
                }
                Err(e) => {
                    let _ = conn.stream.write_all(&proof);
                    Err(CloseReason::Unauthenticated(e))
                }
            }
        }
        ConnAuth::AwaitVerdict { handshake, .. } => {
            let secret = secret.expect("a verdict is awaited only with a secret");
            if buffered.len() < auth::VERDICT_LEN {
                return Ok(None);
            }
            handshake.on_verdict(secret, &buffered[..auth::VERDICT_LEN]).map_err(CloseReason::Unauthenticated)?;
            conn.rstart += auth::VERDICT_LEN;
            conn.auth = ConnAuth::Done;
            Ok(Some(()))
        }
        ConnAuth::AwaitProof(handshake) => {
            let secret = secret.expect("a proof is awaited only with a secret");
            let mut verdict = Vec::with_capacity(auth::VERDICT_LEN);
            match handshake.on_bytes(secret, buffered, &mut verdict) {
                Ok(None) => Ok(None),
                Ok(Some(len)) => {
                    conn.rstart += len;
                    conn.wbuf.extend_from_slice(&verdict);
                    conn.auth = ConnAuth::Done;
                    Ok(Some(()))
                }
                Err(e) => {
                    // The hello may not have left yet (a peer that spoke at once).
                    let _ = conn.stream.write_all(&conn.wbuf[conn.wpos..]);
                    let _ = conn.stream.write_all(&verdict);
                    Err(CloseReason::Unauthenticated(e))
                }
            }
        }
    }
}
