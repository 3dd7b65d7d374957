//! The TCP transport against itself: an echo server on one thread, clients on others,
//! with a 4-byte length-prefixed framing.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dds_transport::{CloseReason, ConnId, Handler, TcpConfig, TcpTransport, Transport};

mod common;
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
    let mut t = TcpTransport::new(LenPrefix, TcpConfig::default()).unwrap();
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
}

impl Handler for Collect {
    fn on_frame(&mut self, _conn: ConnId, frame: &[u8], _out: &mut Vec<u8>) -> Result<(), String> {
        self.frames.push(frame.to_vec());
        Ok(())
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
