//! `dds put|get|del`: one operation against a cluster.

use std::io::{IsTerminal, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;

use super::cluster::ClusterFile;
use super::ExitCode;
use crate::client::{Client, ClientConfig};

#[derive(Args)]
pub struct Target {
    /// A local cluster's directory.
    #[arg(long, conflicts_with = "brick")]
    cluster: Option<PathBuf>,
    /// Bricks by address, in cluster order (repeat the flag).
    #[arg(long)]
    brick: Vec<SocketAddr>,
}

impl Target {
    fn connect(&self) -> anyhow::Result<Client> {
        match (&self.cluster, self.brick.is_empty()) {
            (Some(dir), _) => ClusterFile::load(dir)?.connect(),
            (None, false) => Client::connect(&self.brick, ClientConfig::default()).context("connect to the bricks"),
            (None, true) => bail!("say where the cluster is: --cluster DIR or --brick ADDR"),
        }
    }
}

#[derive(Args)]
pub struct KeyArgs {
    key: String,
    #[command(flatten)]
    target: Target,
}

#[derive(Args)]
pub struct PutArgs {
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
    client.put(args.key.as_bytes(), &value).with_context(|| format!("put {:?}", args.key))?;
    Ok(())
}

pub fn get(args: KeyArgs) -> anyhow::Result<()> {
    let mut client = args.target.connect()?;
    match client.get(args.key.as_bytes()).with_context(|| format!("get {:?}", args.key))? {
        Some(value) => {
            let mut out = std::io::stdout().lock();
            out.write_all(&value)?;
            if out.is_terminal() {
                out.write_all(b"\n")?;
            }
            out.flush()?;
            Ok(())
        }
        None => Err(ExitCode(1, format!("key not found: {:?}", args.key)).into()),
    }
}

pub fn del(args: KeyArgs) -> anyhow::Result<()> {
    let mut client = args.target.connect()?;
    if client.remove(args.key.as_bytes()).with_context(|| format!("del {:?}", args.key))? {
        Ok(())
    } else {
        Err(ExitCode(1, format!("key not found: {:?}", args.key)).into())
    }
}
