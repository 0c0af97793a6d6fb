//! `bulwark recover VM --rp … --to host --host H --instant`: an instant recovery is recorded
//! (catalog tree `instant`: the new VM, its host, the point's disks) before its recovery job
//! is queued; the job tells the agent to make the VM's disks overlays of exports, and the
//! agent's `Export` streams are served for as long as the record is active
//! ([`super::export::instant_disk`]).

use super::protect::{check_recover, queue};
use super::State;
use crate::catalog::{InstantRecord, JobKind, RecoverySpec};
use crate::jobs::Enqueue;
use crate::store::MAX_ACTIVE_INSTANTS;
use bulwark_protocol::messages::{AdminResponse, CoordinatorMessage, JobOutcome, RecoveryOptions};
use std::sync::Arc;

fn err(message: impl std::fmt::Display) -> AdminResponse {
    AdminResponse::Error { message: message.to_string() }
}

/// Records the instant recovery and queues its job.
pub async fn recover_instant(
    state: &Arc<State>,
    vm: String,
    rp: String,
    to_host: String,
    name: Option<String>,
) -> AdminResponse {
    let target = name.clone().unwrap_or_else(|| format!("{vm}-restored"));
    let catalog = state.store.catalog().clone();
    let (v, h, t) = (vm.clone(), to_host.clone(), target.clone());
    let recorded = tokio::task::spawn_blocking(move || -> Result<[u8; 16], String> {
        let rp_id = check_recover(&catalog, &v, &rp, Some(&h), Some(t.clone()))?;
        if catalog.instant(&t).map_err(|e| e.to_string())?.is_some_and(|r| r.is_active()) {
            return Err(format!("an instant recovery named {t} is active already: finish it or choose another --name"));
        }
        let active = catalog.active_instants(MAX_ACTIVE_INSTANTS).map_err(|e| e.to_string())?.len();
        if active >= MAX_ACTIVE_INSTANTS {
            return Err(format!("{active} instant recoveries are active: finish some first"));
        }
        let point = super::protect::find_rp(&catalog, &v, &crate::store::hex(&rp_id))?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let record = InstantRecord {
            name: t,
            vm: v,
            rp: rp_id,
            host: h,
            disks: point.disks,
            job: None,
            created_at: now,
            finished_at: None,
        };
        catalog.put_instant(&record).map_err(|e| e.to_string())?;
        Ok(rp_id)
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    let rp_id = match recorded {
        Ok(id) => id,
        Err(e) => return err(e),
    };
    let spec = RecoverySpec {
        rp: rp_id,
        to_host: Some(to_host.clone()),
        name: Some(target.clone()),
        options: RecoveryOptions::default(),
        items: None,
    };
    let reason = format!(
        "instant recovery of {vm} from {} as {target} on {to_host} requested by an administrator",
        crate::store::hex(&rp_id)
    );
    queue(state, Enqueue { vm, kind: JobKind::Recovery, automatic: false, reason, recovery: Some(spec) }).await
}

/// `recover-finish VM`: asks the host of instant recovery `vm` to copy the rest of its disks
/// and drop the exports; answers once it did (then the record is over and the point's block
/// maps are GC's again).
pub async fn recover_finish(state: &Arc<State>, vm: String) -> AdminResponse {
    let catalog = state.store.catalog().clone();
    let name = vm.clone();
    let record = match tokio::task::spawn_blocking(move || catalog.instant(&name)).await {
        Ok(Ok(Some(r))) if r.is_active() => r,
        Ok(Ok(_)) => return err(format!("no instant recovery of a VM named {vm} is active")),
        Ok(Err(e)) => return err(e),
        Err(e) => return err(e),
    };
    let Some(job) = record.job else {
        return err(format!("the instant recovery of {vm} has not run yet: wait for its job"));
    };
    // Only once its job made the VM (its route is the job's until then).
    let catalog = state.store.catalog().clone();
    let made = tokio::task::spawn_blocking(move || catalog.job(job)).await;
    if !matches!(made, Ok(Ok(Some(ref j))) if j.state == crate::catalog::JobState::Succeeded) {
        return err(format!("the instant recovery of {vm} (job {job}) has not made its VM yet: wait for the job"));
    }
    let host = record.host.clone();
    let session = state.registry.send(crate::jobs::SessionOf { host: host.clone() }).await.ok().flatten();
    let Some((session, conn)) = session else {
        return err(format!("the agent of {host} is not connected: {vm} still reads from the recovery point"));
    };
    let vm_id = match bulwark_protocol::VmId::new(vm.clone()) {
        Ok(v) => v,
        Err(e) => return err(e),
    };
    let (_streams, result) = state.router.register(job, &host, conn);
    tracing::info!(vm = %vm, %host, job_id = job, "finishing an instant recovery");
    if session
        .send(crate::jobs::ToAgent(CoordinatorMessage::InstantFinish { job: bulwark_protocol::JobId(job), vm: vm_id }))
        .await
        .is_err()
    {
        state.router.unregister(job);
        return err(format!("the agent of {host} went away"));
    }
    let answer = result.await;
    state.router.unregister(job);
    match answer.map(|r| r.outcome) {
        Ok(JobOutcome::Restored { .. }) => {
            let catalog = state.store.catalog().clone();
            let mut r = record;
            r.finished_at = Some(crate::catalog::now_secs());
            if let Err(e) = tokio::task::spawn_blocking(move || catalog.put_instant(&r)).await.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
                return err(format!("{vm} was finished but the record could not be ended: {e}"));
            }
            AdminResponse::Done {
                message: format!("{vm} no longer depends on the recovery point: its disks are whole on {host}"),
            }
        }
        Ok(JobOutcome::Failed { reason, .. }) => err(format!("{host} could not finish {vm}: {reason}")),
        Ok(other) => err(format!("unexpected answer from {host}: {other:?}")),
        Err(_) => err(format!(
            "the connection to {host} was lost while it finished {vm}: it may still be copying; run recover-finish again"
        )),
    }
}
