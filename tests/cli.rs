//! The `dds` command line end to end: cluster up/status/down, put/get/del, bench, demo.

mod common;

use common::*;

#[test]
fn put_get_del_through_the_cli() {
    let mut cluster = TestCluster::up(2, 1);
    let dir = cluster.dir_arg();
    run_ok(&["put", "greeting", "hello world", "--cluster", &dir]);
    let out = run_ok(&["get", "greeting", "--cluster", &dir]);
    assert_eq!(out.stdout, b"hello world", "get prints the value alone");

    // A value from stdin, bytes as they are (including NUL and invalid UTF-8).
    let binary: Vec<u8> = (0..=255u8).rev().chain([0, 0xff, b'\n']).collect();
    let out = run_with_stdin(&["put", "bin", "--cluster", &dir], &binary);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(run_ok(&["get", "bin", "--cluster", &dir]).stdout, binary);

    run_ok(&["del", "greeting", "--cluster", &dir]);
    let out = run(&["get", "greeting", "--cluster", &dir]);
    assert_eq!(out.status.code(), Some(1), "a missing key exits 1");
    assert!(out.stdout.is_empty());
    assert!(text(&out.stderr).contains("key not found"), "{}", text(&out.stderr));
    assert_eq!(run(&["del", "greeting", "--cluster", &dir]).status.code(), Some(1));

    let status = text(&run_ok(&["cluster", "status", "--dir", &dir]).stdout);
    assert!(status.contains("2 brick(s)") && status.matches(" up ").count() == 2, "{status}");
    // By default a local cluster leaves placement to the kernel, and says so.
    assert_eq!(status.lines().filter(|l| l.ends_with("  kernel")).count(), 2, "{status}");

    // A second `up` in the same directory is refused while the bricks run.
    let out = run(&["cluster", "up", "--dir", &dir]);
    assert!(!out.status.success() && text(&out.stderr).contains("already up"), "{}", text(&out.stderr));
    cluster.down();
}

#[test]
fn errors_are_clear_and_nonzero() {
    let missing = run(&["get", "k", "--cluster", "/nonexistent/dds"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(text(&missing.stderr).contains("no cluster in /nonexistent/dds"), "{}", text(&missing.stderr));

    let mut cluster = TestCluster::up(1, 1);
    let dir = cluster.dir_arg();
    let long_key = "k".repeat(5000);
    let out = run(&["put", &long_key, "v", "--cluster", &dir]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("longer than the limit of 4096"), "{}", text(&out.stderr));
    assert!(text(&out.stderr).len() < 400, "a long key is cut in the message: {}", text(&out.stderr));
    let out = run(&["cluster", "up", "--dir", "/tmp/never-used-dds", "--replicas", "2"]);
    assert!(text(&out.stderr).contains("needs at least that many bricks"), "{}", text(&out.stderr));
    let out = run(&["bench", "--target", "redis://nohost"]);
    assert!(!out.status.success() && text(&out.stderr).contains("expected HOST:PORT"), "{}", text(&out.stderr));
    let out = run(&["bench", "--target", "dds"]);
    assert!(!out.status.success() && text(&out.stderr).contains("needs --cluster"), "{}", text(&out.stderr));
    cluster.down();
}

#[test]
fn bench_json_has_the_contract_fields() {
    let mut cluster = TestCluster::up(2, 1);
    let json = cluster.path().join("report.json");
    let dir = cluster.dir_arg();
    let out = run_ok(&[
        "bench", "--cluster", &dir, "--workload", "mixed", "--seconds", "1", "--warmup", "0.2", "--clients", "2", "--depth", "4",
        "--keys", "1000", "--json", json.to_str().unwrap(),
    ]);
    assert!(text(&out.stdout).contains("p99 us"), "{}", text(&out.stdout));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for field in ["ops_per_sec", "p50_us", "p99_us", "p999_us", "max_us", "errors", "workload", "clients", "depth", "value_size", "keys"] {
        assert!(report.get(field).is_some(), "report lacks {field}: {report}");
    }
    assert_eq!(report["errors"], 0);
    assert_eq!(report["workload"], "mixed");
    assert!(report["ops_per_sec"].as_f64().unwrap() > 0.0);
    assert!(report["p50_us"].as_f64().unwrap() <= report["p99_us"].as_f64().unwrap());
    cluster.down();
}

#[test]
fn demo_prints_a_table_and_cleans_up() {
    let out = run_ok(&["demo", "--seconds", "0.5", "--keys", "500"]);
    let stdout = text(&out.stdout);
    for needle in ["ops/s", "p50 us", "p99 us", "read ", "write ", " get ", " put ", "every brick exited"] {
        assert!(stdout.contains(needle), "demo output lacks {needle:?}:\n{stdout}");
    }
}

#[test]
fn open_loop_bench_against_the_echo_floor() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("echo.json");
    run_ok(&[
        "bench", "--target", "echo", "--workload", "ycsb-b", "--rate", "4000", "--depth", "64", "--clients", "2",
        "--seconds", "1", "--warmup", "0", "--json", json.to_str().unwrap(),
    ]);
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["target"], "echo");
    assert_eq!(report["rate"], 4000.0);
    let ops = report["ops"].as_u64().unwrap();
    assert!((3000..=4800).contains(&ops), "open loop at 4000/s for 1 s did {ops} ops");
    assert_eq!(report["percentiles"].as_array().unwrap().len(), 10);
}

#[test]
fn spread_placement_puts_two_bricks_on_different_cpus() {
    let cluster = TestCluster::up_with(2, 1, &["--placement", "spread"]);
    let status = text(&run_ok(&["cluster", "status", "--dir", &cluster.dir_arg()]).stdout);
    let cpus: Vec<&str> = status.lines().filter(|l| l.contains(" up ")).filter_map(|l| l.split_whitespace().last()).collect();
    let machine = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(cpus.len(), 2, "{status}");
    if machine >= 2 {
        assert_ne!(cpus[0], cpus[1], "two bricks share a CPU on a {machine}-CPU machine: {status}");
    }
    assert!(cpus.iter().all(|c| c.parse::<usize>().is_ok()), "{status}");
    // A brick asked for a CPU it cannot run on refuses to start, saying which.
    let out = run(&["brick", "--dir", &format!("{}/x", cluster.dir_arg()), "--cpus", "4095"]);
    assert!(!out.status.success() && text(&out.stderr).contains("CPU 4095 is not one this process may run on"), "{}", text(&out.stderr));
}

#[test]
fn output_into_a_closed_pipe_ends_quietly_and_status_tells_a_stopped_cluster() {
    let mut cluster = TestCluster::up(1, 1);
    let dir = cluster.dir_arg();
    // Larger than a pipe's buffer, so the writer meets the closed pipe.
    let out = run_with_stdin(&["put", "k", "--cluster", &dir], &vec![b'v'; 1 << 20]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // `dds ... | head -c 1`: the reader goes away after the first bytes.
    for args in [vec!["cluster", "status", "--dir", &dir], vec!["get", "k", "--cluster", &dir], vec!["--help"]] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dds"))
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = [0u8; 1];
        std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut first).unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", text(&out.stderr));
        assert!(!text(&out.stderr).contains("panicked"), "{args:?}: {}", text(&out.stderr));
    }
    cluster.down();
    let out = run(&["cluster", "status", "--dir", &dir]);
    assert_eq!(out.status.code(), Some(3), "a stopped cluster's status exits 3");
    assert!(text(&out.stderr).contains("is down"), "{}", text(&out.stderr));
}

#[test]
fn the_authority_restarts_on_its_own_and_the_cluster_file_follows_one_started_by_hand() {
    let mut cluster = TestCluster::up_with(2, 1, &["--replicas", "2", "--meta-replicas", "1"]);
    let dir = cluster.dir_arg();
    run_ok(&["put", "k", "before", "--cluster", &dir]);
    let first = cluster.file().metas[0].pid;
    let out = run_ok(&["cluster", "restart", "--dir", &dir, "--meta"]);
    assert!(text(&out.stdout).contains("map authority restarted"), "{}", text(&out.stdout));
    let second = cluster.file().metas[0].pid;
    assert!(second != first && !process_alive(first) && process_alive(second));
    // By hand: stopped, then `dds meta` on the same directory and port, its path spelled
    // relative to its working directory.
    let meta = cluster.file().metas[0].clone();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(second as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    while process_alive(second) {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let mut by_hand = dds()
        .current_dir(cluster.path())
        .args(["meta", "--dir", "meta", "--listen", &meta.addr.to_string(), "--bricks", "2", "--replicas", "2", "--secret-file", "secret"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while cluster.file().metas[0].pid != by_hand.id() {
        assert!(std::time::Instant::now() < deadline, "the hand-started authority was never seen");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let status = text(&run_ok(&["cluster", "status", "--dir", &dir]).stdout);
    assert!(status.contains(&format!("(pid {}, up)", by_hand.id())), "{status}");
    run_ok(&["put", "k", "after", "--cluster", &dir]);
    assert_eq!(run_ok(&["get", "k", "--cluster", &dir]).stdout, b"after");
    cluster.down();
    let stopped = by_hand.try_wait().unwrap();
    assert!(stopped.is_some(), "`cluster down` stopped the hand-started authority too");
}

#[test]
fn a_brick_takes_its_flags_from_a_config_file_and_the_command_line_wins() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("brick.toml");
    let bdir = dir.path().join("b");
    std::fs::write(&config, format!("dir = {:?}\ncores = 2\ndurability = \"memory\"\nmetrics = \"127.0.0.1:0\"\nno-pin = true\n", bdir.to_str().unwrap())).unwrap();
    let mut brick = dds()
        .args(["brick", "--config", config.to_str().unwrap(), "--cores", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let file = loop {
        if let Ok(f) = dds::brick::BrickFile::load(&bdir) {
            break f;
        }
        assert!(std::time::Instant::now() < deadline, "the brick never served");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(file.cores, 1, "the command line's --cores wins over the file's");
    assert!(file.metrics.is_some(), "metrics from the file: {file:?}");
    let addr = file.addrs[0].to_string();
    run_ok(&["put", "k", "v", "--addr", &addr]);
    assert_eq!(run_ok(&["get", "k", "--addr", &addr]).stdout, b"v");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(brick.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(brick.wait().unwrap().success());
    std::fs::write(&config, "bogus = 1\n").unwrap();
    let out = run(&["brick", "--config", config.to_str().unwrap()]);
    assert!(!out.status.success() && text(&out.stderr).contains("`bogus` is not a flag of `dds brick`"), "{}", text(&out.stderr));
}
