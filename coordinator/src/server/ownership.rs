//! `bulwark vm take-over`: this coordinator claims a VM whoever owns it, through the agent of
//! the VM's host (only agents write claims, on the cluster's shared storage). The old owner's
//! requests are refused from then on, and it shows the VM as `lost`.

use crate::server::session::{ClaimAnswer, ClaimVm};
use crate::server::State;
use bulwark_protocol::messages::AdminResponse;
use bulwark_protocol::ownership::ClaimMode;
use std::sync::Arc;

/// How long a take-over waits for the host's answer.
const CLAIM_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

fn err(message: impl std::fmt::Display) -> AdminResponse {
    AdminResponse::Error { message: message.to_string() }
}

pub async fn vm_take_over(state: &Arc<State>, vm: String) -> AdminResponse {
    let catalog = state.store.catalog().clone();
    let id = match bulwark_protocol::VmId::new(vm.clone()) {
        Ok(id) => id,
        Err(e) => return err(e),
    };
    let (record, before) = {
        let (catalog, vm) = (catalog.clone(), vm.clone());
        match tokio::task::spawn_blocking(move || {
            Ok::<_, crate::catalog::CatalogError>((catalog.vm(&vm)?, catalog.vm_ownership(&vm)?))
        })
        .await
        {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return err(e),
            Err(e) => return err(e),
        }
    };
    let Some(record) = record else {
        return err(format!("no VM named {vm} has been reported by any agent (see `bulwark vm list`)"));
    };
    let host = record.host.clone();
    let Ok(Some(session)) = state.registry.send(crate::server::registry::ClaimerOf { host: host.clone() }).await else {
        return err(format!(
            "the agent of {host}, where {vm} runs, is not connected: a take-over is written by the VM's host"
        ));
    };
    let (done, answer) = tokio::sync::oneshot::channel();
    session.do_send(ClaimVm { vm: id, mode: ClaimMode::TakeOver, done });
    let answer = match tokio::time::timeout(CLAIM_WAIT, answer).await {
        Ok(Ok(a)) => a,
        Ok(Err(_)) => return err(format!("the agent of {host} went away before it answered")),
        Err(_) => return err(format!("the agent of {host} did not answer within {}s", CLAIM_WAIT.as_secs())),
    };
    let me = &state.authority.config().name;
    match answer {
        ClaimAnswer { refused: Some(why), .. } => err(format!("take-over of {vm} refused by {host}: {why}")),
        ClaimAnswer { owner: Some(owner), refused: None } if &owner.coordinator == me => {
            let was = match before.reported {
                Some(old) if &old.coordinator != me => format!(" from {old}"),
                _ => String::new(),
            };
            tracing::warn!(%vm, epoch = owner.epoch, "VM taken over{was}");
            AdminResponse::Done {
                message: format!(
                    "VM {vm} taken over{was}: coordinator {me} owns it with epoch {}; requests under older epochs are refused",
                    owner.epoch
                ),
            }
        }
        ClaimAnswer { owner, .. } => err(format!("take-over of {vm}: {host} answered an unexpected claim {owner:?}")),
    }
}
