//! The `dds` command line (the contract is in DESIGN.md section 5). This is binary-side
//! code: it reports errors with `anyhow`, everything under it returns typed errors.

mod bench;
pub mod cluster;
mod kv;
mod suite;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use dds_transport::auth::Secret;

use crate::brick::{self, BrickConfig, Durability};
use crate::map::DEFAULT_PARTITION_BITS;
use crate::log::LogIo;

/// Writes to stdout like `print!`/`println!`, but a reader that went away (`dds cluster
/// status | head -1`) is no panic: the rest of the output is dropped and the command
/// goes on (a demo still stops its cluster, a bench still writes its JSON) and exits
/// as it would have.
macro_rules! out {
    () => { $crate::cli::write_out(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::cli::write_out(format_args!("{}\n", format_args!($($arg)*))) };
}

macro_rules! out_part {
    ($($arg:tt)*) => { $crate::cli::write_out(format_args!($($arg)*)) };
}

pub(crate) use {out, out_part};

pub(crate) fn write_out(args: std::fmt::Arguments) {
    use std::io::Write;
    static CLOSED: AtomicBool = AtomicBool::new(false);
    if CLOSED.load(std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        CLOSED.store(true, std::sync::atomic::Ordering::Relaxed);
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("dds: cannot write to stdout: {e}; the rest of the output is dropped");
        }
    }
}

/// An error that asks for a particular exit status (a missing key exits 1).
#[derive(Debug, thiserror::Error)]
#[error("{1}")]
pub struct ExitCode(pub i32, pub String);

#[derive(Parser)]
#[command(name = "dds", version, about = "A replicated, partitioned, persistent hash table")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a local cluster, load it, benchmark gets and puts, print a table, shut down.
    Demo(bench::DemoArgs),
    /// Manage a local cluster of brick processes kept in a directory.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Run one brick in the foreground until SIGTERM or SIGINT.
    #[command(args_override_self = true)]
    Brick(BrickArgs),
    /// Run the map authority in the foreground until SIGTERM or SIGINT.
    #[command(args_override_self = true)]
    Meta(MetaArgs),
    /// Store a value (from the argument, or stdin when it is left out).
    Put(kv::PutArgs),
    /// Print the value stored under a key (exit 1 if there is none).
    Get(kv::KeyArgs),
    /// Remove a key (exit 1 if there was none).
    Del(kv::KeyArgs),
    /// Load against a cluster (or Redis, memcached, the echo floor), with a latency and
    /// throughput report.
    Bench(bench::BenchArgs),
    /// dds beside Redis, memcached and the echo floor, same load generator, one run.
    Suite(suite::SuiteArgs),
    /// Make a new cluster secret (mode 0600) for processes started by hand, which take
    /// it as --secret-file (`cluster up` makes its own).
    Secret(SecretArgs),
    /// List the map authority group's members, or take one out (`--remove`), through
    /// any member: for members started by hand (`cluster meta` serves a local cluster;
    /// `dds meta --join` adds one).
    Members(MembersArgs),
}

#[derive(Args)]
struct MembersArgs {
    /// A member's address (repeat for more: any one that answers will do; followers
    /// name the leader).
    #[arg(long = "meta", required = true)]
    meta: Vec<SocketAddr>,
    /// Take member ID out of the group, once raft has committed that (its process is
    /// left running: stop it yourself; a leader hands over first).
    #[arg(long)]
    remove: Option<u64>,
    /// The cluster's secret, as the members were given it.
    #[arg(long)]
    secret_file: Option<PathBuf>,
}

#[derive(Args)]
struct SecretArgs {
    /// The file to write (one that exists is never replaced).
    path: PathBuf,
    /// Print the metrics bearer token of the secret already in PATH instead (what a
    /// Prometheus scrape presents: `Authorization: Bearer <token>`).
    #[arg(long)]
    metrics_token: bool,
}

#[derive(Args)]
struct BrickArgs {
    /// A TOML file of these flags by their long names (`cores = 2`, `busy-poll = true`);
    /// flags given on the command line win.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Directory for this brick's state.
    #[arg(long)]
    dir: PathBuf,
    /// Address of core 0; core i listens on port+i (port 0: any free ports).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// A map authority member's address (repeat it for every member: the brick finds
    /// the leader); without any, the brick runs alone (one replica).
    #[arg(long)]
    meta: Vec<SocketAddr>,
    /// Brick id to ask the authority for on first start (kept in the brick's directory).
    #[arg(long)]
    id: Option<u32>,
    /// Worker threads, one per core [default: all cores].
    #[arg(long)]
    cores: Option<usize>,
    /// Partition count is 2^bits (the cluster's bricks must agree).
    #[arg(long, default_value_t = DEFAULT_PARTITION_BITS, value_parser = clap::value_parser!(u8).range(0..=16))]
    partition_bits: u8,
    /// Poll without sleeping this long after the last request.
    #[arg(long, default_value_t = 50)]
    spin_us: u64,
    /// Never sleep in the kernel (dedicated hardware only).
    #[arg(long)]
    busy_poll: bool,
    /// The CPUs the brick's cores are pinned to, core i on the i-th (a list such as
    /// `0,2` or `1-3`) [default: every CPU this process may run on, in order].
    #[arg(long, value_parser = parse_cpus, conflicts_with = "no_pin")]
    cpus: Option<CpuList>,
    /// Do not pin worker threads to CPUs: the kernel places them (best when the brick
    /// shares its CPUs with other processes).
    #[arg(long)]
    no_pin: bool,
    /// When a write is acknowledged: after its fdatasync (sync) or once applied in memory
    /// and handed to the kernel (memory).
    #[arg(long, value_enum, default_value_t = Durability::Sync)]
    durability: Durability,
    /// How each core's log writes and fdatasyncs reach the kernel: syscalls on the core's
    /// thread, or through an io_uring (its fsyncs run on a kernel worker).
    #[arg(long, value_enum, default_value_t = LogIo::Syscalls)]
    log_io: LogIo,
    /// One port per core, overriding --listen's port (used by `cluster restart`).
    #[arg(long, value_delimiter = ',')]
    ports: Option<Vec<u16>>,
    /// A core's log past this many MiB, or past the bytes the core holds if more,
    /// starts a checkpoint, after which the log before it is deleted.
    #[arg(long, default_value_t = 64.0)]
    checkpoint_log_mb: f64,
    /// Keep values in the log segments, not in memory: memory holds the keys, each
    /// value's place in the log, and a cache of this many MiB of values; other values
    /// are read back from disk. Without it every value is kept in memory. A directory
    /// keeps the choice it was first started with.
    #[arg(long)]
    cache_mb: Option<f64>,
    /// Serve RDMA beside TCP (rdma, auto) when a verbs device opens; without one the
    /// brick logs why and serves TCP only.
    #[arg(long, value_enum, default_value_t = cluster::TransportKind::Tcp)]
    transport: cluster::TransportKind,
    /// Serve Prometheus metrics over HTTP at this address (`/metrics`; port 0: any free
    /// port, written to brick.json and the log).
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// The cluster's secret (`cluster up` writes one to <dir>/secret): every connection
    /// to this brick, and its own to the authority and its peers, proves it. Without
    /// it the brick serves anyone who reaches its ports.
    #[arg(long)]
    secret_file: Option<PathBuf>,
}

#[derive(Args)]
struct MetaArgs {
    /// A TOML file of these flags by their long names (`bricks = 3`, `replicas = 2`);
    /// flags given on the command line win.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Directory for the map (`map.json`).
    #[arg(long)]
    dir: PathBuf,
    /// Address to serve bricks and clients on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Bricks to wait for before the first map.
    #[arg(long)]
    bricks: usize,
    /// Replicas of every partition.
    #[arg(long, default_value_t = 2)]
    replicas: usize,
    /// Partition count is 2^bits at the start (the bricks must agree).
    #[arg(long, default_value_t = DEFAULT_PARTITION_BITS, value_parser = clap::value_parser!(u8).range(0..=16))]
    partition_bits: u8,
    /// Serve Prometheus metrics over HTTP at this address (`/metrics`; port 0: any free
    /// port, written to meta.json and the log).
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// The cluster's secret: every brick, client and tool proves it before its first
    /// request. Without it the authority serves anyone who reaches its port.
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// This process's id in the authority group (with --member).
    #[arg(long, default_value_t = 1)]
    id: u64,
    /// A member of the authority group, as ID=ADDR; give every member, this one
    /// included (its ADDR is --listen's). Without any, the authority is a group of one.
    #[arg(long = "member", value_parser = parse_member)]
    members: Vec<(u64, SocketAddr)>,
    /// Join a running authority group through any of its members (repeat for more
    /// seeds): its leader adds this process as member --id (a new id: see `dds cluster
    /// meta add`) at --listen's address. Only a new --dir joins; later starts need none
    /// of --join or --member (the raft log holds the group).
    #[arg(long, conflicts_with = "members")]
    join: Vec<SocketAddr>,
}

/// `ID=ADDR` of `--member`.
fn parse_member(text: &str) -> Result<(u64, SocketAddr), String> {
    let (id, addr) = text.split_once('=').ok_or("expected ID=ADDR, for example 1=127.0.0.1:7000")?;
    let id: u64 = id.parse().map_err(|e| format!("member id {id:?}: {e}"))?;
    if id == 0 {
        return Err("member ids start at 1".into());
    }
    Ok((id, addr.parse().map_err(|e| format!("member address {addr:?}: {e}"))?))
}

/// MiB from the command line to bytes, at least one KiB.
/// Where `--cache-mb` says values live.
pub fn values_in(cache_mb: Option<f64>) -> anyhow::Result<brick::ValuesIn> {
    match cache_mb {
        None => Ok(brick::ValuesIn::Memory),
        Some(mb) if mb.is_finite() && mb >= 0.0 => Ok(brick::ValuesIn::Log { cache_bytes: (mb * 1024.0 * 1024.0) as u64 }),
        Some(mb) => anyhow::bail!("--cache-mb must be a size in MiB, 0 or more (got {mb})"),
    }
}

pub fn mib_to_bytes(mib: f64) -> anyhow::Result<u64> {
    if !(mib.is_finite() && mib * 1024.0 >= 1.0) {
        anyhow::bail!("--checkpoint-log-mb must be at least 1/1024 (one KiB)");
    }
    Ok((mib * 1024.0 * 1024.0) as u64)
}

/// The CPUs this process may run on (its affinity mask), in order.
pub(crate) fn allowed_cpus() -> Vec<usize> {
    core_affinity::get_core_ids().unwrap_or_default().into_iter().map(|c| c.id).collect()
}

/// The CPUs a brick pins its cores to: `--cpus` (each one this process may use), or
/// every allowed CPU; none under `--no-pin`.
fn pinned_cpus(no_pin: bool, asked: Option<CpuList>) -> anyhow::Result<Option<Vec<usize>>> {
    let allowed = allowed_cpus();
    match asked {
        _ if no_pin => Ok(None),
        None if allowed.is_empty() => Ok(None),
        None => Ok(Some(allowed)),
        Some(CpuList(cpus)) => match cpus.iter().find(|c| !allowed.contains(c)) {
            Some(c) => anyhow::bail!("--cpus: CPU {c} is not one this process may run on (allowed: {allowed:?})"),
            None => Ok(Some(cpus)),
        },
    }
}

/// CPU numbers, as `--cpus` takes them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuList(pub Vec<usize>);

/// `0,2`, `1-3` or a mix of both: CPU numbers, each at most once.
pub fn parse_cpus(text: &str) -> Result<CpuList, String> {
    let mut cpus = Vec::new();
    for part in text.split(',').map(str::trim) {
        let number = |s: &str| s.trim().parse::<usize>().map_err(|_| format!("{s:?} is not a CPU number (expected a list such as 0,2 or 1-3)"));
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (number(a)?, number(b)?),
            None => (number(part)?, number(part)?),
        };
        if first > last || last >= 4096 {
            return Err(format!("{part:?} is not a CPU range"));
        }
        for cpu in first..=last {
            if cpus.contains(&cpu) {
                return Err(format!("CPU {cpu} is listed twice"));
            }
            cpus.push(cpu);
        }
    }
    Ok(CpuList(cpus))
}

pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

pub fn main() -> anyhow::Result<()> {
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let cli = Cli::parse_from(with_config_file(std::env::args_os().collect())?);
    match cli.command {
        Command::Demo(args) => bench::demo(args),
        Command::Cluster(cmd) => cluster::run(cmd),
        Command::Brick(args) => {
            crate::logging::fail_stop_on_panic();
            run_brick(args)
        }
        Command::Meta(args) => {
            crate::logging::fail_stop_on_panic();
            run_meta(args)
        }
        Command::Put(args) => kv::put(args),
        Command::Get(args) => kv::get(args),
        Command::Del(args) => kv::del(args),
        Command::Bench(args) => bench::bench(args),
        Command::Suite(args) => suite::suite(args),
        Command::Members(args) => {
            let secret = load_secret(args.secret_file.as_deref())?;
            let request = match args.remove {
                Some(id) => crate::proto::MemberRequest::Remove { id },
                None => crate::proto::MemberRequest::List,
            };
            let list = crate::rpc::ask_members(&args.meta, &request, secret.as_deref(), std::time::Duration::from_secs(15)).map_err(|e| anyhow::anyhow!("{e}"))?;
            if let Some(id) = args.remove {
                out!("member {id} removed from the group (stop its process)");
            }
            for (id, addr) in &list.members {
                let said = crate::rpc::member_status(*addr, std::time::Duration::from_millis(500), secret.as_deref());
                let role = match said {
                    Ok(s) => s.role(),
                    Err(e) => format!("not answering: {e}"),
                };
                out!("member {id} at {addr}: {role}");
            }
            out!("{} member(s); the next to join takes id {} or above", list.members.len(), list.next_id);
            Ok(())
        }
        Command::Secret(args) if args.metrics_token => {
            out!("{}", Secret::load(&args.path)?.metrics_token());
            Ok(())
        }
        Command::Secret(args) => {
            let secret = Secret::create(&args.path)?;
            out!("cluster {:016x}: secret written to {} (mode 0600); give it to every process as --secret-file", secret.cluster_id(), args.path.display());
            Ok(())
        }
    }
}

/// `dds brick --config FILE` and `dds meta --config FILE`: the file (TOML) holds the
/// subcommand's flags by their long names (`cores = 2`, `busy-poll = true`,
/// `metrics = "127.0.0.1:9100"`, a list as an array). A flag the command line gives,
/// or one that conflicts with a flag it gives, is taken from the command line and not
/// from the file; a flag the file turns on cannot be turned off there.
fn with_config_file(mut args: Vec<std::ffi::OsString>) -> anyhow::Result<Vec<std::ffi::OsString>> {
    let Some(sub) = args.get(1).and_then(|a| a.to_str()).filter(|a| ["brick", "meta"].contains(a)) else { return Ok(args) };
    let sub = sub.to_string();
    // The long flags the command line gives (`--x v` or `--x=v`).
    let given: Vec<String> = args.iter().skip(2).filter_map(|a| a.to_str()?.strip_prefix("--").map(|f| f.split('=').next().unwrap_or(f).to_string())).collect();
    let paths: Vec<PathBuf> = args
        .iter()
        .enumerate()
        .skip(2)
        .filter_map(|(i, a)| match a.to_str()? {
            "--config" => args.get(i + 1).map(PathBuf::from),
            a => a.strip_prefix("--config=").map(PathBuf::from),
        })
        .collect();
    let path = match paths.as_slice() {
        [] => return Ok(args),
        [path] => path.clone(),
        _ => anyhow::bail!("--config is given {} times; give one file", paths.len()),
    };
    let text = std::fs::read_to_string(&path).with_context(|| format!("read the config file {}", path.display()))?;
    let table: toml::Table = text.parse().with_context(|| format!("parse the config file {} (TOML)", path.display()))?;
    let command = <Cli as clap::CommandFactory>::command();
    let Some(command) = command.find_subcommand(&sub) else { return Ok(args) };
    let arg_of = |long: &str| command.get_arguments().find(|a| a.get_long() == Some(long));
    // Given on the command line, or in conflict with a flag given there.
    let conflict = |a: &clap::Arg, b: &clap::Arg| command.get_arg_conflicts_with(a).iter().any(|c| c.get_id() == b.get_id());
    let overridden = |key: &str| {
        given.iter().any(|g| g == key)
            || arg_of(key).is_some_and(|k| given.iter().filter_map(|g| arg_of(g)).any(|g| conflict(k, g) || conflict(g, k)))
    };
    let mut flags: Vec<std::ffi::OsString> = Vec::new();
    for (key, value) in table {
        if key == "config" || arg_of(&key).is_none() {
            anyhow::bail!("config file {}: `{key}` is not a flag of `dds {sub}` (keys are long flag names, such as busy-poll)", path.display());
        }
        if overridden(&key) {
            continue;
        }
        let scalar = |v: &toml::Value| match v {
            toml::Value::String(s) => Some(s.clone()),
            toml::Value::Integer(n) => Some(n.to_string()),
            toml::Value::Float(x) => Some(x.to_string()),
            _ => None,
        };
        let value = match &value {
            toml::Value::Boolean(true) => None,
            toml::Value::Boolean(false) => continue,
            toml::Value::Array(items) => {
                let items: Option<Vec<String>> = items.iter().map(scalar).collect();
                Some(items.with_context(|| format!("config file {}: `{key}` must be a list of strings or numbers", path.display()))?.join(","))
            }
            other => Some(scalar(other).with_context(|| format!("config file {}: `{key}` must be a string, number, boolean or list", path.display()))?),
        };
        // `--key=value`, so a value that starts with `-` is not taken for a flag.
        flags.push(value.map_or(format!("--{key}"), |v| format!("--{key}={v}")).into());
    }
    args.splice(2..2, flags);
    Ok(args)
}

/// The secret in `file`, if one is given.
pub(crate) fn load_secret(file: Option<&Path>) -> anyhow::Result<Option<Arc<Secret>>> {
    file.map(|f| Secret::load(f).map(Arc::new)).transpose().context("--secret-file")
}

/// The secret a brick or authority serves with; without one it says, once, that it is
/// open to anyone.
fn served_secret(file: Option<&Path>, who: &str) -> anyhow::Result<Option<Arc<Secret>>> {
    let secret = load_secret(file)?;
    match &secret {
        Some(s) => crate::log!(who, "connections must prove the secret of cluster {:016x}", s.cluster_id()),
        None => crate::log!(warn: who, "no --secret-file: anyone who reaches this process's ports is served"),
    }
    Ok(secret)
}

fn stop_on_signals() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&stop)).context("install signal handler")?;
    }
    Ok(stop)
}

fn run_meta(args: MetaArgs) -> anyhow::Result<()> {
    if args.bricks == 0 || args.replicas == 0 || args.replicas > args.bricks {
        anyhow::bail!("--replicas {} needs at least that many --bricks (got {})", args.replicas, args.bricks);
    }
    if !args.join.is_empty() && args.listen.ip().is_unspecified() {
        anyhow::bail!("--join: the group reaches this member at --listen's address, so it must be one they can reach (not {})", args.listen.ip());
    }
    let config = crate::meta::MetaConfig {
        dir: args.dir,
        listen: args.listen,
        authority: crate::meta::authority::AuthorityConfig {
            bricks: args.bricks,
            replicas: args.replicas,
            base_bits: args.partition_bits,
            rereplicate_after_ms: crate::meta::authority::REREPLICATE_AFTER_MS,
        },
        metrics: args.metrics,
        secret: served_secret(args.secret_file.as_deref(), "meta")?,
        id: args.id,
        members: args.members,
        join: args.join,
    };
    crate::meta::run(&config, stop_on_signals()?)?;
    Ok(())
}

fn run_brick(args: BrickArgs) -> anyhow::Result<()> {
    let stop = stop_on_signals()?;
    let config = BrickConfig {
        dir: args.dir,
        listen: args.listen,
        cores: args.cores.unwrap_or_else(available_cores),
        partition_bits: args.partition_bits,
        spin_us: args.spin_us,
        busy_poll: args.busy_poll,
        cpus: pinned_cpus(args.no_pin, args.cpus)?,
        durability: args.durability,
        log_io: args.log_io,
        ports: args.ports,
        checkpoint_log_bytes: mib_to_bytes(args.checkpoint_log_mb)?,
        values: values_in(args.cache_mb)?,
        meta: args.meta,
        id: args.id,
        rdma: args.transport != cluster::TransportKind::Tcp,
        metrics: args.metrics,
        secret: served_secret(args.secret_file.as_deref(), "brick")?,
    };
    brick::run(&config, stop)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cpu_lists_parse_and_refuse_what_is_not_one() {
        assert_eq!(parse_cpus("0,2"), Ok(CpuList(vec![0, 2])));
        assert_eq!(parse_cpus("1-3,5"), Ok(CpuList(vec![1, 2, 3, 5])));
        assert_eq!(parse_cpus(" 4 "), Ok(CpuList(vec![4])));
        for bad in ["", "a", "3-1", "1,1", "0-1,1", "-1", "1-"] {
            assert!(parse_cpus(bad).is_err(), "{bad:?} was accepted");
        }
    }

    /// Every argument of every subcommand, with no help text: `command path: --arg`.
    fn undescribed(cmd: &clap::Command, path: &str, found: &mut Vec<String>) {
        let path = format!("{path} {}", cmd.get_name());
        for arg in cmd.get_arguments() {
            let builtin = matches!(arg.get_id().as_str(), "help" | "version");
            if !builtin && arg.get_help().is_none() && arg.get_long_help().is_none() {
                found.push(format!("{path}: {}", arg.get_long().map_or(arg.get_id().to_string(), |l| format!("--{l}"))));
            }
        }
        for sub in cmd.get_subcommands() {
            if cmd.get_subcommands().count() > 0 && sub.get_about().is_none() && sub.get_name() != "help" {
                found.push(format!("{path} {}: no description", sub.get_name()));
            }
            undescribed(sub, &path, found);
        }
    }

    #[test]
    fn every_option_of_every_subcommand_has_a_description_in_help() {
        let mut found = Vec::new();
        undescribed(&Cli::command(), "", &mut found);
        assert!(found.is_empty(), "options without a description in --help:\n{}", found.join("\n"));
    }
}
