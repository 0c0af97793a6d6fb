//! The version handshake and the coordinator's checks of an agent's hello, as plain functions.
//! The identity that counts is the certificate's; a hello that names another host is refused.

use crate::ids::HostId;
use crate::messages::{Hello, Welcome};
use crate::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// Why the coordinator refuses an agent's hello.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeRefusal {
    #[error("incompatible protocol versions: this side speaks {ours_min}..={ours_max}, the peer speaks {theirs_min}..={theirs_max}")]
    Version { ours_min: u16, ours_max: u16, theirs_min: u16, theirs_max: u16 },
    #[error("hello names host {claimed:?} but the certificate is for {certified:?}")]
    HostMismatch { claimed: String, certified: String },
}

/// The highest version both ranges share.
pub fn negotiate(ours: (u16, u16), theirs: (u16, u16)) -> Result<u16, HandshakeRefusal> {
    let low = ours.0.max(theirs.0);
    let high = ours.1.min(theirs.1);
    if theirs.0 > theirs.1 || low > high {
        return Err(HandshakeRefusal::Version {
            ours_min: ours.0,
            ours_max: ours.1,
            theirs_min: theirs.0,
            theirs_max: theirs.1,
        });
    }
    Ok(high)
}

/// The coordinator's decision on a hello from a connection whose certificate names `certified`.
pub fn accept_hello(
    hello: &Hello,
    certified: &HostId,
    coordinator: &str,
    heartbeat_secs: u32,
) -> Result<Welcome, HandshakeRefusal> {
    let version = negotiate((MIN_PROTOCOL_VERSION, PROTOCOL_VERSION), (hello.min_version, hello.max_version))?;
    if &hello.host != certified {
        return Err(HandshakeRefusal::HostMismatch {
            claimed: hello.host.to_string(),
            certified: certified.to_string(),
        });
    }
    Ok(Welcome { version, coordinator: coordinator.to_owned(), heartbeat_secs, coordinators: vec![] })
}

/// Checks a version a single-shot peer (console, enrolling agent) says it speaks.
pub fn check_version(theirs: u16) -> Result<u16, HandshakeRefusal> {
    negotiate((MIN_PROTOCOL_VERSION, PROTOCOL_VERSION), (theirs, theirs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(s: &str) -> HostId {
        HostId::new(s).unwrap()
    }

    fn hello(min: u16, max: u16, h: &str) -> Hello {
        Hello { min_version: min, max_version: max, host: host(h), agent_version: "t".into() }
    }

    #[test]
    fn negotiation_picks_the_highest_common_version() {
        assert_eq!(negotiate((1, 3), (2, 5)), Ok(3));
        assert_eq!(negotiate((1, 1), (1, 1)), Ok(1));
    }

    #[test]
    fn an_incompatible_version_names_both_ranges() {
        let (min, max) = (PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 3);
        let err = accept_hello(&hello(min, max, "n1"), &host("n1"), "c", 5).unwrap_err();
        let text = err.to_string();
        let ours = format!("{MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}");
        assert!(text.contains(&ours) && text.contains(&format!("{min}..={max}")), "{text}");
    }

    #[test]
    fn an_inverted_range_is_refused() {
        assert!(negotiate((1, 3), (3, 1)).is_err());
    }

    #[test]
    fn a_hello_for_another_host_is_refused() {
        let err =
            accept_hello(&hello(PROTOCOL_VERSION, PROTOCOL_VERSION, "node2"), &host("node1"), "c", 5).unwrap_err();
        assert_eq!(err, HandshakeRefusal::HostMismatch { claimed: "node2".into(), certified: "node1".into() });
    }

    #[test]
    fn a_matching_hello_is_welcomed() {
        let w = accept_hello(&hello(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION + 3, "node1"), &host("node1"), "coord", 5)
            .unwrap();
        assert_eq!(w.version, PROTOCOL_VERSION, "the highest version both speak");
        assert_eq!(w.coordinator, "coord");
    }
}
