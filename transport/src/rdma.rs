//! RDMA verbs (feature `rdma`), on the `ibverbs` crate. What is here so far: finding a
//! usable device (the start-up check behind `--transport rdma|auto`, whose failure is
//! the cue to fall back to TCP), and a reliable-connected queue pair carrying frames
//! between two endpoints over pre-registered buffers, with a receive ring kept full and
//! completions busy-polled. The `Transport` implementation over it is the next step
//! (see ARCHITECTURE.md).

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
