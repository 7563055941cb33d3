//! Admin membership commands: `cluster undrain`, `cluster voters add|remove`, `certs revoke`.
//! Each is carried out by the Raft leader (the client finds it), for an admin certificate, and
//! audited there.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use tidepool_runtime::certs;
use tidepool_runtime::codec::MembershipOp;

use crate::conn::{connect, Conn};

/// `cluster voters`.
#[derive(Subcommand, Debug)]
pub enum VotersCmd {
    /// Make member NAME a control-plane voter (it must have joined; it is caught up as a
    /// learner first, then added by Raft joint consensus).
    Add {
        /// The member to make a voter.
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Remove NAME from the voters (it stays a learner). Use it to replace a dead voter:
    /// add the new voter first, then remove the dead one.
    Remove {
        /// The voter to remove.
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `certs revoke`.
#[derive(Args, Debug)]
pub struct RevokeArgs {
    /// The certificate to revoke (PEM); its serial and name are read from it.
    #[arg(long, conflicts_with_all = ["serial", "name"], required_unless_present = "serial")]
    pub cert: Option<PathBuf>,
    /// The serial number (hex, as `openssl x509 -serial` or the audit log shows it).
    #[arg(long, requires = "name")]
    pub serial: Option<String>,
    /// The name the certificate was issued to (recorded with the serial).
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub conn: Conn,
}

async fn run(conn: &Conn, op: MembershipOp, node: &str, serial: &str) -> Result<()> {
    let client = connect(conn).await?;
    let text = client
        .membership(op, node, serial)
        .await
        .with_context(|| format!("{} {node}", op.as_str()))?;
    if conn.json {
        println!(
            "{}",
            serde_json::json!({"op": op.as_str(), "node": node, "serial": serial, "result": text})
        );
    } else {
        println!("{text}");
    }
    client.close().await;
    Ok(())
}

pub async fn undrain(node: String, conn: Conn) -> Result<()> {
    run(&conn, MembershipOp::Undrain, &node, "").await
}

pub async fn voters(cmd: VotersCmd) -> Result<()> {
    match cmd {
        VotersCmd::Add { name, conn } => run(&conn, MembershipOp::VoterAdd, &name, "").await,
        VotersCmd::Remove { name, conn } => run(&conn, MembershipOp::VoterRemove, &name, "").await,
    }
}

pub async fn revoke(a: RevokeArgs) -> Result<()> {
    let (serial, name) = match (&a.cert, &a.serial, &a.name) {
        (Some(path), None, None) => {
            let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let der = certs::first_cert_der(&pem)
                .with_context(|| format!("{} holds no certificate", path.display()))?;
            let id = certs::identity_from_der(&der)?;
            (id.serial, id.name)
        }
        (None, Some(serial), Some(name)) => {
            let s = serial.trim().trim_start_matches("0x").replace(':', "");
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
                bail!("--serial must be hex, got {serial:?}");
            }
            (s.to_ascii_lowercase(), name.clone())
        }
        _ => bail!("give --cert PATH, or --serial HEX --name NAME"),
    };
    run(&a.conn, MembershipOp::Revoke, &name, &serial).await
}
