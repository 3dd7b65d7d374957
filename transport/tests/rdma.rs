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
