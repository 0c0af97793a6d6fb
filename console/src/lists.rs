//! List commands (`job list`, `vm list`, `agent list`, `group list`, `group show`, `rp list`,
//! `ls`): with `--limit N` one page (JSON `{items, next}`), without it every page in turn,
//! printed as one document (the JSON array or the table) while the pages arrive, so the
//! console's memory stays bounded however long the list. Text that came from the coordinator
//! is escaped ([`bulwark_protocol::text`]) so a hostile name cannot drive the terminal.

use crate::Output;
use bulwark_coordinator::admin_client::{AdminClient, AdminClientError};
use bulwark_protocol::messages::{
    AdminRequest, AdminResponse, AgentInfo, GroupInfo, ItemInfo, JobInfo, RecoveryPointInfo, VmSummary,
};
use bulwark_protocol::paging::{Page, PageRequest};
use bulwark_protocol::text::Escaped;
use std::io::Write;

/// `--limit N` and `--after CURSOR` of every list command.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PageArgs {
    /// Print one page of at most N items (JSON: `{items, next}`); without it, print everything.
    #[arg(long, value_name = "N")]
    pub limit: Option<u32>,
    /// Start after this cursor (the `next` of the page before).
    #[arg(long, value_name = "CURSOR")]
    pub after: Option<String>,
}

impl PageArgs {
    fn first(&self) -> PageRequest {
        PageRequest { limit: self.limit, after: self.after.clone() }
    }
}

/// How a list's items print.
pub(crate) trait Row: Sized {
    /// The page in an answer, if the answer is this list's.
    fn take(answer: AdminResponse) -> Option<Page<Self>>;
    fn json(&self) -> serde_json::Value;
    /// The table's header line, if the list prints as a table.
    fn header() -> Option<String>;
    fn text(&self, out: &mut dyn Write) -> std::io::Result<()>;
    /// Fetches what the page left out of an item (a group's further members).
    async fn complete(&mut self, _client: &AdminClient) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Fetches the list `make` asks for and prints it: one page with `--limit`, else all of them.
pub async fn print_list<T: Row>(
    client: &AdminClient,
    make: impl Fn(PageRequest) -> AdminRequest,
    args: &PageArgs,
    format: Output,
) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut req = args.first();
    let mut first = true;
    if args.limit.is_some() {
        let mut page = fetch::<T>(client, make(req)).await?;
        for item in &mut page.items {
            item.complete(client).await?;
        }
        match format {
            Output::Json => {
                let items: Vec<_> = page.items.iter().map(Row::json).collect();
                writeln!(out, "{}", serde_json::json!({ "items": items, "next": page.next }))?;
            }
            Output::Text => {
                if let Some(h) = T::header() {
                    writeln!(out, "{h}")?;
                }
                for item in &page.items {
                    item.text(&mut out)?;
                }
                if let Some(next) = &page.next {
                    eprintln!("more: --after {next}");
                }
            }
        }
        out.flush()?;
        return Ok(());
    }
    match format {
        Output::Json => write!(out, "[")?,
        Output::Text => {
            if let Some(h) = T::header() {
                writeln!(out, "{h}")?;
            }
        }
    }
    loop {
        let mut page = fetch::<T>(client, make(req.clone())).await?;
        for item in &mut page.items {
            item.complete(client).await?;
            match format {
                Output::Json => {
                    if !first {
                        write!(out, ",")?;
                    }
                    write!(out, "{}", item.json())?;
                }
                Output::Text => item.text(&mut out)?,
            }
            first = false;
        }
        out.flush()?;
        match page.next {
            Some(next) => req = req.after(next),
            None => break,
        }
    }
    if format == Output::Json {
        writeln!(out, "]")?;
    }
    out.flush()?;
    Ok(())
}

async fn fetch<T: Row>(client: &AdminClient, req: AdminRequest) -> anyhow::Result<Page<T>> {
    T::take(client.request(req).await?).ok_or_else(|| anyhow::anyhow!("unexpected answer to a list request"))
}

/// `group show NAME`: with `--limit`, one page of its members (`{items, next}`); else the group
/// with all its members, as before.
pub async fn group_show(client: &AdminClient, name: &str, args: &PageArgs, format: Output) -> anyhow::Result<()> {
    let req = AdminRequest::GroupShow { name: name.to_owned(), page: args.first() };
    let AdminResponse::Group(mut g) = client.request(req).await? else { anyhow::bail!("unexpected answer") };
    if args.limit.is_some() {
        match format {
            Output::Json => println!("{}", serde_json::json!({ "items": g.members, "next": g.members_next })),
            Output::Text => {
                for m in &g.members {
                    println!("{}", Escaped(m));
                }
                if let Some(next) = &g.members_next {
                    eprintln!("more: --after {next}");
                }
            }
        }
        return Ok(());
    }
    g.complete(client).await?;
    match format {
        Output::Json => println!("{}", g.json()),
        Output::Text => {
            let mut out = std::io::stdout().lock();
            g.text(&mut out)?;
        }
    }
    Ok(())
}

fn fmt_time(secs: Option<u64>) -> String {
    crate::fmt_time(secs)
}

fn fmt_size(n: u64) -> String {
    bulwark_protocol::units::format_size(n)
}

/// A job as JSON (CONTRACT: `job show`).
pub fn job_json(j: &JobInfo) -> serde_json::Value {
    serde_json::json!({
        "id": j.id,
        "kind": j.kind,
        "vm": j.vm,
        "state": j.state,
        "started_at": j.started_at.map(|s| fmt_time(Some(s))),
        "finished_at": j.finished_at.map(|s| fmt_time(Some(s))),
        "bytes_transferred": j.bytes_transferred,
        "bytes_total": j.bytes_total,
        "bytes_scanned": j.bytes_scanned,
        "blocks_changed": j.blocks_changed,
        "consistency": j.consistency,
        "error": j.error,
        "detail": j.detail,
    })
}

impl Row for JobInfo {
    fn take(answer: AdminResponse) -> Option<Page<Self>> {
        match answer {
            AdminResponse::Jobs(p) => Some(p),
            _ => None,
        }
    }
    fn json(&self) -> serde_json::Value {
        job_json(self)
    }
    fn header() -> Option<String> {
        Some(format!(
            "{:>6} {:<18} {:<16} {:<10} {:<22} {:>14}",
            "ID", "KIND", "VM", "STATE", "FINISHED", "BYTES SCANNED"
        ))
    }
    fn text(&self, out: &mut dyn Write) -> std::io::Result<()> {
        writeln!(
            out,
            "{:>6} {:<18} {:<16} {:<10} {:<22} {:>14}",
            self.id,
            Escaped(&self.kind),
            Escaped(self.vm.as_deref().unwrap_or("-")),
            Escaped(&self.state),
            fmt_time(self.finished_at),
            self.bytes_scanned
        )
    }
}

impl Row for VmSummary {
    fn take(answer: AdminResponse) -> Option<Page<Self>> {
        match answer {
            AdminResponse::Vms(p) => Some(p),
            _ => None,
        }
    }
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id, "name": self.name, "uuid": self.uuid, "cluster": self.cluster, "owner": self.owner,
            "status": self.status, "status_reason": self.status_reason,
            "host": self.host, "state": self.state, "os": self.os, "group": self.group, "replica_state": self.replica_state, "replica_reason": self.replica_reason,
            "excluded_bytes": self.excluded_bytes,
            "left_out": self.left_out,
            "disks": self.disks.iter().map(|d| serde_json::json!({"name": d.name.as_str(), "size_bytes": d.size_bytes})).collect::<Vec<_>>(),
        })
    }
    fn header() -> Option<String> {
        Some(format!(
            "{:<20} {:<16} {:<12} {:<8} {:<8} {:<14} {:<16} {:<13}",
            "VM", "HOST", "CLUSTER", "STATE", "OS", "GROUP", "STATUS", "REPLICA"
        ))
    }
    fn text(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let reason = self.replica_reason.as_deref().map(|r| format!(" ({})", Escaped(r))).unwrap_or_default();
        let status =
            self.status_reason.as_deref().map(|r| format!(" [{}: {}]", self.status, Escaped(r))).unwrap_or_default();
        writeln!(
            out,
            "{:<20} {:<16} {:<12} {:<8} {:<8} {:<14} {:<16} {}{}{}",
            Escaped(&self.name),
            Escaped(&self.host),
            Escaped(&self.cluster),
            Escaped(&self.state),
            Escaped(&self.os),
            Escaped(self.group.as_deref().unwrap_or("-")),
            Escaped(&self.status),
            Escaped(&self.replica_state),
            reason,
            status
        )
    }
}

/// An agent as JSON (CONTRACT: `agent list`).
pub fn agent_json(a: &AgentInfo) -> serde_json::Value {
    serde_json::json!({
        "host": a.host.as_str(),
        "cluster": a.cluster,
        "connected": a.connected,
        "last_seen": a.last_seen.map(|s| fmt_time(Some(s))),
        "cert_serial": a.cert_serial,
        "vms": a.vms,
        "revoked": a.revoked,
        "agent_version": a.agent_version,
        "remote_addr": a.remote_addr,
    })
}

impl Row for AgentInfo {
    fn take(answer: AdminResponse) -> Option<Page<Self>> {
        match answer {
            AdminResponse::Agents(p) => Some(p),
            _ => None,
        }
    }
    fn json(&self) -> serde_json::Value {
        agent_json(self)
    }
    fn header() -> Option<String> {
        Some(format!(
            "{:<24} {:<24} {:<10} {:<22} {:<34} {:>4}",
            "HOST", "CLUSTER", "STATE", "LAST SEEN", "CERT SERIAL", "VMS"
        ))
    }
    fn text(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let state = if self.revoked {
            "revoked"
        } else if self.connected {
            "connected"
        } else {
            "offline"
        };
        writeln!(
            out,
            "{:<24} {:<24} {:<10} {:<22} {:<34} {:>4}",
            self.host,
            Escaped(&self.cluster),
            state,
            fmt_time(self.last_seen),
            Escaped(&self.cert_serial),
            self.vms
        )
    }
}

/// A group as JSON.
pub fn group_json(g: &GroupInfo) -> serde_json::Value {
    let p = &g.policy;
    let hhmm = |t: &u16| bulwark_coordinator::policy::format_hhmm(*t);
    serde_json::json!({
        "name": g.name,
        "members": g.members,
        "sync_every": p.sync_every_secs.map(|s| humantime::format_duration(std::time::Duration::from_secs(s)).to_string()),
        "recovery_points": p.recovery_points.iter().map(hhmm).collect::<Vec<_>>(),
        "express_full_before_rp": p.express_full_before_rp,
        "retention": humantime::format_duration(std::time::Duration::from_secs(p.retention_secs)).to_string(),
        "cc_when_inconsistent": p.cc_when_inconsistent,
        "cc_at": p.cc_at.as_ref().map(hhmm),
        "replica": p.replica_creation,
        "block_size": p.block_size,
        "exclude_disks": p.exclude_disks.iter().map(|(v, d)| format!("{v}:{d}")).collect::<Vec<_>>(),
        "verify": p.verify.as_str(),
        "auto_cluster": g.auto_cluster,
        "next_runs": g.next_runs.iter().map(|(k, at)| (k.clone(), serde_json::Value::String(fmt_time(Some(*at))))).collect::<serde_json::Map<_, _>>(),
    })
}

/// A group as text.
pub fn print_group(g: &GroupInfo, out: &mut dyn Write) -> std::io::Result<()> {
    let p = &g.policy;
    writeln!(out, "group {}", Escaped(&g.name))?;
    let members: Vec<String> = g.members.iter().map(|m| Escaped(m).to_string()).collect();
    writeln!(out, "  members            {}", members.join(", "))?;
    if let Some(c) = &g.auto_cluster {
        writeln!(out, "  protects           every VM of cluster {} this coordinator owns", Escaped(c))?;
    }
    let every = p
        .sync_every_secs
        .map_or("off".into(), |s| humantime::format_duration(std::time::Duration::from_secs(s)).to_string());
    if p.express_full_before_rp {
        writeln!(out, "  synchronization    express full just before each recovery point")?;
    } else {
        writeln!(out, "  synchronization    every {every}")?;
    }
    let rps: Vec<String> = p.recovery_points.iter().map(|t| bulwark_coordinator::policy::format_hhmm(*t)).collect();
    writeln!(out, "  recovery points    {}", if rps.is_empty() { "none".into() } else { rps.join(", ") })?;
    writeln!(
        out,
        "  retention          {}",
        humantime::format_duration(std::time::Duration::from_secs(p.retention_secs))
    )?;
    writeln!(out, "  replica creation   {}", Escaped(&p.replica_creation))?;
    writeln!(out, "  block size         {}", fmt_size(u64::from(p.block_size)))?;
    let cc = match (p.cc_when_inconsistent, p.cc_at) {
        (true, Some(t)) => format!("when inconsistent, and daily at {}", bulwark_coordinator::policy::format_hhmm(t)),
        (true, None) => "when inconsistent".into(),
        (false, Some(t)) => format!("daily at {}", bulwark_coordinator::policy::format_hhmm(t)),
        (false, None) => "only when asked".into(),
    };
    writeln!(out, "  consistency check  {cc}")?;
    writeln!(out, "  verification       {}", p.verify.as_str())?;
    if !p.exclude_disks.is_empty() {
        let left: Vec<String> = p.exclude_disks.iter().map(|(v, d)| format!("{}:{}", Escaped(v), Escaped(d))).collect();
        writeln!(out, "  disks left out     {}", left.join(", "))?;
    }
    for (kind, at) in &g.next_runs {
        writeln!(out, "  next {:<13} {}", Escaped(kind), fmt_time(Some(*at)))?;
    }
    Ok(())
}

/// The members a group answer left out: every further page of them.
pub async fn complete_members(client: &AdminClient, g: &mut GroupInfo) -> Result<(), AdminClientError> {
    while let Some(after) = g.members_next.take() {
        let req =
            AdminRequest::GroupShow { name: g.name.clone(), page: PageRequest { limit: None, after: Some(after) } };
        let AdminResponse::Group(more) = client.request(req).await? else {
            return Err(AdminClientError::Invalid("unexpected answer to group show".into()));
        };
        g.members.extend(more.members);
        g.members_next = more.members_next;
    }
    Ok(())
}

impl Row for GroupInfo {
    fn take(answer: AdminResponse) -> Option<Page<Self>> {
        match answer {
            AdminResponse::Groups(p) => Some(p),
            _ => None,
        }
    }
    fn json(&self) -> serde_json::Value {
        group_json(self)
    }
    fn header() -> Option<String> {
        None
    }
    fn text(&self, out: &mut dyn Write) -> std::io::Result<()> {
        print_group(self, out)
    }
    async fn complete(&mut self, client: &AdminClient) -> anyhow::Result<()> {
        Ok(complete_members(client, self).await?)
    }
}

impl Row for RecoveryPointInfo {
    fn take(answer: AdminResponse) -> Option<Page<Self>> {
        match answer {
            AdminResponse::RecoveryPoints(p) => Some(p),
            _ => None,
        }
    }
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id, "vm": self.vm, "created_at": fmt_time(Some(self.created_at / 1000)),
            "consistency": self.consistency,
            "disks": self.disks.iter().map(|d| serde_json::json!({"name": d.name.as_str(), "size_bytes": d.size_bytes})).collect::<Vec<_>>(),
            "logical_bytes": self.logical_bytes, "stored_bytes": self.stored_bytes, "left_out": self.left_out,
            "verified_at": self.verified_at.map(|t| fmt_time(Some(t))), "verified": self.verified,
            "boot_verified": self.boot_verified,
        })
    }
    fn header() -> Option<String> {
        Some(format!(
            "{:<34} {:<22} {:<11} {:>12} {:>12}  {}",
            "ID", "CREATED", "CONSISTENCY", "LOGICAL", "STORED", "VERIFIED"
        ))
    }
    fn text(&self, out: &mut dyn Write) -> std::io::Result<()> {
        writeln!(
            out,
            "{:<34} {:<22} {:<11} {:>12} {:>12}  {}",
            Escaped(&self.id),
            fmt_time(Some(self.created_at / 1000)),
            Escaped(&self.consistency),
            fmt_size(self.logical_bytes),
            fmt_size(self.stored_bytes),
            match (self.verified, self.verified_at) {
                (Some(true), at) => format!("ok {}", fmt_time(at)),
                (Some(false), at) => format!("FAILED {}", fmt_time(at)),
                _ => "-".into(),
            }
        )
    }
}

impl Row for ItemInfo {
    fn take(answer: AdminResponse) -> Option<Page<Self>> {
        match answer {
            AdminResponse::Items(p) => Some(p),
            _ => None,
        }
    }
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "path": self.path, "kind": self.kind, "size": self.size,
            "mtime": fmt_time(u64::try_from(self.mtime).ok()), "mode": format!("{:o}", self.mode), "target": self.target,
        })
    }
    fn header() -> Option<String> {
        None
    }
    fn text(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let link = self.target.as_deref().map(|t| format!(" -> {}", Escaped(t))).unwrap_or_default();
        writeln!(
            out,
            "{:<9} {:>6o} {:>12} {:<22} {}{link}",
            Escaped(&self.kind),
            self.mode,
            self.size,
            fmt_time(u64::try_from(self.mtime).ok()),
            Escaped(&self.path)
        )
    }
}
