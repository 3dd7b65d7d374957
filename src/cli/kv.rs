//! `dds put|get|del`: one operation against a cluster.

use std::io::{IsTerminal, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;

use super::cluster::ClusterFile;
use super::ExitCode;
use crate::client::{Client, ClientConfig};

/// Where a cluster is: `dds put/get/del` and `dds bench` take it the same way.
#[derive(Args)]
pub struct Target {
    /// A local cluster's directory.
    #[arg(long, conflicts_with = "addr")]
    pub(super) cluster: Option<PathBuf>,
    /// Bricks (or the authority) by address, repeated: for a cluster that is not local.
    #[arg(long)]
    pub(super) addr: Vec<SocketAddr>,
    /// The secret of the cluster at --addr (a local cluster's is in its directory).
    #[arg(long, requires = "addr")]
    pub(super) secret_file: Option<PathBuf>,
}

impl Target {
    fn connect(&self) -> anyhow::Result<Client> {
        match (&self.cluster, self.addr.is_empty()) {
            (Some(dir), _) => ClusterFile::load(dir)?.connect(),
            (None, false) => {
                let config = ClientConfig { secret: super::load_secret(self.secret_file.as_deref())?, ..ClientConfig::default() };
                Client::connect(&self.addr, config).context("connect to the bricks")
            }
            (None, true) => bail!("say where the cluster is: --cluster DIR or --addr ADDR"),
        }
    }
}

#[derive(Args)]
pub struct KeyArgs {
    /// The key (up to 4,096 bytes).
    key: String,
    #[command(flatten)]
    target: Target,
}

#[derive(Args)]
pub struct PutArgs {
    /// The key (up to 4,096 bytes).
    key: String,
    /// The value; read from stdin (all of it, bytes as they are) when left out.
    value: Option<String>,
    #[command(flatten)]
    target: Target,
}

pub fn put(args: PutArgs) -> anyhow::Result<()> {
    let value = match args.value {
        Some(v) => v.into_bytes(),
        None => {
            let mut buf = Vec::new();
            std::io::stdin().read_to_end(&mut buf).context("read the value from stdin")?;
            buf
        }
    };
    let mut client = args.target.connect()?;
    client.put(args.key.as_bytes(), &value).with_context(|| format!("put {}", shown(&args.key)))?;
    Ok(())
}

pub fn get(args: KeyArgs) -> anyhow::Result<()> {
    let mut client = args.target.connect()?;
    match client.get(args.key.as_bytes()).with_context(|| format!("get {}", shown(&args.key)))? {
        Some(value) => {
            let mut out = std::io::stdout().lock();
            let newline: &[u8] = if out.is_terminal() { b"\n" } else { b"" };
            match out.write_all(&value).and_then(|()| out.write_all(newline)).and_then(|()| out.flush()) {
                // A reader that went away (`dds get k | head -c 10`) is no failure.
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("write the value to stdout"),
                _ => Ok(()),
            }
        }
        None => Err(ExitCode(1, format!("key not found: {}", shown(&args.key))).into()),
    }
}

pub fn del(args: KeyArgs) -> anyhow::Result<()> {
    let mut client = args.target.connect()?;
    if client.remove(args.key.as_bytes()).with_context(|| format!("del {}", shown(&args.key)))? {
        Ok(())
    } else {
        Err(ExitCode(1, format!("key not found: {}", shown(&args.key))).into())
    }
}

/// A key as messages show it: quoted, and cut after 64 characters with its length.
pub(crate) fn shown(key: &str) -> String {
    const SHOWN_CHARS_MAX: usize = 64;
    if key.chars().count() <= SHOWN_CHARS_MAX {
        return format!("{key:?}");
    }
    let head: String = key.chars().take(SHOWN_CHARS_MAX).collect();
    format!("{head:?}... ({} bytes)", key.len())
}
