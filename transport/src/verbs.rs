//! Raw verbs (feature `rdma`), on `ibverbs-sys`, the FFI layer of the `ibverbs` crate,
//! for what that crate does not offer: queue pairs created with inline capacity, and
//! sends that are inline and signalled only now and then (its `post_send` signals every
//! send and never inlines; its raw pointers are private, so nothing can be added on
//! top of its types). The transport's queue pairs, registered regions, completion queue
//! and polling are all here; `rdma.rs` keeps the crate for the device probe and the
//! bare loopback path.
//!
//! Objects live as the rules of verbs require: a queue pair is destroyed before the
//! region it uses is deregistered (`RConn` drops its `Qp` first), and the device context,
//! protection domain and completion queue live as long as the process.

use std::io;
use std::ptr;

use ibverbs::QueuePairEndpoint;
use ibverbs_sys as ffi;

/// The port every queue pair uses.
const PORT_NUM: u8 = 1;
/// GID 1 is the IPv4-mapped RoCE v2 address of a soft-RoCE port (0 also works there).
const GID_INDEX: u8 = 1;

/// An open device with the protection domain and completion queue of one transport.
pub struct Device {
    ctx: *mut ffi::ibv_context,
    pd: *mut ffi::ibv_pd,
    /// Where the completion queue says, once armed, that a completion came: a
    /// non-blocking file descriptor an idle loop can sleep on in epoll.
    channel: *mut ffi::ibv_comp_channel,
    cq: *mut ffi::ibv_cq,
    lid: u16,
    gid: ffi::ibv_gid,
    mtu: ffi::ibv_mtu,
}

// SAFETY: verbs objects may be used from any thread (libibverbs locks internally). Each
// transport opens a device of its own and is the only holder of the reference `open`
// returns, so its completion queue is polled by one thread at a time.
unsafe impl Send for Device {}
// SAFETY: as above: shared references exist only so the transport can move to its thread.
unsafe impl Sync for Device {}

fn last_error(op: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{op}: {e}"))
}

fn errno(op: &str, code: i32) -> io::Error {
    let e = io::Error::from_raw_os_error(code);
    io::Error::new(e.kind(), format!("{op}: {e}"))
}

impl Device {
    /// Opens the first device, with a completion queue of `cq_entries`. Lives for the
    /// process (leaked), like the queue pairs' need for it.
    pub fn open(cq_entries: usize) -> io::Result<&'static Device> {
        let mut n = 0i32;
        // SAFETY: `n` is a valid out-pointer; the list is freed below after the device
        // we use has been opened (opening keeps it valid).
        let list = unsafe { ffi::ibv_get_device_list(&mut n) };
        if list.is_null() {
            return Err(last_error("listing devices"));
        }
        let result = (|| {
            if n <= 0 {
                return Err(io::Error::new(io::ErrorKind::NotFound, "no device listed"));
            }
            // SAFETY: the list holds `n` > 0 device pointers.
            let dev = unsafe { *list };
            // SAFETY: a device from the live list.
            let ctx = unsafe { ffi::ibv_open_device(dev) };
            if ctx.is_null() {
                return Err(last_error("open device"));
            }
            let mut port = ffi::ibv_port_attr::default();
            // SAFETY: `ctx` is open; `port` is a valid out-struct (the compat type is the
            // same layout, as the `ibverbs` crate also relies on).
            let rc = unsafe { ffi::ibv_query_port(ctx, PORT_NUM, &mut port as *mut ffi::ibv_port_attr as *mut _) };
            if rc != 0 {
                return Err(errno("query port", rc));
            }
            let mut gid = ffi::ibv_gid::default();
            // SAFETY: `ctx` is open; `gid` is a valid out-struct.
            let rc = unsafe { ffi::ibv_query_gid(ctx, PORT_NUM, GID_INDEX as i32, &mut gid) };
            if rc != 0 {
                return Err(errno("query gid", rc));
            }
            // SAFETY: `ctx` is open.
            let pd = unsafe { ffi::ibv_alloc_pd(ctx) };
            if pd.is_null() {
                return Err(last_error("alloc pd"));
            }
            // SAFETY: `ctx` is open.
            let channel = unsafe { ffi::ibv_create_comp_channel(ctx) };
            if channel.is_null() {
                return Err(last_error("create completion channel"));
            }
            // SAFETY: the channel's descriptor is open; only its status flags change.
            let rc = unsafe {
                let fd = (*channel).fd;
                libc::fcntl(fd, libc::F_SETFL, libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK)
            };
            if rc < 0 {
                return Err(last_error("make the completion channel non-blocking"));
            }
            // SAFETY: `ctx` and `channel` are open; no context pointer.
            let cq = unsafe { ffi::ibv_create_cq(ctx, cq_entries as i32, ptr::null_mut(), channel, 0) };
            if cq.is_null() {
                return Err(last_error("create cq"));
            }
            Ok(Device { ctx, pd, channel, cq, lid: port.lid, gid, mtu: port.active_mtu })
        })();
        // SAFETY: the list came from `ibv_get_device_list`; the opened context stays valid.
        unsafe { ffi::ibv_free_device_list(list) };
        Ok(Box::leak(Box::new(result?)))
    }

    /// The completion channel's descriptor: readable once a completion came after `arm`.
    pub fn wake_fd(&self) -> std::os::fd::RawFd {
        // SAFETY: the channel lives as long as the process.
        unsafe { (*self.channel).fd }
    }

    /// Asks for one event on the channel at the next completion. Poll the queue once
    /// more after arming: a completion that came just before is not announced.
    pub fn arm(&self) -> io::Result<()> {
        // SAFETY: the completion queue is alive; `req_notify_cq` is the provider's entry
        // point, as `ibv_req_notify_cq` itself calls it.
        let rc = unsafe {
            let ops = &mut (*self.ctx).ops;
            ops.req_notify_cq.as_mut().expect("every provider notifies")(self.cq, 0)
        };
        if rc != 0 {
            return Err(errno("arm cq", rc));
        }
        Ok(())
    }

    /// Takes and acknowledges every event waiting on the channel (it is non-blocking:
    /// none waiting ends at once). Returns how many there were.
    pub fn drain_events(&self) -> usize {
        let mut n = 0u32;
        loop {
            let mut cq: *mut ffi::ibv_cq = ptr::null_mut();
            let mut ctx: *mut std::os::raw::c_void = ptr::null_mut();
            // SAFETY: the channel is alive and non-blocking; both out-pointers are valid.
            if unsafe { ffi::ibv_get_cq_event(self.channel, &mut cq, &mut ctx) } != 0 {
                break;
            }
            n += 1;
        }
        if n > 0 {
            // SAFETY: `n` events of this queue (the channel's only one) were taken above.
            unsafe { ffi::ibv_ack_cq_events(self.cq, n) };
        }
        n as usize
    }

    /// Takes up to `out.len()` completions; returns how many.
    pub fn poll(&self, out: &mut [ffi::ibv_wc]) -> io::Result<usize> {
        // SAFETY: the completion queue is alive (process lifetime) and its context's
        // `poll_cq` is the provider's entry point, as `ibv_poll_cq` itself calls it; `out`
        // has room for `out.len()` entries.
        let n = unsafe {
            let ops = &mut (*self.ctx).ops;
            ops.poll_cq.as_mut().expect("every provider polls")(self.cq, out.len() as i32, out.as_mut_ptr())
        };
        if n < 0 {
            return Err(io::Error::other("ibv_poll_cq failed"));
        }
        Ok(n as usize)
    }
}

/// A completion status as libibverbs names it ("transport retry counter exceeded").
pub fn status_name(status: ffi::ibv_wc_status::Type) -> String {
    // SAFETY: `ibv_wc_status_str` returns a static NUL-terminated string for any value.
    let name = unsafe { std::ffi::CStr::from_ptr(ffi::ibv_wc_status_str(status)) };
    format!("{} (status {status})", name.to_string_lossy())
}

/// A registered buffer.
pub struct Region {
    mr: *mut ffi::ibv_mr,
    buf: Box<[u8]>,
}

// SAFETY: as for `Device`.
unsafe impl Send for Region {}

impl Region {
    pub fn new(device: &Device, len: usize) -> io::Result<Region> {
        let mut buf = vec![0u8; len].into_boxed_slice();
        // SAFETY: the buffer outlives the registration (deregistered in `drop`, before
        // the box is freed) and never moves (a boxed slice's heap memory stays put).
        let mr = unsafe {
            ffi::ibv_reg_mr(device.pd, buf.as_mut_ptr() as *mut _, len, ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0 as i32)
        };
        if mr.is_null() {
            return Err(last_error("register memory"));
        }
        Ok(Region { mr, buf })
    }

    fn lkey(&self) -> u32 {
        // SAFETY: `mr` is registered for as long as `self` lives.
        unsafe { (*self.mr).lkey }
    }
}

impl std::ops::Deref for Region {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf
    }
}

impl std::ops::DerefMut for Region {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: registered in `new`, deregistered once; the queue pairs that used it
        // are destroyed first (see the module comment).
        unsafe { ffi::ibv_dereg_mr(self.mr) };
    }
}

/// A reliable-connected queue pair on a `Device`'s completion queue.
pub struct Qp {
    qp: *mut ffi::ibv_qp,
    /// Bytes a send may carry inline (copied into the work request at post time).
    pub inline_max: usize,
}

// SAFETY: as for `Device`.
unsafe impl Send for Qp {}

impl Qp {
    /// A queue pair in the RESET state, with room for `send_wr` sends and `recv_wr`
    /// receives outstanding and, where the device allows, `inline` bytes inline. Sends
    /// are signalled only when asked (`sq_sig_all` 0).
    pub fn create(device: &Device, send_wr: usize, recv_wr: usize, inline: usize) -> io::Result<Qp> {
        let mut attr = ffi::ibv_qp_init_attr {
            qp_context: ptr::null_mut(),
            send_cq: device.cq,
            recv_cq: device.cq,
            srq: ptr::null_mut(),
            cap: ffi::ibv_qp_cap {
                max_send_wr: send_wr as u32,
                max_recv_wr: recv_wr as u32,
                max_send_sge: 1,
                max_recv_sge: 1,
                max_inline_data: inline as u32,
            },
            qp_type: ffi::ibv_qp_type::IBV_QPT_RC,
            sq_sig_all: 0,
        };
        // SAFETY: the protection domain and completion queue are alive; `attr` is valid
        // and receives the capacities granted.
        let qp = unsafe { ffi::ibv_create_qp(device.pd, &mut attr) };
        if qp.is_null() {
            return Err(last_error("create qp"));
        }
        Ok(Qp { qp, inline_max: attr.cap.max_inline_data as usize })
    }

    /// What the peer needs to connect to this queue pair.
    pub fn endpoint(&self, device: &Device) -> QueuePairEndpoint {
        // SAFETY: `qp` is alive.
        let num = unsafe { (*self.qp).qp_num };
        QueuePairEndpoint { num, lid: device.lid, gid: Some(device.gid.into()) }
    }

    /// Connects to `remote`: INIT, then ready to receive, then ready to send.
    pub fn connect(&mut self, device: &Device, remote: &QueuePairEndpoint) -> io::Result<()> {
        use ffi::ibv_qp_attr_mask as M;
        let mut attr = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_INIT,
            pkey_index: 0,
            port_num: PORT_NUM,
            qp_access_flags: ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0,
            ..Default::default()
        };
        self.modify(&mut attr, M::IBV_QP_STATE | M::IBV_QP_PKEY_INDEX | M::IBV_QP_PORT | M::IBV_QP_ACCESS_FLAGS, "qp to init")?;
        let mut attr = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_RTR,
            path_mtu: device.mtu,
            dest_qp_num: remote.num,
            rq_psn: 0,
            max_dest_rd_atomic: 1,
            min_rnr_timer: 12,
            ah_attr: ffi::ibv_ah_attr { dlid: remote.lid, sl: 0, src_path_bits: 0, port_num: PORT_NUM, ..Default::default() },
            ..Default::default()
        };
        if let Some(gid) = remote.gid {
            attr.ah_attr.is_global = 1;
            attr.ah_attr.grh.dgid = gid.into();
            attr.ah_attr.grh.hop_limit = 0xff;
            attr.ah_attr.grh.sgid_index = GID_INDEX;
        }
        let rtr = M::IBV_QP_STATE
            | M::IBV_QP_AV
            | M::IBV_QP_PATH_MTU
            | M::IBV_QP_DEST_QPN
            | M::IBV_QP_RQ_PSN
            | M::IBV_QP_MAX_DEST_RD_ATOMIC
            | M::IBV_QP_MIN_RNR_TIMER;
        self.modify(&mut attr, rtr, "qp to ready-to-receive")?;
        let mut attr = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_RTS,
            sq_psn: 0,
            timeout: 14,
            retry_cnt: 7,
            // The receiver keeps its ring full and the sender stays within its credits, so
            // "receiver not ready" should never happen; if it does, retry for ever.
            rnr_retry: 7,
            max_rd_atomic: 1,
            ..Default::default()
        };
        let rts = M::IBV_QP_STATE | M::IBV_QP_SQ_PSN | M::IBV_QP_TIMEOUT | M::IBV_QP_RETRY_CNT | M::IBV_QP_RNR_RETRY | M::IBV_QP_MAX_QP_RD_ATOMIC;
        self.modify(&mut attr, rts, "qp to ready-to-send")
    }

    /// Moves the queue pair to the error state: what a broken peer's looks like to the
    /// other side (its sends go unanswered until they fail).
    pub fn set_error(&mut self) -> io::Result<()> {
        let mut attr = ffi::ibv_qp_attr { qp_state: ffi::ibv_qp_state::IBV_QPS_ERR, ..Default::default() };
        self.modify(&mut attr, ffi::ibv_qp_attr_mask::IBV_QP_STATE, "qp to error")
    }

    fn modify(&mut self, attr: &mut ffi::ibv_qp_attr, mask: ffi::ibv_qp_attr_mask, op: &str) -> io::Result<()> {
        // SAFETY: `qp` is alive and `attr` is valid for the attributes `mask` names.
        let rc = unsafe { ffi::ibv_modify_qp(self.qp, attr, mask.0 as i32) };
        if rc != 0 {
            return Err(errno(op, rc));
        }
        Ok(())
    }

    /// Posts a send of `region[range]`, inline when it fits (`inline_max`), with a
    /// completion only when `signaled`.
    ///
    /// # Safety
    /// A send that is not inline reads `region[range]` until a completion covers it (its
    /// own, or that of a later signalled send on this queue pair): the caller must not
    /// write those bytes or free the region before then.
    pub unsafe fn post_send(&mut self, region: &Region, range: std::ops::Range<usize>, wr_id: u64, signaled: bool) -> io::Result<()> {
        let bytes = &region.buf[range];
        let mut sge = ffi::ibv_sge { addr: bytes.as_ptr() as u64, length: bytes.len() as u32, lkey: region.lkey() };
        let mut flags = 0;
        if signaled {
            flags |= ffi::ibv_send_flags::IBV_SEND_SIGNALED.0;
        }
        if bytes.len() <= self.inline_max {
            flags |= ffi::ibv_send_flags::IBV_SEND_INLINE.0;
        }
        let mut wr = ffi::ibv_send_wr {
            wr_id,
            next: ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: 1,
            opcode: ffi::ibv_wr_opcode::IBV_WR_SEND,
            send_flags: flags,
            ..Default::default()
        };
        let mut bad: *mut ffi::ibv_send_wr = ptr::null_mut();
        // SAFETY: `qp` is alive; `wr` and `sge` are valid for the call (an inline send is
        // copied during it); the buffer's lifetime is the caller's promise above.
        let rc = unsafe {
            let ops = &mut (*(*self.qp).context).ops;
            ops.post_send.as_mut().expect("every provider posts sends")(self.qp, &mut wr, &mut bad)
        };
        if rc != 0 {
            return Err(errno("post send", rc));
        }
        Ok(())
    }

    /// Posts a receive into `region[range]`.
    ///
    /// # Safety
    /// The device writes `region[range]` until this receive's completion is taken: the
    /// caller must not read or write those bytes, or free the region, before then.
    pub unsafe fn post_recv(&mut self, region: &mut Region, range: std::ops::Range<usize>, wr_id: u64) -> io::Result<()> {
        let lkey = region.lkey();
        let bytes = &mut region.buf[range];
        let mut sge = ffi::ibv_sge { addr: bytes.as_mut_ptr() as u64, length: bytes.len() as u32, lkey };
        let mut wr = ffi::ibv_recv_wr { wr_id, next: ptr::null_mut(), sg_list: &mut sge, num_sge: 1 };
        let mut bad: *mut ffi::ibv_recv_wr = ptr::null_mut();
        // SAFETY: `qp` is alive; `wr` and `sge` are valid for the call; the buffer's
        // lifetime is the caller's promise above.
        let rc = unsafe {
            let ops = &mut (*(*self.qp).context).ops;
            ops.post_recv.as_mut().expect("every provider posts receives")(self.qp, &mut wr, &mut bad)
        };
        if rc != 0 {
            return Err(errno("post receive", rc));
        }
        Ok(())
    }
}

impl Drop for Qp {
    fn drop(&mut self) {
        // SAFETY: created in `create`, destroyed once, before the regions it used.
        unsafe { ffi::ibv_destroy_qp(self.qp) };
    }
}
