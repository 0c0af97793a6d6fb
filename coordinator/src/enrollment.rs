//! Join tokens and enrollment as plain decisions: what a token may be made for, and what an
//! enrollment with it does. No catalog, no PKI, no clock: the authority reads the records,
//! asks these functions, and applies the answer (consume the token, sign, revoke).
//!
//! The rules (CONTRACT, `token create`):
//! - a token names a host (`--host`), a cluster (`--cluster`) or both; a host token alone makes
//!   a standalone host, whose cluster is its own name;
//! - no token takes over an enrolled, unrevoked host unless it was made with `--replace HOST`
//!   for exactly that host; then the host's old certificate is revoked when the new one is
//!   issued, and the host keeps its cluster unless the token names another;
//! - a token lives at most the coordinator's cap (`[tokens] max_ttl`, default 7 days), works
//!   once, and can be revoked while unused.

use crate::catalog::{TokenRecord, TokenRefusal};
use bulwark_protocol::{ClusterId, HostId};
use std::time::Duration;

/// The cap on a token's lifetime when `coordinator.toml` sets none.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(7 * 86_400);

/// Used, expired and revoked tokens stay listed this long, then the next `token create`
/// purges them.
pub const PURGE_AFTER_SECS: u64 = 86_400;

/// How many stored tokens one `token create` looks at for purging (bounded work per call).
pub const PURGE_SCAN_LIMIT: usize = 4096;

/// Bytes of the secret's hash that make a token's public id (shown as hex). The hash is not a
/// credential (the agent must present the secret itself), and a prefix of it reveals nothing
/// about the secret.
pub const ID_BYTES: usize = 8;

/// A token's public id: the first [`ID_BYTES`] of its secret's hash, in hex.
pub fn token_id(secret_hash: &[u8; 32]) -> String {
    secret_hash[..ID_BYTES].iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses a token id back into the key prefix it names.
pub fn parse_token_id(id: &str) -> Result<[u8; ID_BYTES], ScopeError> {
    let bad = || ScopeError::BadId(id.to_owned());
    if id.len() != ID_BYTES * 2 || !id.is_ascii() {
        return Err(bad());
    }
    let mut out = [0u8; ID_BYTES];
    for (i, byte) in out.iter_mut().enumerate() {
        let pair = id.get(i * 2..i * 2 + 2).ok_or_else(bad)?;
        *byte = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// What `token revoke` says.
pub fn revoked_message(id: &str, just_now: bool) -> String {
    if just_now {
        format!("join token {id} revoked")
    } else {
        format!("join token {id} was already revoked")
    }
}

/// What an operator asks a token for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenScope {
    pub host: Option<HostId>,
    pub cluster: Option<ClusterId>,
    /// The enrolled host this token may re-enroll.
    pub replace: Option<HostId>,
    /// A token for another coordinator of the deployment, by its name (alone).
    pub coordinator: Option<HostId>,
}

/// An enrolled host as the decisions need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrolledHost {
    pub cluster: String,
    /// Its certificate is not revoked.
    pub active: bool,
}

/// Why a token cannot be made (or revoked) as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error("a join token needs --host NAME, --cluster NAME or --coordinator NAME")]
    NoScope,
    #[error("--coordinator makes a token for a coordinator: it takes no --host, --cluster or --replace")]
    CoordinatorAndHost,
    #[error(
        "a join token may live at most {max} ([tokens] max_ttl in coordinator.toml); --ttl {asked} is longer",
        max = human(.cap),
        asked = human(.ttl)
    )]
    TtlOverCap { ttl: Duration, cap: Duration },
    #[error("--replace {replace} makes a token for {replace}, but --host names {host}")]
    ReplaceOtherHost { host: HostId, replace: HostId },
    #[error("host {host} is enrolled; make the token with --replace {host} to re-enroll it")]
    HostEnrolled { host: HostId },
    #[error("--replace {host}: no host {host} is enrolled")]
    NothingToReplace { host: HostId },
    #[error("{0:?} is not a token id ({digits} hexadecimal digits, as `token list` shows)", digits = ID_BYTES * 2)]
    BadId(String),
    #[error("no join token {0}")]
    UnknownId(String),
    #[error("join token {id} was already used by {by}; to undo that enrollment, revoke the host (`bulwark agent revoke {by}`)")]
    AlreadyUsed { id: String, by: String },
}

fn human(d: &Duration) -> String {
    humantime::format_duration(*d).to_string()
}

/// Checks a token request against the cap and the enrolled hosts (`enrolled` looks one up);
/// answers the host and cluster the token is bound to and the host it may replace.
pub fn check_scope(
    scope: &TokenScope,
    ttl: Duration,
    cap: Duration,
    mut enrolled: impl FnMut(&HostId) -> Option<EnrolledHost>,
) -> Result<TokenScope, ScopeError> {
    if scope.coordinator.is_some() {
        if scope.host.is_some() || scope.cluster.is_some() || scope.replace.is_some() {
            return Err(ScopeError::CoordinatorAndHost);
        }
        if ttl > cap {
            return Err(ScopeError::TtlOverCap { ttl, cap });
        }
        return Ok(scope.clone());
    }
    if scope.host.is_none() && scope.cluster.is_none() {
        return Err(ScopeError::NoScope);
    }
    if ttl > cap {
        return Err(ScopeError::TtlOverCap { ttl, cap });
    }
    // A replacing token is for exactly the host it replaces.
    let host = match (&scope.host, &scope.replace) {
        (Some(host), Some(replace)) if host != replace => {
            return Err(ScopeError::ReplaceOtherHost { host: host.clone(), replace: replace.clone() })
        }
        (host, replace) => host.clone().or_else(|| replace.clone()),
    };
    if let Some(replace) = &scope.replace {
        if enrolled(replace).is_none() {
            return Err(ScopeError::NothingToReplace { host: replace.clone() });
        }
    } else if let Some(host) = &host {
        if enrolled(host).is_some_and(|h| h.active) {
            return Err(ScopeError::HostEnrolled { host: host.clone() });
        }
    }
    Ok(TokenScope { host, cluster: scope.cluster.clone(), replace: scope.replace.clone(), coordinator: None })
}

/// What an accepted enrollment does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// The cluster the host is recorded in.
    pub cluster: String,
    /// The host's current certificate is revoked when the new one is issued.
    pub revoke_previous: bool,
}

/// Decides whether `token` lets host `asked` enroll now, given what is enrolled under that
/// name. A refusal changes nothing; an admission is applied only after the token is marked
/// used (atomically, so two agents racing with one token cannot both be admitted).
pub fn admit(
    token: &TokenRecord,
    asked: &HostId,
    existing: Option<&EnrolledHost>,
    now: u64,
) -> Result<Admission, TokenRefusal> {
    if token.revoked_at.is_some() {
        return Err(TokenRefusal::Revoked);
    }
    if let Some(by) = &token.used_by {
        return Err(TokenRefusal::Used { by: by.clone() });
    }
    if now >= token.expires_at {
        return Err(TokenRefusal::Expired);
    }
    if let Some(allowed) = &token.host {
        if allowed != asked.as_str() {
            return Err(TokenRefusal::WrongHost { allowed: allowed.clone(), asked: asked.to_string() });
        }
    }
    let replacing = token.replace.as_deref() == Some(asked.as_str());
    let active = existing.is_some_and(|e| e.active);
    if active && !replacing {
        return Err(TokenRefusal::HostEnrolled { host: asked.to_string() });
    }
    let kept = if replacing { existing.map(|e| e.cluster.clone()) } else { None };
    let cluster = token.cluster.clone().or(kept).unwrap_or_else(|| asked.to_string());
    Ok(Admission { cluster, revoke_previous: active })
}

/// Whether a stored token may be purged at `now`: used, revoked or expired for longer than
/// [`PURGE_AFTER_SECS`].
pub fn purgeable(token: &TokenRecord, now: u64) -> bool {
    // A token is finished at its first of: use, revocation, expiry (a live token's expiry is
    // still ahead, so it is never purged).
    let finished_at = [token.used_at, token.revoked_at, Some(token.expires_at)].into_iter().flatten().min();
    finished_at.and_then(|t| now.checked_sub(t)).is_some_and(|age| age >= PURGE_AFTER_SECS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(s: &str) -> HostId {
        HostId::new(s).unwrap()
    }

    fn cluster(s: &str) -> ClusterId {
        ClusterId::new(s).unwrap()
    }

    fn token(host: Option<&str>, cluster: Option<&str>, replace: Option<&str>) -> TokenRecord {
        TokenRecord {
            created_at: 0,
            expires_at: 100,
            host: host.map(str::to_owned),
            used_at: None,
            used_by: None,
            cluster: cluster.map(str::to_owned),
            replace: replace.map(str::to_owned),
            revoked_at: None,
        }
    }

    fn enrolled(cluster: &str, active: bool) -> EnrolledHost {
        EnrolledHost { cluster: cluster.into(), active }
    }

    const HOUR: Duration = Duration::from_secs(3600);

    fn nothing(_: &HostId) -> Option<EnrolledHost> {
        None
    }

    #[test]
    fn a_token_needs_a_host_or_a_cluster() {
        assert_eq!(check_scope(&TokenScope::default(), HOUR, DEFAULT_MAX_TTL, nothing), Err(ScopeError::NoScope));
        let by_cluster = TokenScope { cluster: Some(cluster("c1")), ..Default::default() };
        assert_eq!(check_scope(&by_cluster, HOUR, DEFAULT_MAX_TTL, nothing), Ok(by_cluster));
    }

    #[test]
    fn a_ttl_over_the_cap_is_refused_naming_the_cap() {
        let scope = TokenScope { host: Some(host("n1")), ..Default::default() };
        let err = check_scope(&scope, DEFAULT_MAX_TTL + Duration::from_secs(1), DEFAULT_MAX_TTL, nothing).unwrap_err();
        assert!(err.to_string().contains("at most 7days"), "{err}");
        assert!(check_scope(&scope, DEFAULT_MAX_TTL, DEFAULT_MAX_TTL, nothing).is_ok());
    }

    #[test]
    fn a_host_token_for_an_enrolled_host_needs_replace() {
        let scope = TokenScope { host: Some(host("n1")), ..Default::default() };
        let err = check_scope(&scope, HOUR, DEFAULT_MAX_TTL, |_| Some(enrolled("c", true))).unwrap_err();
        assert_eq!(err.to_string(), "host n1 is enrolled; make the token with --replace n1 to re-enroll it");
        // A revoked host may be enrolled again with a plain host token.
        assert!(check_scope(&scope, HOUR, DEFAULT_MAX_TTL, |_| Some(enrolled("c", false))).is_ok());
    }

    #[test]
    fn replace_binds_the_token_to_the_replaced_host() {
        let scope = TokenScope { cluster: Some(cluster("c1")), replace: Some(host("n1")), ..Default::default() };
        let checked = check_scope(&scope, HOUR, DEFAULT_MAX_TTL, |_| Some(enrolled("c", true))).unwrap();
        assert_eq!(checked.host, Some(host("n1")));
        let other = TokenScope { host: Some(host("n2")), replace: Some(host("n1")), ..Default::default() };
        assert!(matches!(
            check_scope(&other, HOUR, DEFAULT_MAX_TTL, |_| Some(enrolled("c", true))),
            Err(ScopeError::ReplaceOtherHost { .. })
        ));
        let unknown = TokenScope { host: Some(host("n9")), replace: Some(host("n9")), ..Default::default() };
        assert!(matches!(
            check_scope(&unknown, HOUR, DEFAULT_MAX_TTL, nothing),
            Err(ScopeError::NothingToReplace { .. })
        ));
    }

    #[test]
    fn a_host_token_alone_makes_a_standalone_host() {
        let a = admit(&token(Some("n1"), None, None), &host("n1"), None, 1).unwrap();
        assert_eq!(a, Admission { cluster: "n1".into(), revoke_previous: false });
    }

    #[test]
    fn a_cluster_token_enrolls_a_new_host_into_its_cluster() {
        let a = admit(&token(None, Some("c1"), None), &host("n7"), None, 1).unwrap();
        assert_eq!(a, Admission { cluster: "c1".into(), revoke_previous: false });
        // Both: that host in that cluster.
        let a = admit(&token(Some("n7"), Some("c1"), None), &host("n7"), None, 1).unwrap();
        assert_eq!(a.cluster, "c1");
    }

    #[test]
    fn a_cluster_token_never_takes_an_enrolled_host_name() {
        let existing = enrolled("c1", true);
        let refused = admit(&token(None, Some("c1"), None), &host("n1"), Some(&existing), 1);
        assert_eq!(refused, Err(TokenRefusal::HostEnrolled { host: "n1".into() }));
        // A replace token for another host does not open the door either.
        let refused = admit(&token(None, Some("c1"), Some("n2")), &host("n1"), Some(&existing), 1);
        assert_eq!(refused, Err(TokenRefusal::HostEnrolled { host: "n1".into() }));
        // A host token made before the host enrolled is refused too.
        let refused = admit(&token(Some("n1"), None, None), &host("n1"), Some(&existing), 1);
        assert_eq!(refused, Err(TokenRefusal::HostEnrolled { host: "n1".into() }));
        // A revoked host's name is free.
        let a = admit(&token(None, Some("c2"), None), &host("n1"), Some(&enrolled("c1", false)), 1).unwrap();
        assert_eq!(a, Admission { cluster: "c2".into(), revoke_previous: false });
    }

    #[test]
    fn replace_revokes_the_previous_certificate_and_keeps_the_cluster() {
        let existing = enrolled("c1", true);
        let a = admit(&token(Some("n1"), None, Some("n1")), &host("n1"), Some(&existing), 1).unwrap();
        assert_eq!(a, Admission { cluster: "c1".into(), revoke_previous: true });
        let a = admit(&token(Some("n1"), Some("c2"), Some("n1")), &host("n1"), Some(&existing), 1).unwrap();
        assert_eq!(a, Admission { cluster: "c2".into(), revoke_previous: true });
    }

    #[test]
    fn used_expired_revoked_and_wrong_host_tokens_are_refused() {
        let mut t = token(Some("n1"), None, None);
        assert!(matches!(admit(&t, &host("n2"), None, 1), Err(TokenRefusal::WrongHost { .. })));
        assert_eq!(admit(&t, &host("n1"), None, 100), Err(TokenRefusal::Expired));
        t.used_by = Some("n1".into());
        assert_eq!(admit(&t, &host("n1"), None, 1), Err(TokenRefusal::Used { by: "n1".into() }));
        let mut t = token(None, Some("c"), None);
        t.revoked_at = Some(1);
        assert_eq!(admit(&t, &host("n1"), None, 1), Err(TokenRefusal::Revoked));
    }

    #[test]
    fn ids_round_trip_and_reject_anything_else() {
        let mut hash = [0u8; 32];
        hash[0] = 0xab;
        hash[7] = 0x01;
        let id = token_id(&hash);
        assert_eq!(id, "ab00000000000001");
        assert_eq!(parse_token_id(&id).unwrap(), hash[..ID_BYTES]);
        for bad in ["", "ab", "zz00000000000001", "ab000000000000011", "é000000000000001"] {
            assert!(parse_token_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn finished_tokens_are_purged_a_day_later_and_live_ones_never() {
        let day = PURGE_AFTER_SECS;
        let live = TokenRecord { expires_at: 10 * day, ..token(None, Some("c"), None) };
        assert!(!purgeable(&live, 5 * day));
        let mut used = live.clone();
        used.used_at = Some(day);
        assert!(!purgeable(&used, day + 10));
        assert!(purgeable(&used, 2 * day));
        let expired = TokenRecord { expires_at: day, ..live.clone() };
        assert!(!purgeable(&expired, day + 10));
        assert!(purgeable(&expired, 2 * day));
        let mut revoked = live;
        revoked.revoked_at = Some(day);
        assert!(purgeable(&revoked, 2 * day));
    }
}
