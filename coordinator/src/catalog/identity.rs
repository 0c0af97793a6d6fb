//! VM identity and host binding. A VM is known by the stable UUID its host reports (kept in the
//! sim's `vm.toml` and in the QEMU definition), never by its name alone, and it belongs to the
//! cluster of the host that first reported it: it may move between hosts of that cluster (live
//! migration, or a restart elsewhere after its host went down), never to a host of another.
//! A claim that breaks these rules is refused, logged as a security event, and the VM it
//! concerns is shown as `conflict` until the claiming host stops making it.
//!
//! [`judge`] is the decision, a plain function of what the catalog holds and what the host
//! claims; [`super::Catalog::apply_inventory`] applies it.

use serde::{Deserialize, Serialize};

/// What the catalog knows of a VM's identity (tree `vm_identity`, by catalog name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmIdentity {
    pub uuid: String,
    pub cluster: String,
    /// A refused claim on this VM, until the claiming host stops making it.
    pub conflict: Option<Conflict>,
    /// When the VM's host last reported an inventory without it.
    pub missing_since: Option<u64>,
}

/// A refused claim on a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    /// The host that made it.
    pub host: String,
    pub reason: String,
    pub since: u64,
    /// The claim was right but for the VM's own host still reporting it (the same VM from two
    /// hosts at once): when that host stops reporting it, the VM moves to the claiming host,
    /// as this report of it says.
    pub pending_move: Option<bulwark_protocol::messages::VmInfo>,
}

/// The VM a claim names, as the catalog holds it.
#[derive(Debug, Clone, Copy)]
pub struct Known<'a> {
    pub name: &'a str,
    pub host: &'a str,
    /// None: a VM recorded before identities existed.
    pub identity: Option<&'a VmIdentity>,
    /// The cluster of the host it was last seen on.
    pub host_cluster: &'a str,
    /// Its host is connected and its last inventory still holds it.
    pub still_reported: bool,
}

/// A host's claim: "VM `uuid`, named `name`, runs on me".
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    pub uuid: &'a str,
    pub name: &'a str,
    pub host: &'a str,
    pub cluster: &'a str,
}

/// What to do with a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A VM never seen: record it under its name.
    New,
    /// The VM already known by this UUID (on another host of its cluster: a migration).
    Same { migrated_from: Option<String> },
    /// A VM recorded before identities existed, reported from its cluster: it takes the UUID.
    Adopt,
    /// Refused; the VM named here (if any) is marked in conflict. `pending_move`: see
    /// [`Conflict::pending_move`].
    Refuse { victim: Option<String>, reason: String, pending_move: bool },
}

fn refuse(victim: &str, reason: String) -> Verdict {
    Verdict::Refuse { victim: Some(victim.to_owned()), reason, pending_move: false }
}

/// Judges a claim against the VM known by the same UUID (`by_uuid`) and the VM known by the
/// same name (`by_name`).
pub fn judge(claim: Claim<'_>, by_uuid: Option<Known<'_>>, by_name: Option<Known<'_>>) -> Verdict {
    if let Some(k) = by_uuid {
        let cluster = k.identity.map_or(k.host_cluster, |i| i.cluster.as_str());
        if cluster != claim.cluster {
            return refuse(
                k.name,
                format!(
                    "host {} of cluster {} claims VM {} ({}), which belongs to cluster {cluster}",
                    claim.host, claim.cluster, k.name, claim.uuid
                ),
            );
        }
        if k.name != claim.name {
            let how = if k.host != claim.host { "changed name and host together" } else { "changed its name" };
            return refuse(
                k.name,
                format!(
                    "host {} reports VM {} as {:?}: it {how} (forget {} to accept it under the new name)",
                    claim.host, claim.uuid, claim.name, k.name
                ),
            );
        }
        if k.host == claim.host {
            return Verdict::Same { migrated_from: None };
        }
        if k.still_reported {
            return Verdict::Refuse {
                victim: Some(k.name.to_owned()),
                reason: format!(
                    "hosts {} and {} both report VM {} ({}) at once: it stays on {} until that host stops reporting it",
                    k.host, claim.host, k.name, claim.uuid, k.host
                ),
                pending_move: true,
            };
        }
        return Verdict::Same { migrated_from: Some(k.host.to_owned()) };
    }
    match by_name {
        None => Verdict::New,
        Some(k) => match k.identity {
            None if k.host_cluster == claim.cluster => Verdict::Adopt,
            None => refuse(
                k.name,
                format!(
                    "host {} of cluster {} reports a VM named {}, but the VM of that name is in cluster {}",
                    claim.host, claim.cluster, k.name, k.host_cluster
                ),
            ),
            Some(i) => refuse(
                k.name,
                format!(
                    "host {} of cluster {} reports another VM named {} ({}); the protected one is {} in cluster {}",
                    claim.host, claim.cluster, k.name, claim.uuid, i.uuid, i.cluster
                ),
            ),
        },
    }
}

/// The status `vm list` shows beside the replica state.
pub fn status(identity: Option<&VmIdentity>, in_group: bool, has_replica: bool) -> &'static str {
    match identity {
        Some(i) if i.conflict.is_some() => "conflict",
        Some(i) if i.missing_since.is_some() => "missing",
        _ if in_group && has_replica => "protected",
        _ if in_group => "awaiting-replica",
        _ => "unprotected",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident(uuid: &str, cluster: &str) -> VmIdentity {
        VmIdentity { uuid: uuid.into(), cluster: cluster.into(), conflict: None, missing_since: None }
    }

    fn claim<'a>(uuid: &'a str, name: &'a str, host: &'a str, cluster: &'a str) -> Claim<'a> {
        Claim { uuid, name, host, cluster }
    }

    #[test]
    fn a_vm_moves_only_inside_its_cluster_and_is_never_taken_by_name() {
        let web = ident("u1", "c1");
        let known =
            Known { name: "web1", host: "node1", identity: Some(&web), host_cluster: "c1", still_reported: false };
        assert_eq!(judge(claim("u9", "db", "node1", "c1"), None, None), Verdict::New);
        assert_eq!(
            judge(claim("u1", "web1", "node1", "c1"), Some(known), Some(known)),
            Verdict::Same { migrated_from: None }
        );
        assert_eq!(
            judge(claim("u1", "web1", "node2", "c1"), Some(known), Some(known)),
            Verdict::Same { migrated_from: Some("node1".into()) }
        );
        // Another cluster's host with the same UUID, the same name with another UUID, a
        // rename together with a move: refused, and the protected VM named as the victim.
        for (c, by_uuid, want) in [
            (claim("u1", "web1", "evil", "c2"), Some(known), "belongs to cluster c1"),
            (claim("u7", "web1", "evil", "c2"), None, "another VM named web1"),
            (claim("u7", "web1", "node2", "c1"), None, "another VM named web1"),
            (claim("u1", "other", "node2", "c1"), Some(known), "changed name and host together"),
        ] {
            match judge(c, by_uuid, Some(known)) {
                Verdict::Refuse { victim, reason, pending_move } => {
                    assert_eq!(victim.as_deref(), Some("web1"));
                    assert!(reason.contains(want), "{reason}");
                    assert!(!pending_move);
                }
                v => panic!("{c:?}: {v:?}"),
            }
        }
        // A VM recorded before identities: adopted from its own cluster only.
        let legacy = Known { name: "old", host: "node1", identity: None, host_cluster: "c1", still_reported: false };
        assert_eq!(judge(claim("u5", "old", "node2", "c1"), None, Some(legacy)), Verdict::Adopt);
        assert!(matches!(judge(claim("u5", "old", "evil", "c2"), None, Some(legacy)), Verdict::Refuse { .. }));
    }

    #[test]
    fn the_same_vm_from_two_hosts_at_once_stays_where_it_is_until_its_host_lets_go() {
        let web = ident("u1", "c1");
        let held =
            Known { name: "web1", host: "node1", identity: Some(&web), host_cluster: "c1", still_reported: true };
        match judge(claim("u1", "web1", "node2", "c1"), Some(held), Some(held)) {
            Verdict::Refuse { victim, reason, pending_move } => {
                assert_eq!(victim.as_deref(), Some("web1"));
                assert!(reason.contains("at once"), "{reason}");
                assert!(pending_move);
            }
            v => panic!("{v:?}"),
        }
        // Its own host reporting it again is no conflict.
        assert_eq!(
            judge(claim("u1", "web1", "node1", "c1"), Some(held), Some(held)),
            Verdict::Same { migrated_from: None }
        );
    }

    #[test]
    fn status_names_conflicts_and_missing_vms_first() {
        let mut i = ident("u", "c");
        assert_eq!(status(Some(&i), true, true), "protected");
        assert_eq!(status(Some(&i), true, false), "awaiting-replica");
        assert_eq!(status(None, false, false), "unprotected");
        i.missing_since = Some(5);
        assert_eq!(status(Some(&i), true, true), "missing");
        i.conflict = Some(Conflict { host: "evil".into(), reason: "why".into(), since: 1, pending_move: None });
        assert_eq!(status(Some(&i), true, true), "conflict");
    }
}
