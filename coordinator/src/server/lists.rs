//! The admin API's list answers, one page each: `job list`, `vm list`, `agent list`,
//! `group list`/`group show`, `rp list` and `ls`. A page is read from sled by a range scan from
//! the request's cursor and bounded by `bulwark_protocol::paging` (items, bytes, records
//! scanned), so no answer outgrows a frame and no list is ever held whole in memory.

use super::blocking;
use crate::catalog::{now_secs, Catalog, CatalogError};
use crate::server::registry::ListConnected;
use crate::server::{admin, protect, State};
use bulwark_protocol::messages::{AdminResponse, AgentInfo, ItemInfo};
use bulwark_protocol::paging::{Page, PageBuilder, PageRequest};
use bulwark_protocol::HostId;
use std::sync::Arc;

fn err(message: impl std::fmt::Display) -> AdminResponse {
    AdminResponse::Error { message: message.to_string() }
}

/// Fills a page from a scan; `convert` turns a record into an item, or none to skip it.
fn fill<R, T: serde::Serialize>(
    req: &PageRequest,
    records: impl Iterator<Item = Result<(Vec<u8>, R), CatalogError>>,
    mut convert: impl FnMut(R) -> Result<Option<T>, String>,
) -> Result<Page<T>, String> {
    let mut page = PageBuilder::new(req);
    for r in records {
        let (key, record) = r.map_err(|e| e.to_string())?;
        if !page.offer(&key, convert(record)?) {
            break;
        }
    }
    Ok(page.finish())
}

/// Runs a page read on a blocking thread and wraps its answer.
async fn answer<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
    wrap: impl FnOnce(T) -> AdminResponse,
) -> AdminResponse {
    match blocking(f).await {
        Ok(Ok(t)) => wrap(t),
        Ok(Err(e)) | Err(e) => err(e),
    }
}

/// `job list [--vm VM] [--state STATE]`: jobs oldest first.
pub async fn jobs(catalog: Catalog, vm: Option<String>, state: Option<String>, req: PageRequest) -> AdminResponse {
    answer(
        move || {
            let after = req.after_key().map_err(|e| e.to_string())?;
            fill(&req, catalog.jobs_after(after.as_deref()), |j| {
                let wanted = vm.as_ref().is_none_or(|v| j.vm.as_ref() == Some(v))
                    && state.as_ref().is_none_or(|s| j.state.as_str() == s);
                Ok(wanted.then(|| admin::job_info(&j)))
            })
        },
        AdminResponse::Jobs,
    )
    .await
}

/// `vm list`: VMs in the VM tree's key order.
pub async fn vms(catalog: Catalog, owner: String, req: PageRequest) -> AdminResponse {
    answer(
        move || {
            let after = req.after_key().map_err(|e| e.to_string())?;
            let mut groups = protect::LeftOut::default();
            fill(&req, catalog.vms_after(after.as_deref()), |v| {
                protect::vm_summary(&catalog, v, &owner, &mut groups).map(Some)
            })
        },
        AdminResponse::Vms,
    )
    .await
}

/// `agent list`: enrolled agents by host name, live state from the registry.
pub async fn agents(state: &Arc<State>, req: PageRequest) -> AdminResponse {
    let connected = state.registry.send(ListConnected).await.unwrap_or_default();
    let catalog = state.authority.catalog().clone();
    answer(
        move || {
            let after = req.after_key().map_err(|e| e.to_string())?;
            let now = now_secs();
            fill(&req, catalog.agents_after(after.as_deref()), |r| {
                let Ok(host) = HostId::new(r.host.clone()) else { return Ok(None) };
                let live = connected.iter().find(|c| c.host == r.host);
                Ok(Some(AgentInfo {
                    host,
                    connected: live.is_some(),
                    last_seen: if live.is_some() { Some(now) } else { r.last_seen },
                    cert_serial: r.cert_serial,
                    revoked: r.revoked,
                    vms: live.map(|c| c.vms).unwrap_or(r.vms),
                    agent_version: live.map(|c| c.agent_version.clone()).or(r.agent_version),
                    remote_addr: live.map(|c| c.remote.to_string()),
                    cluster: r.cluster,
                }))
            })
        },
        AdminResponse::Agents,
    )
    .await
}

/// `group list`: groups by name, each with the first page of its members.
pub async fn groups(catalog: Catalog, req: PageRequest) -> AdminResponse {
    answer(
        move || {
            let after = req.after_key().map_err(|e| e.to_string())?;
            let first = PageRequest::first();
            fill(&req, catalog.groups_after(after.as_deref()), |g| protect::group_info(&catalog, &g, &first).map(Some))
        },
        AdminResponse::Groups,
    )
    .await
}

/// `group show NAME`: the group with one page of its members.
pub async fn group(catalog: Catalog, name: String, req: PageRequest) -> AdminResponse {
    answer(
        move || {
            let g = catalog.group(&name).map_err(|e| e.to_string())?.ok_or_else(|| format!("no group named {name}"))?;
            protect::group_info(&catalog, &g, &req)
        },
        AdminResponse::Group,
    )
    .await
}

/// `rp list VM`: its recovery points, oldest first.
pub async fn recovery_points(catalog: Catalog, vm: String, req: PageRequest) -> AdminResponse {
    answer(
        move || {
            let after = req.after_key().map_err(|e| e.to_string())?;
            let scan = catalog
                .recovery_points_after(&vm, after.as_deref())
                .ok_or_else(|| format!("the cursor does not belong to the recovery points of {vm}"))?;
            let group = catalog.vm(&vm).map_err(|e| e.to_string())?.and_then(|v| v.group);
            let left_out = protect::left_out(&catalog, &vm, group.as_deref())?;
            let page = fill(&req, scan, |rp| {
                let check = catalog.rp_check(&rp.id).map_err(|e| e.to_string())?;
                protect::rp_info(&rp, &left_out, check.as_ref()).map(Some)
            })?;
            if page.items.is_empty() && req.after.is_none() && catalog.vm(&vm).map_err(|e| e.to_string())?.is_none() {
                return Err(format!("no VM named {vm}"));
            }
            Ok(page)
        },
        AdminResponse::RecoveryPoints,
    )
    .await
}

/// `ls`: one page of the entries at a path of a disk of a recovery point. The reader lists the
/// whole directory (sorted); the page is sliced from it by path.
pub async fn ls(
    state: &Arc<State>,
    vm: String,
    rp: String,
    disk: String,
    path: String,
    req: PageRequest,
) -> AdminResponse {
    let store = state.store.clone();
    let d = match blocking(move || protect::rp_disk(store.catalog(), &vm, &rp, &disk)).await {
        Ok(Ok((_, d))) => d,
        Ok(Err(e)) | Err(e) => return err(e),
    };
    let after = match req.after_key() {
        Ok(a) => a,
        Err(e) => return err(e),
    };
    // The items worker reads the guest and answers one page, sorted by raw name; the page is
    // then bounded in bytes like every other answer.
    let limit = u32::try_from(req.effective_limit()).unwrap_or(u32::MAX);
    let listed = match crate::items::list(state.store.clone(), &d, &path, after, limit).await {
        Ok(l) => l,
        Err(e) => return err(e),
    };
    let mut page = PageBuilder::new(&req);
    let mut stopped = false;
    for i in listed.items {
        let key = i.name.clone();
        let info = ItemInfo {
            path: i.path,
            kind: i.kind.as_str().into(),
            size: i.size,
            mtime: i.mtime,
            mode: i.mode,
            target: i.target.map(|t| String::from_utf8_lossy(&t).into_owned()),
        };
        if !page.offer(&key, Some(info)) {
            stopped = true;
            break;
        }
    }
    let mut out = page.finish();
    if !stopped {
        out.next = listed.next.map(|k| bulwark_protocol::paging::encode_cursor(&k));
    }
    AdminResponse::Items(out)
}
