//! The deployment's coordinators as this agent knows them: learned at enrollment and from every
//! coordinator's welcome afterwards, kept in `DIR/coordinators.json` (written atomically), one
//! uplink each. Those connected now are the inventory's `partition`: the coordinators alive for
//! this host, among which rendezvous hashing gives each unclaimed VM its owner.

use bulwark_protocol::messages::{CoordinatorAddr, MAX_COORDINATORS};
use bulwark_protocol::HostId;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The longest address a coordinator may be listed with.
const MAX_ADDR: usize = 255;
/// The largest `coordinators.json` read (a longer one is ignored, with a warning).
const MAX_FILE: u64 = 64 << 10;

/// The coordinators this agent knows and which protect its cluster.
#[derive(Debug)]
pub struct Peers {
    path: PathBuf,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    known: BTreeMap<String, String>,
    /// Coordinators this agent runs an uplink to.
    expected: BTreeSet<String>,
    /// Those whose uplink connected or failed at least once since the agent started.
    tried: BTreeSet<String>,
    connected: BTreeSet<String>,
    /// Where newly learned coordinators go to get an uplink.
    spawn: Option<tokio::sync::mpsc::UnboundedSender<CoordinatorAddr>>,
}

/// Whether a listed coordinator is acceptable (a name like a host's, a bounded address).
fn acceptable(c: &CoordinatorAddr) -> bool {
    HostId::new(c.name.clone()).is_ok() && !c.addr.is_empty() && c.addr.len() <= MAX_ADDR
}

impl Peers {
    /// The coordinators kept in `path` (none when it is missing; an unreadable or damaged file
    /// is ignored with a warning: the agent.toml coordinator tells them again).
    pub fn load(path: PathBuf) -> Self {
        let known = match read(&path) {
            Ok(list) => list.into_iter().filter(acceptable).take(MAX_COORDINATORS).map(|c| (c.name, c.addr)).collect(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the coordinators learned earlier");
                BTreeMap::new()
            }
        };
        Self { path, inner: Mutex::new(Inner { known, ..Default::default() }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every coordinator known, by name.
    pub fn known(&self) -> Vec<CoordinatorAddr> {
        self.lock()
            .known
            .iter()
            .map(|(name, addr)| CoordinatorAddr { name: name.clone(), addr: addr.clone() })
            .collect()
    }

    /// From now on, coordinators learned are sent to `tx` (the agent starts an uplink for each).
    pub fn on_new(&self, tx: tokio::sync::mpsc::UnboundedSender<CoordinatorAddr>) {
        self.lock().spawn = Some(tx);
    }

    /// Learns coordinators from a welcome or an enrollment by coordinator `from`: new names are
    /// kept (up to [`MAX_COORDINATORS`]) and get an uplink; a known name's address is updated
    /// only when `from` is that coordinator (no coordinator redirects agents away from another).
    pub fn learn(&self, list: &[CoordinatorAddr], from: &str) {
        let mut inner = self.lock();
        let mut changed = false;
        for c in list.iter().filter(|c| acceptable(c)) {
            match inner.known.get(&c.name) {
                Some(addr) if *addr == c.addr => {}
                Some(_) if c.name != from => {
                    tracing::warn!(coordinator = %c.name, by = from, "another coordinator's address left as it was");
                }
                Some(_) => {
                    inner.known.insert(c.name.clone(), c.addr.clone());
                    changed = true;
                }
                None if inner.known.len() >= MAX_COORDINATORS => {
                    tracing::warn!(coordinator = %c.name, "too many coordinators listed: this one is left out");
                }
                None => {
                    inner.known.insert(c.name.clone(), c.addr.clone());
                    changed = true;
                    tracing::info!(coordinator = %c.name, addr = %c.addr, "learned a coordinator of the deployment");
                    if let Some(tx) = &inner.spawn {
                        let _ = tx.send(c.clone());
                    }
                }
            }
        }
        if changed {
            let list: Vec<CoordinatorAddr> = inner
                .known
                .iter()
                .map(|(name, addr)| CoordinatorAddr { name: name.clone(), addr: addr.clone() })
                .collect();
            drop(inner);
            if let Err(e) = write(&self.path, &list) {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot keep the coordinators learned");
            }
        }
    }

    /// An uplink to coordinator `name` runs.
    pub fn expect(&self, name: &str) {
        self.lock().expected.insert(name.to_owned());
    }

    /// The uplink to `name` connected (or its connection ended, or an attempt failed).
    pub fn set_connected(&self, name: &str, up: bool) {
        let mut inner = self.lock();
        inner.tried.insert(name.to_owned());
        if up {
            inner.connected.insert(name.to_owned());
        } else {
            inner.connected.remove(name);
        }
    }

    /// The coordinators connected now, sorted; none until every uplink has connected or
    /// failed once (the first to connect would otherwise be every VM's pick).
    pub fn partition(&self) -> Vec<String> {
        let inner = self.lock();
        if !inner.expected.is_subset(&inner.tried) {
            return vec![];
        }
        inner.connected.iter().cloned().collect()
    }
}

/// Writes `list` to `path` durably (temp file, fsync, rename, fsync of the directory).
pub fn write(path: &Path, list: &[CoordinatorAddr]) -> std::io::Result<()> {
    let text = serde_json::to_vec_pretty(list).map_err(std::io::Error::other)?;
    bulwark_pki::files::write_atomic(path, &text, 0o644)
}

fn read(path: &Path) -> std::io::Result<Vec<CoordinatorAddr>> {
    use std::io::Read;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(e),
    };
    let mut bytes = vec![];
    file.take(MAX_FILE + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(std::io::Error::other("larger than 64 KiB"));
    }
    serde_json::from_slice(&bytes).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, addr: &str) -> CoordinatorAddr {
        CoordinatorAddr { name: name.into(), addr: addr.into() }
    }

    #[test]
    fn learned_coordinators_survive_a_restart_and_new_ones_get_an_uplink() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("coordinators.json");
        let peers = Peers::load(path.clone());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        peers.on_new(tx);
        peers.learn(&[c("a", "127.0.0.1:1"), c("b", "127.0.0.1:2"), c("bad name!", "x"), c("c", "")], "a");
        assert_eq!(rx.try_recv().unwrap().name, "a");
        assert_eq!(rx.try_recv().unwrap().name, "b");
        assert!(rx.try_recv().is_err(), "unacceptable entries are left out");
        peers.learn(&[c("a", "127.0.0.1:9"), c("b", "10.0.0.1:1")], "a");
        assert!(rx.try_recv().is_err(), "a known name only changes its address");
        assert_eq!(peers.known()[1], c("b", "127.0.0.1:2"), "only b itself moves b");
        let again = Peers::load(path.clone());
        assert_eq!(again.known(), vec![c("a", "127.0.0.1:9"), c("b", "127.0.0.1:2")]);
        std::fs::write(&path, b"not json").unwrap();
        assert!(Peers::load(path).known().is_empty(), "a damaged file is ignored");
    }

    #[test]
    fn the_partition_lists_the_connected_coordinators_once_each_was_tried() {
        let t = tempfile::tempdir().unwrap();
        let peers = Peers::load(t.path().join("c.json"));
        for name in ["a", "b", "c"] {
            peers.expect(name);
        }
        peers.set_connected("b", true);
        peers.set_connected("a", true);
        assert!(peers.partition().is_empty(), "c not tried yet: nobody picks");
        peers.set_connected("c", false);
        assert_eq!(peers.partition(), vec!["a".to_string(), "b".to_string()]);
        peers.set_connected("b", false);
        assert_eq!(peers.partition(), vec!["a".to_string()]);
        // A coordinator learned later is waited for again.
        peers.expect("d");
        assert!(peers.partition().is_empty());
    }
}
