//! The deployment as this coordinator knows it: its coordinators (tree `coordinators`), the
//! one-time tokens that let another coordinator join (tree `join_tokens`), and the groups that
//! protect a whole cluster (tree `group_auto`). Agents record their cluster in their
//! certificate, so a coordinator that did not enroll a host learns it when the host connects
//! ([`Catalog::note_agent_from_certificate`]).

use super::{decode, encode, AgentRecord, Catalog, CatalogError, TokenRefusal};
use bulwark_protocol::messages::{CoordinatorAddr, MAX_COORDINATORS};
use serde::{Deserialize, Serialize};

/// A coordinator of the deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorRecord {
    pub name: String,
    /// Where agents dial it.
    pub addr: String,
    /// Unix seconds it joined (0: the first coordinator, or learned from another).
    pub joined_at: u64,
}

/// A token that lets coordinator `name` join the deployment once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenRecord {
    pub name: String,
    pub created_at: u64,
    pub expires_at: u64,
    pub used_at: Option<u64>,
}

impl Catalog {
    /// Records (or updates the address of) a coordinator of the deployment. At most
    /// [`MAX_COORDINATORS`] are kept: a new one beyond that is refused.
    pub fn put_coordinator(&self, rec: &CoordinatorRecord) -> Result<bool, CatalogError> {
        if !self.coordinators.contains_key(rec.name.as_bytes())? && self.coordinators.len() >= MAX_COORDINATORS {
            return Ok(false);
        }
        self.coordinators.insert(rec.name.as_bytes(), encode("coordinators", rec)?)?;
        Ok(true)
    }

    /// The deployment's coordinators this one knows, by name.
    pub fn coordinators(&self) -> Result<Vec<CoordinatorRecord>, CatalogError> {
        self.coordinators.iter().values().take(MAX_COORDINATORS).map(|v| decode("coordinators", &v?)).collect()
    }

    /// The coordinators as the wire names them.
    pub fn coordinator_addrs(&self) -> Result<Vec<CoordinatorAddr>, CatalogError> {
        Ok(self.coordinators()?.into_iter().map(|c| CoordinatorAddr { name: c.name, addr: c.addr }).collect())
    }

    /// Stores a coordinator join token by the hash of its secret.
    pub fn insert_join_token(&self, secret_hash: [u8; 32], rec: &JoinTokenRecord) -> Result<(), CatalogError> {
        self.join_tokens.insert(secret_hash, encode("join_tokens", rec)?)?;
        self.flush()
    }

    /// Uses the token whose secret hashes to `secret_hash` at `now` for the coordinator it was
    /// made for (`asked`, when given, must be that name), atomically (two joins racing with one
    /// token cannot both win); durable before it answers.
    pub fn consume_join_token(
        &self,
        secret_hash: [u8; 32],
        asked: Option<&str>,
        now: u64,
    ) -> Result<Result<JoinTokenRecord, TokenRefusal>, CatalogError> {
        loop {
            let Some(old) = self.join_tokens.get(secret_hash)? else { return Ok(Err(TokenRefusal::Unknown)) };
            let mut rec: JoinTokenRecord = decode("join_tokens", &old)?;
            if rec.used_at.is_some() {
                return Ok(Err(TokenRefusal::Used { by: rec.name }));
            }
            if now >= rec.expires_at {
                return Ok(Err(TokenRefusal::Expired));
            }
            if let Some(name) = asked.filter(|n| *n != rec.name) {
                return Ok(Err(TokenRefusal::WrongHost { allowed: rec.name, asked: name.to_owned() }));
            }
            rec.used_at = Some(now);
            let new = encode("join_tokens", &rec)?;
            if self.join_tokens.compare_and_swap(secret_hash, Some(old), Some(new))?.is_ok() {
                self.flush()?;
                return Ok(Ok(rec));
            }
        }
    }

    /// Gives a consumed join token back (the certificates could not be issued).
    pub fn release_join_token(&self, secret_hash: [u8; 32]) -> Result<(), CatalogError> {
        if let Some(old) = self.join_tokens.get(secret_hash)? {
            let mut rec: JoinTokenRecord = decode("join_tokens", &old)?;
            rec.used_at = None;
            self.join_tokens.insert(secret_hash, encode("join_tokens", &rec)?)?;
            self.flush()?;
        }
        Ok(())
    }

    /// Makes `group` protect the whole of `cluster` (or no longer, with `None`).
    pub fn set_group_auto(&self, group: &str, cluster: Option<&str>) -> Result<(), CatalogError> {
        match cluster {
            Some(c) => self.group_auto.insert(group.as_bytes(), c.as_bytes())?,
            None => self.group_auto.remove(group.as_bytes())?,
        };
        Ok(())
    }

    /// The cluster `group` protects whole, if it does.
    pub fn group_auto(&self, group: &str) -> Result<Option<String>, CatalogError> {
        Ok(self.group_auto.get(group.as_bytes())?.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// The group protecting `cluster` whole, if one does (the first by name).
    pub fn auto_group_of(&self, cluster: &str) -> Result<Option<String>, CatalogError> {
        for entry in self.group_auto.iter() {
            let (k, v) = entry?;
            if v.as_ref() == cluster.as_bytes() {
                return Ok(Some(String::from_utf8_lossy(&k).into_owned()));
            }
        }
        Ok(None)
    }

    /// A host that connected with a certificate of this deployment's CA (checked, not revoked):
    /// a coordinator that did not enroll it records it now, with the cluster its certificate
    /// names (its own name when it names none). A known host's record follows a newer
    /// certificate (re-enrolled at the first coordinator) and the cluster a certificate names.
    pub fn note_agent_from_certificate(
        &self,
        host: &str,
        serial: &str,
        cluster: Option<&str>,
        now: u64,
    ) -> Result<(), CatalogError> {
        match self.agent(host)? {
            Some(mut rec) => {
                let cluster = cluster.filter(|c| *c != rec.cluster);
                if rec.cert_serial != serial || rec.revoked || cluster.is_some() {
                    rec.cert_serial = serial.to_owned();
                    rec.revoked = false;
                    if let Some(c) = cluster {
                        rec.cluster = c.to_owned();
                    }
                    self.put_agent(&rec)?;
                }
            }
            None => self.put_agent(&AgentRecord {
                host: host.to_owned(),
                cert_serial: serial.to_owned(),
                enrolled_at: now,
                cert_not_after: 0,
                revoked: false,
                last_seen: Some(now),
                agent_version: None,
                vms: 0,
                cluster: cluster.unwrap_or(host).to_owned(),
            })?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_tokens_work_once_for_their_coordinator_only() {
        let t = tempfile::tempdir().unwrap();
        let c = Catalog::create(&t.path().join("c")).unwrap();
        let rec = JoinTokenRecord { name: "coord-b".into(), created_at: 0, expires_at: 100, used_at: None };
        c.insert_join_token([1; 32], &rec).unwrap();
        assert_eq!(c.consume_join_token([2; 32], Some("coord-b"), 1).unwrap(), Err(TokenRefusal::Unknown));
        assert!(matches!(
            c.consume_join_token([1; 32], Some("coord-c"), 1).unwrap(),
            Err(TokenRefusal::WrongHost { .. })
        ));
        assert_eq!(c.consume_join_token([1; 32], None, 100).unwrap(), Err(TokenRefusal::Expired));
        assert!(c.consume_join_token([1; 32], None, 1).unwrap().is_ok());
        assert!(matches!(c.consume_join_token([1; 32], Some("coord-b"), 2).unwrap(), Err(TokenRefusal::Used { .. })));
    }

    #[test]
    fn hosts_learned_from_certificates_keep_their_cluster() {
        let t = tempfile::tempdir().unwrap();
        let c = Catalog::create(&t.path().join("c")).unwrap();
        c.note_agent_from_certificate("n1", "0a", Some("k"), 5).unwrap();
        c.note_agent_from_certificate("n2", "0b", None, 5).unwrap();
        assert_eq!(c.cluster_of("n1").unwrap(), "k");
        assert_eq!(c.cluster_of("n2").unwrap(), "n2");
        c.set_group_auto("all", Some("k")).unwrap();
        assert_eq!(c.auto_group_of("k").unwrap().as_deref(), Some("all"));
        assert_eq!(c.auto_group_of("n2").unwrap(), None);
    }
}
