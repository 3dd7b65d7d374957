//! A replicated cluster started with `--transport rdma`, end to end on the real binary:
//! 3 bricks, 2 replicas, writes and reads through a client, a brick killed and
//! recovered, every key checked.
//!
//! Where it runs decides what it shows. Inside the soft-RoCE VM (`ci/rdma.sh` sets
//! `DDS_RDMA_EXPECT_DEVICE`, with a build that has the `rdma` feature) the bricks serve
//! RDMA beside TCP, the client's connections and the bricks' requests are RDMA, and
//! `cluster status` says so. Anywhere else (no device, or a build without the
//! feature) `cluster up` says in one line why and falls back to TCP, and the same
//! scenario passes over TCP.

mod common;

use std::time::Duration;

use common::{check_all, run_ok, text, write_all, TestCluster};
use dds::Client;

fn in_vm() -> bool {
    std::env::var_os("DDS_RDMA_EXPECT_DEVICE").is_some()
}

fn status(cluster: &TestCluster) -> String {
    text(&run_ok(&["cluster", "status", "--dir", &cluster.dir_arg()]).stdout)
}

/// Requests each running brick served, and how many of them came over RDMA, from
/// `cluster status` (the two columns before the last, `cpus`, of a brick's row).
fn requests_per_brick(status: &str) -> Vec<(u64, u64)> {
    status
        .lines()
        .filter(|l| l.split_whitespace().nth(3) == Some("up"))
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols[cols.len() - 3].parse().unwrap(), cols[cols.len() - 2].parse().unwrap())
        })
        .collect()
}

#[test]
fn a_cluster_asked_for_rdma_serves_over_it_or_falls_back_to_tcp_and_loses_nothing() {
    let dir = tempfile::Builder::new().prefix("dds-rdma-").tempdir().unwrap();
    let path = dir.path().to_str().unwrap().to_string();
    let out = run_ok(&["cluster", "up", "--dir", &path, "--bricks", "3", "--replicas", "2", "--cores", "1", "--transport", "rdma"]);
    let mut cluster = TestCluster { dir, down: false };
    let said = text(&out.stderr);
    println!("cluster up said: {said}");
    let fallback = said.lines().filter(|l| l.contains("falling back to TCP")).count();
    if in_vm() {
        assert!(said.contains("bricks serve RDMA on") && fallback == 0, "{said}");
    } else {
        assert_eq!(fallback, 1, "one line says why there is no RDMA: {said}");
    }
    let before = status(&cluster);
    println!("{before}");
    let serving = if in_vm() { "3 of 3" } else { "0 of 3" };
    assert!(before.contains(&format!("bricks serving RDMA beside TCP: {serving}")), "{before}");

    let file = cluster.file();
    // The client asks for RDMA whatever the cluster got: without a device it says why
    // and dials TCP, and it dials TCP to bricks that serve no RDMA.
    let config = dds::ClientConfig { rdma: true, ..file.client_config() };
    let mut client = Client::connect(&file.addrs(), config.clone()).unwrap();
    assert_eq!(client.rdma_unavailable().is_none(), in_vm(), "{:?}", client.rdma_unavailable());
    println!("client: RDMA unavailable: {:?}", client.rdma_unavailable());
    write_all(&mut client, "rdma", 2_000);
    check_all(&mut client, "rdma", 2_000);
    let (open, rdma) = client.connections();
    println!("client connections: {open}, of which RDMA: {rdma}");
    if in_vm() {
        assert!(rdma > 0 && rdma == open, "every brick core serves RDMA, so every connection is: {open} open, {rdma} RDMA");
    } else {
        assert_eq!(rdma, 0);
    }

    if in_vm() {
        // Every brick core's RDMA port refuses a stranger, a peer of another cluster
        // and one without a secret: no queue pair is made, and nothing is applied.
        let other = std::sync::Arc::new(dds::Secret::generate().unwrap());
        // This cluster's id with another key.
        let ours = file.secret.clone().expect("cluster up makes a secret");
        let wrong = std::sync::Arc::new(ours.with_key([0x5a; 32]));
        let map = client.map().clone();
        for brick in map.bricks().values() {
            for &at in &brick.rdma {
                for secret in [Some(&other), Some(&wrong), None] {
                    let tcp = dds_transport::TcpConfig { secret: secret.cloned(), ..Default::default() };
                    let mut t = dds_transport::MixedTransport::new(dds::proto::DdsFraming, tcp).unwrap();
                    t.enable_rdma().unwrap();
                    let err = t.connect_rdma(at, Duration::from_secs(2)).expect_err("refused").to_string();
                    assert!(err.contains("not authenticated"), "{at}: {err}");
                }
            }
        }
        check_all(&mut client, "rdma", 2_000);
    }

    run_ok(&["cluster", "kill", "--dir", &path, "--brick", "1"]);
    write_all(&mut client, "while-down", 500);
    let out = run_ok(&["cluster", "restart", "--dir", &path, "--brick", "1"]);
    println!("{}", text(&out.stdout));
    // A fresh client after the recovery: every key on every replica it reads.
    let mut after = Client::connect(&file.addrs(), config).unwrap();
    check_all(&mut after, "rdma", 2_000);
    check_all(&mut after, "while-down", 500);
    std::thread::sleep(Duration::from_millis(100));
    let end = status(&cluster);
    println!("{end}");
    assert!(end.contains(&format!("bricks serving RDMA beside TCP: {serving}")), "the restarted brick serves as before:\n{end}");
    let served = requests_per_brick(&end);
    assert_eq!(served.len(), 3, "{end}");
    for (requests, over_rdma) in served {
        assert!(requests > 0, "{end}");
        if in_vm() {
            assert!(over_rdma > 0, "every brick served clients over RDMA:\n{end}");
        } else {
            assert_eq!(over_rdma, 0, "{end}");
        }
    }
    cluster.down();
}
