//! A peer that sends garbage, a truncated frame, an oversized length, or leaves mid-frame
//! loses its own connection, with a reason in the brick's log; everyone else is served.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use dds::proto::{encode, Frame, Kind, Op, HEADER_LEN};

fn put_frame(key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut buf = Vec::new();
    encode(&mut buf, &Frame { kind: Kind::Request(Op::Put), request_id: 1, epoch: 1, key, value });
    buf
}

/// Sends `bytes`, then expects the brick to close the connection (EOF or reset).
fn expect_closed_by_brick(mut s: TcpStream, bytes: &[u8]) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(bytes).unwrap();
    let mut buf = [0u8; 256];
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("brick answered {n} bytes to bad input instead of closing"),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("brick did not close the connection: {e}"),
    }
}

fn wait_for_log(cluster: &TestCluster, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cluster.brick_log(0).contains(needle) {
        assert!(Instant::now() < deadline, "brick log lacks {needle:?}:\n{}", cluster.brick_log(0));
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn bad_peers_lose_only_their_own_connection() {
    let mut cluster = TestCluster::up(1, 1);
    let addr = cluster.file().bricks[0].addr;
    let mut good = cluster.client();
    good.put(b"steady", b"before").unwrap();
    let check_good = |good: &mut dds::Client, round: &str| {
        let v = format!("after {round}");
        good.put(b"steady", v.as_bytes()).unwrap_or_else(|e| panic!("good client failed after {round}: {e}"));
        assert_eq!(good.get(b"steady").unwrap().unwrap(), v.as_bytes());
    };

    // Garbage: an HTTP request.
    expect_closed_by_brick(cluster.raw_connect(addr), b"GET / HTTP/1.1\r\nHost: dds\r\n\r\n");
    wait_for_log(&cluster, "bad magic");
    check_good(&mut good, "garbage");

    // An oversized length: the header promises a 4 GiB value.
    let mut frame = put_frame(b"k", b"v");
    frame[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
    expect_closed_by_brick(cluster.raw_connect(addr), &frame[..HEADER_LEN]);
    wait_for_log(&cluster, "exceeds the limit");
    check_good(&mut good, "oversized length");

    // A reply sent to a brick.
    let mut reply = Vec::new();
    encode(&mut reply, &Frame { kind: Kind::Reply(Op::Get, dds::proto::Status::Ok), request_id: 3, epoch: 0, key: b"", value: b"x" });
    expect_closed_by_brick(cluster.raw_connect(addr), &reply);
    wait_for_log(&cluster, "unexpected get reply");
    check_good(&mut good, "a reply frame");

    // A truncated frame: half of a put, then the peer closes its side.
    let frame = put_frame(b"key", &[9u8; 1000]);
    let mut s = cluster.raw_connect(addr);
    s.write_all(&frame[..500]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "a truncated frame got an answer");
    wait_for_log(&cluster, "peer closed mid-frame with 500 bytes");
    check_good(&mut good, "truncated frame");

    // Disconnect in the middle of a header.
    let mut s = cluster.raw_connect(addr);
    s.write_all(&frame[..10]).unwrap();
    drop(s);
    wait_for_log(&cluster, "peer closed mid-frame with 10 bytes");
    check_good(&mut good, "disconnect mid-header");

    // A well-formed frame after all that on a fresh raw connection still works.
    let mut s = cluster.raw_connect(addr);
    s.write_all(&put_frame(b"raw", b"ok")).unwrap();
    let mut reply = [0u8; HEADER_LEN];
    s.read_exact(&mut reply).unwrap();
    let (frame, _) = dds::proto::decode(&reply).unwrap().unwrap();
    assert_eq!(frame.kind, Kind::Reply(Op::Put, dds::proto::Status::Ok));

    let stats = good.brick_stats(dds::map::BrickId(0)).unwrap();
    assert!(stats[0].connections_closed_bad_input >= 4, "{stats:?}");
    assert_eq!(good.get(b"raw").unwrap().as_deref(), Some(&b"ok"[..]));
    drop(good);
    cluster.down();
}

#[test]
fn many_clients_keep_being_served_while_one_floods_garbage() {
    let mut cluster = TestCluster::up(1, 2);
    let addrs = cluster.file().addrs();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let flooder = s.spawn(|| {
            let mut rounds = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && rounds < 2000 {
                if let Ok(mut t) = TcpStream::connect(addrs[0]) {
                    let _ = t.write_all(&[0xAB; 64]);
                }
                rounds += 1;
            }
            rounds
        });
        let mut c = dds::Client::connect(&addrs, cluster.file().client_config()).unwrap();
        for i in 0..2000u32 {
            let k = i.to_le_bytes();
            c.put(&k, &k).unwrap();
            assert_eq!(c.get(&k).unwrap().unwrap(), k);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(flooder.join().unwrap() > 0);
    });
    cluster.down();
}
