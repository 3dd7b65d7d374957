//! The TCP transport against itself: an echo server on one thread, clients on others,
//! with a 4-byte length-prefixed framing.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dds_transport::{CloseReason, ConnId, Handler, TcpConfig, TcpTransport, Transport};

mod common;
use common::tap::Tap;
use common::{frame, LenPrefix};

#[derive(Default)]
struct Echo {
    closed: Vec<String>,
}

impl Handler for Echo {
    fn on_frame(&mut self, _conn: ConnId, frame: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        if frame.get(4..) == Some(b"refuse") {
            return Err("asked to refuse".into());
        }
        out.extend_from_slice(frame);
        Ok(())
    }
    fn on_close(&mut self, _conn: ConnId, _peer: SocketAddr, reason: &CloseReason) {
        self.closed.push(reason.to_string());
    }
}

/// Runs an echo server until `stop`; returns its close reasons.
fn serve(stop: &AtomicBool, ready: mpsc::Sender<SocketAddr>) -> Vec<String> {
    serve_with(TcpConfig::default(), stop, ready)
}

fn serve_with(config: TcpConfig, stop: &AtomicBool, ready: mpsc::Sender<SocketAddr>) -> Vec<String> {
    let mut t = TcpTransport::new(LenPrefix, config).unwrap();
    ready.send(t.listen("127.0.0.1:0".parse().unwrap()).unwrap()).unwrap();
    let mut echo = Echo::default();
    while !stop.load(Ordering::Relaxed) {
        t.poll(Some(Duration::from_millis(10)), &mut echo).unwrap();
    }
    echo.closed
}

#[derive(Default)]
struct Collect {
    frames: Vec<Vec<u8>>,
    closed: Vec<String>,
}

impl Handler for Collect {
    fn on_frame(&mut self, _conn: ConnId, frame: &[u8], _out: &mut Vec<u8>) -> Result<(), String> {
        self.frames.push(frame.to_vec());
        Ok(())
    }
    fn on_close(&mut self, _conn: ConnId, _peer: SocketAddr, reason: &CloseReason) {
        self.closed.push(reason.to_string());
    }
}

#[test]
fn pipelined_frames_of_every_size_come_back_in_order() {
    let stop = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| {
        let server = s.spawn(|| serve(&stop, tx));
        let addr = rx.recv().unwrap();
        let mut client = TcpTransport::new(LenPrefix, TcpConfig::default()).unwrap();
        let conn = client.connect(addr, Duration::from_secs(5)).unwrap();
        let sizes: Vec<usize> = (0..2000).map(|i| if i % 400 == 0 { 5 << 20 } else { (i * 37) % 3000 }).collect();
        let mut sent = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let payload: Vec<u8> = (0..n).map(|j| (i + j) as u8).collect();
            let f = frame(&payload);
            client.outbox(conn).unwrap().extend_from_slice(&f);
            sent.push(f);
        }
        let mut got = Collect::default();
        let deadline = Instant::now() + Duration::from_secs(60);
        while got.frames.len() < sent.len() {
            assert!(Instant::now() < deadline, "only {} of {} frames came back", got.frames.len(), sent.len());
            client.poll(Some(Duration::from_millis(10)), &mut got).unwrap();
        }
        assert!(got.frames == sent, "echoed frames differ");
        stop.store(true, Ordering::Relaxed);
        server.join().unwrap();
    });
}

#[test]
fn a_malformed_or_refused_frame_closes_that_connection_only() {
    let stop = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| {
        let server = s.spawn(|| serve(&stop, tx));
        let addr = rx.recv().unwrap();
        let mut good = TcpStream::connect(addr).unwrap();
        for bad in [u32::MAX.to_le_bytes().to_vec(), frame(b"refuse")] {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(&bad).unwrap();
            let mut buf = [0u8; 16];
            assert_eq!(s.read(&mut buf).unwrap_or(0), 0, "bad peer was answered");
        }
        good.write_all(&frame(b"still here")).unwrap();
        let mut back = vec![0u8; 14];
        good.read_exact(&mut back).unwrap();
        assert_eq!(&back[4..], b"still here");
        drop(good);
        std::thread::sleep(Duration::from_millis(50));
        stop.store(true, Ordering::Relaxed);
        let closed = server.join().unwrap();
        assert!(closed.iter().any(|r| r.contains("too long")), "{closed:?}");
        assert!(closed.iter().any(|r| r.contains("asked to refuse")), "{closed:?}");
    });
}

#[test]
fn a_peer_that_never_reads_is_paused_without_hurting_others() {
    let stop = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel();
    let config = TcpConfig { outbox_bytes_max: 1 << 20, ..TcpConfig::default() };
    std::thread::scope(|s| {
        let server = s.spawn(|| {
            let mut t = TcpTransport::new(LenPrefix, config).unwrap();
            tx.send(t.listen("127.0.0.1:0".parse().unwrap()).unwrap()).unwrap();
            let mut echo = Echo::default();
            while !stop.load(Ordering::Relaxed) {
                t.poll(Some(Duration::from_millis(10)), &mut echo).unwrap();
            }
        });
        let addr = rx.recv().unwrap();
        // Sends 64 MiB of requests and reads no reply: the server stops reading it, and
        // the sender blocks rather than the server buffering without bound.
        let hog = s.spawn(move || {
            let mut t = TcpStream::connect(addr).unwrap();
            t.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
            let f = frame(&vec![1u8; 64 << 10]);
            let mut sent = 0usize;
            while sent < 64 << 20 {
                if t.write_all(&f).is_err() {
                    break;
                }
                sent += f.len();
            }
            sent
        });
        let mut good = TcpStream::connect(addr).unwrap();
        good.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        for i in 0..100u32 {
            good.write_all(&frame(&i.to_le_bytes())).unwrap();
            let mut back = [0u8; 8];
            good.read_exact(&mut back).unwrap();
            assert_eq!(&back[4..], i.to_le_bytes());
        }
        let sent = hog.join().unwrap();
        assert!(sent < 64 << 20, "the server kept reading from a peer that does not read ({sent} bytes)");
        stop.store(true, Ordering::Relaxed);
        server.join().unwrap();
    });
}

/// Sends one frame on `conn` and waits up to 2 s for its echo: the echo, or why the
/// connection closed.
fn echo_once(t: &mut TcpTransport<LenPrefix>, conn: ConnId, payload: &[u8]) -> Result<Vec<u8>, String> {
    t.outbox(conn).map_err(|e| e.to_string())?.extend_from_slice(&frame(payload));
    let mut got = Collect::default();
    let deadline = Instant::now() + Duration::from_secs(2);
    while got.frames.is_empty() && Instant::now() < deadline && t.peer(conn).is_some() {
        t.poll(Some(Duration::from_millis(5)), &mut got).unwrap();
    }
    got.frames.pop().ok_or(got.closed.join("; "))
}

#[test]
fn only_peers_that_prove_the_clusters_secret_are_served() {
    use dds_transport::auth::{client_handshake, AuthError, Secret};
    use std::sync::Arc;
    let secret = Arc::new(Secret::generate().unwrap());
    let other = Arc::new(Secret::generate().unwrap());
    let wrong_key = Arc::new(secret.with_key([0xab; 32]));
    let stop = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel();
    let closed = std::thread::scope(|s| {
        let server = s.spawn(|| serve_with(TcpConfig { secret: Some(Arc::clone(&secret)), ..TcpConfig::default() }, &stop, tx));
        let addr = rx.recv().unwrap();
        // A failed assertion below must not leave the server running (the scope waits).
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop = StopOnDrop(&stop);
        let transport = |secret: Option<&Arc<Secret>>| TcpTransport::new(LenPrefix, TcpConfig { secret: secret.cloned(), ..TcpConfig::default() }).unwrap();
        let timeout = Duration::from_secs(2);

        // The same secret: served, both ways proved.
        let mut good = transport(Some(&secret));
        let conn = good.connect(addr, timeout).unwrap();
        assert_eq!(echo_once(&mut good, conn, b"hello"), Ok(frame(b"hello")), "the cluster's own secret is accepted");

        // Another cluster's secret, and this cluster's id with a wrong key: the frame
        // queued at connect never leaves, and the close says why.
        for (secret, why) in [(&other, "belongs to cluster"), (&wrong_key, "wrong secret")] {
            let mut t = transport(Some(secret));
            let conn = t.connect(addr, timeout).unwrap();
            let err = echo_once(&mut t, conn, b"sneak").unwrap_err();
            assert!(err.contains("not authenticated") && err.contains(why), "{err}");
        }

        // No secret: the connection opens, the first frame is never echoed, and the
        // reason is the peer's demand for a secret, not a malformed frame.
        let mut open = transport(None);
        let conn = open.connect(addr, timeout).unwrap();
        let err = echo_once(&mut open, conn, b"let me in").unwrap_err();
        assert!(err.contains("requires the cluster's secret"), "{err}");

        // A raw stranger that speaks frames at once gets the hello, then the close.
        let mut raw = TcpStream::connect(addr).unwrap();
        raw.set_read_timeout(Some(timeout)).unwrap();
        raw.write_all(&frame(b"stranger")).unwrap();
        let mut seen = Vec::new();
        let _ = raw.read_to_end(&mut seen);
        assert!(seen.starts_with(&dds_transport::auth::MAGIC) && seen.len() == dds_transport::auth::HELLO_LEN + dds_transport::auth::VERDICT_LEN, "hello, refusal: {seen:?}");

        // A fake server that knows the cluster's id but not its key gets the proof and
        // nothing else: the frames queued behind it wait for a verdict it cannot forge.
        let fake = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fake_addr = fake.local_addr().unwrap();
        let mut member = transport(Some(&secret));
        let conn = member.connect(fake_addr, timeout).unwrap();
        member.outbox(conn).unwrap().extend_from_slice(&frame(b"a member's secret put"));
        let (mut theirs, _) = fake.accept().unwrap();
        let mut hello = dds_transport::auth::MAGIC.to_vec();
        hello.extend_from_slice(&secret.cluster_id().to_le_bytes());
        hello.extend_from_slice(&[7; 16]);
        theirs.write_all(&hello).unwrap();
        let mut got = Collect::default();
        for _ in 0..40 {
            member.poll(Some(Duration::from_millis(5)), &mut got).unwrap();
        }
        theirs.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let mut seen = Vec::new();
        let mut chunk = [0u8; 256];
        while let Ok(n) = theirs.read(&mut chunk) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(seen.len(), dds_transport::auth::PROOF_LEN, "only the proof left before a verdict: {seen:?}");
        theirs.write_all(&[0u8; dds_transport::auth::VERDICT_LEN]).unwrap();
        let err = echo_once(&mut member, conn, b"more").unwrap_err();
        assert!(err.contains("could not prove"), "{err}");

        // A stranger that connects and says nothing holds its slot for the handshake's
        // deadline only.
        let mut silent = TcpStream::connect(addr).unwrap();
        silent.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let since = Instant::now();
        let mut seen = Vec::new();
        let _ = silent.read_to_end(&mut seen);
        let held = since.elapsed();
        assert!(held >= Duration::from_millis(1500) && held < Duration::from_secs(5), "closed after {held:?}");
        assert_eq!(seen.len(), dds_transport::auth::HELLO_LEN, "only the hello: {seen:?}");

        // Replay: everything an authenticated client sent, captured, then sent again
        // on a new connection, is refused (the proof is bound to the first server nonce).
        let mut tap = Tap { stream: TcpStream::connect(addr).unwrap(), sent: Vec::new() };
        tap.stream.set_read_timeout(Some(timeout)).unwrap();
        client_handshake(&mut tap, Some(&secret)).unwrap();
        tap.write_all(&frame(b"captured")).unwrap();
        let mut echoed = [0u8; 12];
        tap.read_exact(&mut echoed).unwrap();
        assert_eq!(&echoed[..], &frame(b"captured")[..]);
        let mut replay = TcpStream::connect(addr).unwrap();
        replay.set_read_timeout(Some(timeout)).unwrap();
        replay.write_all(&tap.sent).unwrap();
        let mut seen = Vec::new();
        let _ = replay.read_to_end(&mut seen);
        assert!(!seen.windows(12).any(|w| w == &frame(b"captured")[..]), "a replayed frame was served");
        assert_eq!(seen.len(), dds_transport::auth::HELLO_LEN + dds_transport::auth::VERDICT_LEN, "hello, then the refusal");
        assert!(matches!(
            dds_transport::auth::ClientHandshake::on_hello(&secret, &seen[..32], &mut Vec::new()).unwrap().on_verdict(&secret, &seen[32..]),
            Err(AuthError::RefusedByPeer("wrong secret"))
        ));

        stop.store(true, Ordering::Relaxed);
        server.join().unwrap()
    });
    let refused = closed.iter().filter(|c| c.contains("not authenticated")).count();
    assert!(refused >= 4, "each refusal is a close with its reason: {closed:?}");
    assert!(closed.iter().any(|c| c.contains("belongs to cluster")), "{closed:?}");
    assert!(closed.iter().any(|c| c.contains("before authenticating")), "{closed:?}");
    assert!(closed.iter().any(|c| c.contains("no handshake within")), "{closed:?}");
}
