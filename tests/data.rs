//! 10,000 keys with values from 0 bytes to 1 MiB, written and read back byte-exact
//! through the library (pipelined and one at a time) and the CLI.

mod common;

use std::time::Duration;

use common::*;
use dds::{Completion, Outcome, Request};

const KEYS: usize = 10_000;
const MIB: usize = 1 << 20;

fn key(i: usize) -> Vec<u8> {
    format!("data-test/{i}").into_bytes()
}

/// Sizes cover the edges (0, 1, 1 MiB) and spread log-uniformly up to 64 KiB between;
/// every 500th key is a full 1 MiB.
fn value(i: usize) -> Vec<u8> {
    let len = match i % 500 {
        0 => MIB,
        1 => 0,
        2 => 1,
        3 => MIB - 1,
        _ => {
            let bits = (i * 7919) % 17; // 2^0 .. 2^16
            ((i * 104_729) % (1 << bits)).max(1)
        }
    };
    let mut x = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn drain(client: &mut dds::Client, done: &mut Vec<Completion>, max_in_flight: usize) {
    while client.in_flight() > max_in_flight {
        client.poll(done, Duration::from_millis(100)).unwrap();
    }
}

#[test]
fn ten_thousand_keys_read_back_byte_exact() {
    let mut cluster = TestCluster::up(2, 2);
    let mut client = cluster.client();
    assert_eq!(client.map().bricks().len(), 2);
    assert!(client.map().bricks().values().all(|b| b.cores.len() == 2));

    // Pipelined puts, 32 in flight.
    let mut done = Vec::new();
    let mut total_bytes = 0;
    for i in 0..KEYS {
        let v = value(i);
        total_bytes += v.len();
        client.submit(Request::Put(&key(i), &v)).unwrap();
        drain(&mut client, &mut done, 32);
    }
    drain(&mut client, &mut done, 0);
    assert_eq!(done.len(), KEYS);
    for c in &done {
        assert_eq!(c.result.as_ref().unwrap(), &Outcome::Stored);
    }
    println!("wrote {KEYS} keys, {total_bytes} value bytes");

    // Pipelined gets from a fresh client; tokens map back to keys.
    let mut reader = cluster.client();
    let mut token_to_key = std::collections::HashMap::new();
    done.clear();
    for i in 0..KEYS {
        let t = reader.submit(Request::Get(&key(i))).unwrap();
        token_to_key.insert(t, i);
        drain(&mut reader, &mut done, 32);
    }
    drain(&mut reader, &mut done, 0);
    assert_eq!(done.len(), KEYS);
    for c in done.drain(..) {
        let i = token_to_key[&c.token];
        match c.result.unwrap() {
            Outcome::Value(v) => assert!(v == value(i), "key {i}: value of {} bytes differs from the {} written", v.len(), value(i).len()),
            other => panic!("key {i}: {other:?}"),
        }
    }

    // The counters agree with what was written.
    let bricks: Vec<_> = reader.map().bricks().keys().copied().collect();
    let stored: u64 = bricks.into_iter().flat_map(|b| reader.brick_stats(b).unwrap()).map(|s| s.keys).sum();
    assert_eq!(stored, KEYS as u64);

    // One at a time: overwrite, remove, read back.
    reader.put(&key(0), b"small now").unwrap();
    assert_eq!(reader.get(&key(0)).unwrap().as_deref(), Some(&b"small now"[..]));
    assert!(reader.remove(&key(1)).unwrap());
    assert!(!reader.remove(&key(1)).unwrap());
    assert_eq!(reader.get(&key(1)).unwrap(), None);

    // The CLI prints a 1 MiB value byte-exact.
    let out = run_ok(&["get", "data-test/500", "--cluster", &cluster.dir_arg()]);
    assert!(out.stdout == value(500), "CLI get of a 1 MiB value differs");

    drop(client);
    drop(reader);
    cluster.down();
}

#[test]
fn oversized_keys_and_values_get_typed_errors() {
    let mut cluster = TestCluster::up(1, 1);
    let mut client = cluster.client();
    let err = client.put(&vec![b'k'; dds::proto::KEY_LEN_MAX + 1], b"v").unwrap_err();
    assert!(matches!(err, dds::ClientError::KeyTooLong { len: 4097 }), "{err}");
    let err = client.put(b"k", &vec![0; dds::proto::VALUE_LEN_MAX + 1]).unwrap_err();
    assert!(matches!(err, dds::ClientError::ValueTooLong { .. }), "{err}");
    // The limits themselves are accepted.
    let big = vec![7u8; dds::proto::VALUE_LEN_MAX];
    client.put(&vec![b'k'; dds::proto::KEY_LEN_MAX], &big).unwrap();
    assert!(client.get(&vec![b'k'; dds::proto::KEY_LEN_MAX]).unwrap().unwrap() == big);
    drop(client);
    cluster.down();
}
