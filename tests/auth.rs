//! A cluster is closed to strangers: every port of the real binary (the authority's,
//! every brick core's) refuses a peer without the secret, with a wrong one, or of
//! another cluster, says why on both sides, and applies nothing it sent; a brick of
//! another cluster cannot join; a connection's captured bytes replayed on a new one
//! are refused.

mod common;
#[path = "../transport/tests/common/tap.rs"]
mod tap;
use tap::Tap;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{check_all, dds, text, write_all, TestCluster};
use dds::proto::{encode, Frame, Kind, Op};
use dds::rpc::Rpc;
use dds::Secret;

/// A secret file in `dir` holding `secret` (mode 0600, as `cluster up` writes one).
fn secret_file(dir: &std::path::Path, name: &str, secret: &Secret) -> std::path::PathBuf {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).unwrap();
    f.write_all(secret.to_text().as_bytes()).unwrap();
    path
}

fn put_frame(key: &[u8], value: &[u8], epoch: u64) -> Vec<u8> {
    let mut buf = Vec::new();
    encode(&mut buf, &Frame { kind: Kind::Request(Op::Put), request_id: 1, epoch, key, value });
    buf
}

/// Every port of the cluster: the authority's and every brick core's.
fn ports(cluster: &TestCluster) -> Vec<SocketAddr> {
    let map = cluster.authority_map();
    cluster.file().meta_addrs().into_iter().chain(map.bricks().values().flat_map(|b| b.cores.clone())).collect()
}

#[test]
fn strangers_wrong_secrets_and_other_clusters_are_refused_on_every_port_and_change_nothing() {
    let mut cluster = TestCluster::up_with(2, 2, &["--replicas", "2", "--metrics"]);
    let dir = cluster.path().to_path_buf();
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(dir.join("secret")).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "cluster up writes its secret for its owner only");
    let ours = cluster.file().secret.clone().expect("a cluster made by `cluster up` has a secret");
    let mut client = cluster.client();
    write_all(&mut client, "kept", 200);
    let epoch = cluster.authority_map().epoch();

    let other = Secret::generate().unwrap();
    let wrong = ours.with_key([0x5a; 32]);
    let timeout = Duration::from_secs(2);
    for addr in ports(&cluster) {
        // No secret: told so, on the first call.
        let err = Rpc::connect(addr, timeout, None).and_then(|mut r| r.call(Op::Put, epoch, &common::key("kept", 0), b"stranger", timeout)).unwrap_err().to_string();
        assert!(err.contains("requires the cluster's secret"), "{addr}: {err}");
        // Another cluster's secret, and this cluster's id with a wrong key.
        let err = Rpc::connect(addr, timeout, Some(&other)).err().expect("another cluster is refused").to_string();
        assert!(err.contains("belongs to cluster"), "{addr}: {err}");
        let err = Rpc::connect(addr, timeout, Some(&wrong)).err().expect("a wrong key is refused").to_string();
        assert!(err.contains("wrong secret"), "{addr}: {err}");
        // A raw stranger that writes a put at once: the handshake's hello and a
        // refusal come back, never a reply.
        let mut raw = TcpStream::connect(addr).unwrap();
        raw.set_read_timeout(Some(timeout)).unwrap();
        raw.write_all(&put_frame(&common::key("kept", 1), b"stranger", epoch)).unwrap();
        let mut seen = Vec::new();
        let _ = raw.read_to_end(&mut seen);
        assert!(seen.starts_with(&dds::auth::MAGIC) && seen.len() == dds::auth::HELLO_LEN + dds::auth::VERDICT_LEN, "{addr}: {seen:?}");
    }
    // Every metrics port wants the token `cluster up --metrics` wrote (401 without).
    let token = std::fs::read_to_string(dir.join("metrics.token")).unwrap();
    let file = cluster.file();
    for at in file.metas.iter().map(|m| m.metrics).chain(file.bricks.iter().map(|b| b.metrics)) {
        let at = at.expect("--metrics");
        let scrape = |header: &str| {
            let mut s = TcpStream::connect(at).unwrap();
            s.set_read_timeout(Some(timeout)).unwrap();
            write!(s, "GET /metrics HTTP/1.1\r\nHost: dds\r\n{header}\r\n").unwrap();
            let mut answer = String::new();
            let _ = s.read_to_string(&mut answer);
            answer.lines().next().unwrap_or_default().to_string()
        };
        assert!(scrape("").contains("401"), "{at}: a scrape without the token");
        assert!(scrape("Authorization: Bearer 00\r\n").contains("401"), "{at}: a wrong token");
        assert!(scrape(&format!("Authorization: Bearer {token}\r\n")).contains("200"), "{at}: the cluster's token");
    }
    // The library's client says why too.
    let seeds = cluster.file().addrs();
    let err = dds::Client::connect(&seeds, dds::ClientConfig { secret: Some(Arc::new(other.clone())), ..Default::default() }).err().expect("refused").to_string();
    assert!(err.contains("belongs to cluster"), "{err}");
    let err = dds::Client::connect(&seeds, dds::ClientConfig::default()).err().expect("refused").to_string();
    assert!(err.contains("requires the cluster's secret"), "{err}");

    // A brick of another cluster (its own secret) cannot join: it stops at once with
    // the reason, and the map does not change.
    let stranger_dir = tempfile::tempdir().unwrap();
    let file = secret_file(stranger_dir.path(), "secret", &other);
    let meta = cluster.file().metas[0].addr.to_string();
    let started = Instant::now();
    let out = dds()
        .args(["brick", "--dir", stranger_dir.path().join("b").to_str().unwrap(), "--cores", "1", "--meta", &meta])
        .args(["--secret-file", file.to_str().unwrap()])
        .output()
        .unwrap();
    let said = text(&out.stderr);
    assert!(!out.status.success() && said.contains("refused this brick's credentials") && said.contains("belongs to cluster"), "{said}");
    assert!(started.elapsed() < Duration::from_secs(10), "refused at once, not after retries: {:?}", started.elapsed());
    // A brick with no secret at all stops at once too.
    let started = Instant::now();
    let out = dds().args(["brick", "--dir", stranger_dir.path().join("open").to_str().unwrap(), "--cores", "1", "--meta", &meta]).output().unwrap();
    let said = text(&out.stderr);
    assert!(!out.status.success() && said.contains("refused this brick's credentials") && said.contains("requires the cluster's secret"), "{said}");
    assert!(started.elapsed() < Duration::from_secs(10), "refused at once: {:?}", started.elapsed());
    let map = cluster.authority_map();
    assert_eq!((map.epoch(), map.bricks().len()), (epoch, 2), "the map is as it was");

    // Replay: an authenticated connection's bytes (handshake and a put), captured,
    // then sent again on a new connection after the key was overwritten.
    let core = map.bricks().values().flat_map(|b| b.cores.clone()).collect::<Vec<_>>();
    // The captured request is a get (any core answers one, if only with WrongShard):
    // its reply proves the capture was served, and the replay must get none.
    let mut tap = Tap { stream: TcpStream::connect(core[0]).unwrap(), sent: Vec::new() };
    tap.stream.set_read_timeout(Some(timeout)).unwrap();
    dds::auth::client_handshake(&mut tap, Some(&ours)).unwrap();
    let mut get = Vec::new();
    encode(&mut get, &Frame { kind: Kind::Request(Op::Get), request_id: 9, epoch, key: &common::key("kept", 2), value: &[] });
    tap.write_all(&get).unwrap();
    let mut header = [0u8; dds::proto::HEADER_LEN];
    tap.read_exact(&mut header).unwrap();
    let mut replay = TcpStream::connect(core[0]).unwrap();
    replay.set_read_timeout(Some(timeout)).unwrap();
    replay.write_all(&tap.sent).unwrap();
    let mut seen = Vec::new();
    let _ = replay.read_to_end(&mut seen);
    assert_eq!(seen.len(), dds::auth::HELLO_LEN + dds::auth::VERDICT_LEN, "hello and refusal only, no reply: {seen:?}");

    // Nothing any of them sent was applied; members are served as before.
    check_all(&mut client, "kept", 200);
    let mut fresh = cluster.client();
    check_all(&mut fresh, "kept", 200);
    assert_eq!(fresh.get(&common::key("kept", 0)).unwrap().as_deref(), Some(&common::value("kept", 0)[..]));
    let logs = cluster.brick_log(0) + &cluster.brick_log(1);
    assert!(logs.contains("not authenticated"), "each brick refusal is logged:\n{logs}");
    let meta_log = cluster.meta_logs();
    assert!(meta_log.contains("refused connection from") && meta_log.contains("belongs to cluster"), "{meta_log}");
    cluster.down();
}

#[test]
fn a_secret_file_others_can_read_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let path = secret_file(dir.path(), "secret", &Secret::generate().unwrap());
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = dds().args(["meta", "--dir", dir.path().join("m").to_str().unwrap(), "--bricks", "1", "--replicas", "1"]).args(["--secret-file", path.to_str().unwrap()]).output().unwrap();
    let said = text(&out.stderr);
    assert!(!out.status.success() && said.contains("readable by others") && said.contains("chmod 600"), "{said}");
}
