//! RDMA verbs tests (feature `rdma`). `ci/rdma.sh` runs them all inside the soft-RoCE VM
//! (`hw/qemu-rxe.sh`), where `rxe0` is a real verbs device, and the probe test alone on
//! the host, where it must fail with a clear reason (the cue to fall back to TCP).
#![cfg(feature = "rdma")]

use std::time::{Duration, Instant};

use dds_transport::rdma::{probe, Loopback, RdmaError, SLOT_BYTES};

/// Set by `ci/rdma.sh` inside the VM: a device must be there.
fn in_vm() -> bool {
    std::env::var_os("DDS_RDMA_EXPECT_DEVICE").is_some()
}

#[test]
fn the_probe_finds_the_device_or_says_why_not() {
    match probe() {
        Ok(device) => {
            println!("rdma device: {}", device.name);
        }
        Err(e) => {
            assert!(!in_vm(), "the VM has rxe0, but: {e}");
            let text = e.to_string();
            assert!(text.starts_with("no usable RDMA device: "), "{text}");
            println!("as expected outside the VM: {text}");
        }
    }
}

#[test]
fn frames_cross_a_reliable_connected_queue_pair_byte_for_byte() {
    let mut lo = Loopback::open().expect("open a loopback queue pair");
    for (i, len) in [1usize, 28, 100, 1500, SLOT_BYTES].into_iter().enumerate() {
        let frame: Vec<u8> = (0..len).map(|j| (i * 31 + j * 7) as u8).collect();
        for from_b in [false, true] {
            let got = lo.transfer(from_b, &frame, Duration::from_secs(5)).expect("transfer");
            assert_eq!(got, frame, "{len} bytes, from {}", if from_b { "b" } else { "a" });
        }
    }
    let too_big = vec![0u8; SLOT_BYTES + 1];
    assert!(matches!(lo.transfer(false, &too_big, Duration::from_secs(1)), Err(RdmaError::TooLarge { .. })));
    // Round trips of a 28-byte frame (a get's header): both directions, one at a time.
    let frame = [7u8; 28];
    let mut rtts: Vec<Duration> = Vec::with_capacity(2000);
    for _ in 0..2000 {
        let t = Instant::now();
        lo.transfer(false, &frame, Duration::from_secs(5)).expect("ping");
        lo.transfer(true, &frame, Duration::from_secs(5)).expect("pong");
        rtts.push(t.elapsed());
    }
    rtts.sort();
    println!(
        "rc loopback, 28-byte frames: 2000 round trips, p50 {:.1} us, p99 {:.1} us",
        rtts[1000].as_secs_f64() * 1e6,
        rtts[1980].as_secs_f64() * 1e6
    );
}

// ---- The RDMA transport against itself: an echo server thread, client transports ----

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

use dds_transport::rdma::{RdmaConfig, RdmaTransport};
use dds_transport::{CloseReason, ConnId, Handler, Transport};

mod common;
use common::{frame, LenPrefix};

/// Echoes each frame; a frame `big:N` is answered with N bytes, `later:MS` with a frame
/// `late` MS milliseconds later.
#[derive(Default)]
struct Echo {
    closed: Vec<String>,
    later: Vec<(ConnId, Instant)>,
}

impl Handler for Echo {
    fn on_frame(&mut self, conn: ConnId, f: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        if let Some(ms) = f.get(4..).and_then(|p| p.strip_prefix(b"later:")) {
            let ms: u64 = std::str::from_utf8(ms).unwrap().parse().unwrap();
            self.later.push((conn, Instant::now() + Duration::from_millis(ms)));
            return Ok(());
        }
        if let Some(n) = f.get(4..).and_then(|p| p.strip_prefix(b"big:")) {
            let n: usize = std::str::from_utf8(n).unwrap().parse().unwrap();
            out.extend_from_slice(&frame(&vec![7u8; n]));
            return Ok(());
        }
        out.extend_from_slice(f);
        Ok(())
    }
    fn on_unauthenticated(&mut self, _peer: SocketAddr, why: &str) {
        self.closed.push(format!("not authenticated: {why}"));
    }
    fn on_close(&mut self, _conn: ConnId, _peer: SocketAddr, reason: &CloseReason) {
        self.closed.push(reason.to_string());
    }
}

/// Collects frames a client receives.
#[derive(Default)]
struct Collect {
    frames: Vec<Vec<u8>>,
    closed: Vec<String>,
}

impl Handler for Collect {
    fn on_frame(&mut self, _conn: ConnId, f: &[u8], _out: &mut Vec<u8>) -> Result<(), String> {
        self.frames.push(f.to_vec());
        Ok(())
    }
    fn on_close(&mut self, _conn: ConnId, _peer: SocketAddr, reason: &CloseReason) {
        self.closed.push(reason.to_string());
    }
}

struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl Server {
    fn start(config: RdmaConfig) -> Server {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let s = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut t = RdmaTransport::new(LenPrefix, config).expect("rdma transport");
            tx.send(t.listen("127.0.0.1:0".parse().unwrap()).unwrap()).unwrap();
            let mut echo = Echo::default();
            while !s.load(Ordering::Relaxed) {
                t.poll(Some(Duration::from_millis(5)), &mut echo).unwrap();
                let now = Instant::now();
                for (conn, _) in echo.later.iter().filter(|(_, due)| *due <= now) {
                    if let Ok(out) = t.outbox(*conn) {
                        out.extend_from_slice(&frame(b"late"));
                    }
                }
                echo.later.retain(|(_, due)| *due > now);
            }
            echo.closed
        });
        Server { addr: rx.recv().unwrap(), stop, thread: Some(thread) }
    }

    /// Stops the server; returns why its connections closed.
    fn stop(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

fn client() -> RdmaTransport<LenPrefix> {
    RdmaTransport::new(LenPrefix, RdmaConfig::default()).expect("rdma transport")
}

/// Sends `frames` on a fresh connection and waits for as many replies.
fn round_trip(t: &mut RdmaTransport<LenPrefix>, conn: ConnId, frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
    for f in frames {
        t.outbox(conn).unwrap().extend_from_slice(f);
    }
    let mut got = Collect::default();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.frames.len() < frames.len() {
        assert!(Instant::now() < deadline, "{} of {} replies", got.frames.len(), frames.len());
        assert!(got.closed.is_empty(), "closed: {:?}", got.closed);
        t.poll(Some(Duration::from_millis(5)), &mut got).unwrap();
    }
    got.frames
}

#[test]
fn frames_of_every_size_echo_over_rdma_byte_for_byte() {
    let server = Server::start(RdmaConfig::default());
    let mut t = client();
    let conn = t.connect(server.addr, Duration::from_secs(2)).expect("connect over rdma");
    let sizes = [0usize, 1, 23, 100, SLOT_BYTES - 8, SLOT_BYTES, SLOT_BYTES + 1, 100_000, 1 << 20];
    let frames: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, &n)| frame(&(0..n).map(|j| (i * 13 + j) as u8).collect::<Vec<u8>>())).collect();
    assert_eq!(round_trip(&mut t, conn, &frames), frames);
    // Many small frames in flight at once: more than the receive ring holds.
    let many: Vec<Vec<u8>> = (0..2000u32).map(|i| frame(&i.to_le_bytes())).collect();
    assert_eq!(round_trip(&mut t, conn, &many), many);
    // Round trips one at a time, for the record.
    let small = vec![frame(&[5u8; 24])];
    let mut rtts = Vec::new();
    for _ in 0..2000 {
        let t0 = Instant::now();
        round_trip(&mut t, conn, &small);
        rtts.push(t0.elapsed());
    }
    rtts.sort();
    println!("rdma transport, 28-byte frames: p50 {:.1} us, p99 {:.1} us round trip", rtts[1000].as_secs_f64() * 1e6, rtts[1980].as_secs_f64() * 1e6);
    // Small frames went inline, and only some sends were signalled.
    let stats = t.send_stats();
    println!("client sends: {stats:?}");
    assert!(stats.inline >= 2000, "the one-at-a-time frames fit inline: {stats:?}");
    assert!(stats.completions > 0 && stats.completions * 2 <= stats.sends, "selective signalling: {stats:?}");
    drop(t);
    server.stop();
}

#[test]
fn a_malformed_frame_closes_that_connection_only() {
    let server = Server::start(RdmaConfig::default());
    let (mut good, mut bad) = (client(), client());
    let g = good.connect(server.addr, Duration::from_secs(2)).unwrap();
    let b = bad.connect(server.addr, Duration::from_secs(2)).unwrap();
    // A header claiming 4 GiB: the server's framing refuses it.
    bad.outbox(b).unwrap().extend_from_slice(&u32::MAX.to_le_bytes());
    let mut seen = Collect::default();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.closed.is_empty() {
        assert!(Instant::now() < deadline, "the bad connection was not closed");
        bad.poll(Some(Duration::from_millis(5)), &mut seen).unwrap();
    }
    println!("bad client saw: {:?}", seen.closed);
    let frames = vec![frame(b"still here")];
    assert_eq!(round_trip(&mut good, g, &frames), frames);
    let reasons = server.stop();
    assert!(reasons.iter().any(|r| r.contains("malformed frame") && r.contains("too long")), "{reasons:?}");
}

#[test]
fn a_peer_that_grants_no_credits_is_cut_off() {
    // The server may queue 256 KiB for a peer; this peer asks for 8 MiB and never takes
    // its completions, so it never grants credits back.
    let server = Server::start(RdmaConfig { outbox_bytes_max: 256 << 10, ..RdmaConfig::default() });
    let mut stuck = client();
    let mut good = client();
    let s = stuck.connect(server.addr, Duration::from_secs(2)).unwrap();
    let g = good.connect(server.addr, Duration::from_secs(2)).unwrap();
    for _ in 0..8 {
        stuck.outbox(s).unwrap().extend_from_slice(&frame(b"big:1048576"));
    }
    stuck.flush(&mut Collect::default());
    std::thread::sleep(Duration::from_millis(500));
    let frames = vec![frame(b"unaffected")];
    assert_eq!(round_trip(&mut good, g, &frames), frames);
    let reasons = server.stop();
    assert!(reasons.iter().any(|r| r.contains("does not read")), "{reasons:?}");
}

#[test]
fn a_peer_that_goes_away_is_closed_with_a_reason_and_others_go_on() {
    let server = Server::start(RdmaConfig::default());
    let mut good = client();
    let g = good.connect(server.addr, Duration::from_secs(2)).unwrap();
    {
        let mut gone = client();
        let c = gone.connect(server.addr, Duration::from_secs(2)).unwrap();
        assert_eq!(round_trip(&mut gone, c, &[frame(b"hello")]), vec![frame(b"hello")]);
        // Dropped here: its queue pair is destroyed and its control connection closed.
    }
    std::thread::sleep(Duration::from_millis(200));
    let frames = vec![frame(b"after")];
    assert_eq!(round_trip(&mut good, g, &frames), frames);
    let reasons = server.stop();
    assert!(!reasons.is_empty(), "the server saw the peer go");
    println!("server close reasons: {reasons:?}");
}

#[test]
fn a_queue_pair_that_breaks_closes_its_connection_with_a_reason_and_others_go_on() {
    let server = Server::start(RdmaConfig::default());
    let mut good = client();
    let g = good.connect(server.addr, Duration::from_secs(2)).unwrap();
    let mut broken = client();
    let b = broken.connect(server.addr, Duration::from_secs(2)).unwrap();
    assert_eq!(round_trip(&mut broken, b, &[frame(b"before")]), vec![frame(b"before")]);
    // The queue pair goes to the error state (as after a fatal transport error): its
    // posted receives complete with errors, and its side closes the connection, with
    // the reason, which closes the control channel and so the server's side too.
    broken.break_queue_pair(b).expect("break the queue pair");
    let mut seen = Collect::default();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.closed.is_empty() {
        assert!(Instant::now() < deadline, "the broken connection was not closed");
        broken.poll(Some(Duration::from_millis(5)), &mut seen).unwrap();
    }
    println!("broken side closed: {:?}", seen.closed);
    assert!(seen.closed.iter().any(|r| r.contains("completion failed")), "{:?}", seen.closed);
    assert_eq!(broken.connections_open(), 0);
    let frames = vec![frame(b"unaffected")];
    assert_eq!(round_trip(&mut good, g, &frames), frames);
    std::thread::sleep(Duration::from_millis(200));
    let reasons = server.stop();
    println!("server close reasons: {reasons:?}");
    assert_eq!(reasons.len(), 1, "the server closed the broken peer's connection only: {reasons:?}");
}

/// The same echo round trip over the TCP transport, for the RDMA figures to stand beside
/// (`ci/bench-rdma.sh` runs both in one VM boot).
#[test]
fn tcp_echo_round_trips_for_comparison() {
    use dds_transport::{TcpConfig, TcpTransport};
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let s = Arc::clone(&stop);
    let server = std::thread::spawn(move || {
        let mut t = TcpTransport::new(LenPrefix, TcpConfig::default()).unwrap();
        tx.send(t.listen("127.0.0.1:0".parse().unwrap()).unwrap()).unwrap();
        let mut echo = Echo::default();
        while !s.load(Ordering::Relaxed) {
            t.poll(Some(Duration::ZERO), &mut echo).unwrap();
        }
    });
    let mut t = TcpTransport::new(LenPrefix, TcpConfig::default()).unwrap();
    let conn = t.connect(rx.recv().unwrap(), Duration::from_secs(2)).unwrap();
    let small = frame(&[5u8; 24]);
    let mut rtts = Vec::new();
    for _ in 0..2000 {
        let t0 = Instant::now();
        t.outbox(conn).unwrap().extend_from_slice(&small);
        let mut got = Collect::default();
        while got.frames.is_empty() {
            t.poll(Some(Duration::ZERO), &mut got).unwrap();
        }
        assert_eq!(got.frames[0], small);
        rtts.push(t0.elapsed());
    }
    rtts.sort();
    println!("tcp transport, 28-byte frames: p50 {:.1} us, p99 {:.1} us round trip", rtts[1000].as_secs_f64() * 1e6, rtts[1980].as_secs_f64() * 1e6);
    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();
}

#[test]
fn only_peers_that_prove_the_secret_get_a_queue_pair() {
    use dds_transport::auth::Secret;
    let secret = Arc::new(Secret::generate().unwrap());
    let server = Server::start(RdmaConfig { secret: Some(Arc::clone(&secret)), ..RdmaConfig::default() });
    let with = |s: Option<&Arc<Secret>>| RdmaTransport::new(LenPrefix, RdmaConfig { secret: s.cloned(), ..RdmaConfig::default() }).expect("rdma transport");
    let mut good = with(Some(&secret));
    let g = good.connect(server.addr, Duration::from_secs(2)).expect("the secret's holder is served");
    let frames = vec![frame(b"member")];
    assert_eq!(round_trip(&mut good, g, &frames), frames);
    let other = Arc::new(Secret::generate().unwrap());
    let err = with(Some(&other)).connect(server.addr, Duration::from_secs(2)).unwrap_err().to_string();
    assert!(err.contains("belongs to cluster"), "another cluster: {err}");
    let wrong = Arc::new(secret.with_key([0x5a; 32]));
    let err = with(Some(&wrong)).connect(server.addr, Duration::from_secs(2)).unwrap_err().to_string();
    assert!(err.contains("wrong secret"), "this cluster's id, another key: {err}");
    let err = with(None).connect(server.addr, Duration::from_secs(2)).unwrap_err().to_string();
    assert!(err.contains("requires the cluster's secret"), "no secret: {err}");
    assert_eq!(round_trip(&mut good, g, &frames), frames, "the member is still served");
    let reasons = server.stop();
    assert!(reasons.iter().filter(|r| r.contains("not authenticated")).count() >= 3, "{reasons:?}");
}
