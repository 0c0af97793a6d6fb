//! Typed identifiers. A host name is also a certificate identity, so it is validated the same
//! way everywhere: 1–253 characters of `[A-Za-z0-9._-]`, not starting with `.` or `-`.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} is empty")]
    Empty { kind: &'static str },
    #[error("{kind} {value:?} is longer than {max} characters")]
    TooLong { kind: &'static str, value: String, max: usize },
    #[error("{kind} {value:?} may contain only letters, digits, '.', '_' and '-', and may not start with '.' or '-'")]
    BadCharacters { kind: &'static str, value: String },
    #[error("{kind} {value:?} is not {expected}")]
    BadFormat { kind: &'static str, value: String, expected: &'static str },
}

fn validate_name(kind: &'static str, value: &str, max: usize) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if value.len() > max {
        return Err(IdError::TooLong { kind, value: value.to_owned(), max });
    }
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if !value.chars().all(ok_char) || value.starts_with('.') || value.starts_with('-') {
        return Err(IdError::BadCharacters { kind, value: value.to_owned() });
    }
    Ok(())
}

macro_rules! name_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $max:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps a name.
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                validate_name($kind, &value, $max)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, IdError> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }
    };
}

name_id!(
    /// A hypervisor host (cluster node); equal to the common name of its agent certificate.
    HostId, "host name", 253
);
name_id!(
    /// A virtual machine, by its stable id (the sim and QEMU backends use the VM's name).
    VmId, "VM id", 128
);
name_id!(
    /// A disk of a VM, by its name within the VM (`os`, `data`, …).
    DiskId, "disk name", 64
);
name_id!(
    /// A cluster of hosts (VMs move between its hosts). Follows the rules of group names
    /// (the same characters, at most 128). A standalone host is a cluster of its own, named
    /// after the host.
    ClusterId, "cluster name", 128
);

/// A job, numbered by the coordinator that owns it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug)]
pub struct JobId(pub u64);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A recovery point: 16 random bytes, shown as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RecoveryPointId(pub [u8; 16]);

impl RecoveryPointId {
    /// Parses the 32-hex-digit form.
    pub fn parse_hex(s: &str) -> Result<Self, IdError> {
        let bad =
            || IdError::BadFormat { kind: "recovery point id", value: s.to_owned(), expected: "32 hexadecimal digits" };
        if s.len() != 32 {
            return Err(bad());
        }
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            let pair = s.get(2 * i..2 * i + 2).ok_or_else(bad)?;
            *byte = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
        }
        Ok(Self(out))
    }
}

impl fmt::Display for RecoveryPointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for RecoveryPointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RecoveryPointId({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_accept_dns_like_names_and_refuse_the_rest() {
        assert!(HostId::new("node-1.cluster.local").is_ok());
        assert!(HostId::new("").is_err());
        assert!(HostId::new("-x").is_err());
        assert!(HostId::new("../etc").is_err());
        assert!(HostId::new("a b").is_err());
        assert!(HostId::new("x".repeat(254)).is_err());
    }

    #[test]
    fn host_id_deserialization_validates() {
        let cfg = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec("bad/host", cfg).unwrap();
        let decoded: Result<(HostId, usize), _> = bincode::serde::decode_from_slice(&bytes, cfg);
        assert!(decoded.is_err());
    }

    #[test]
    fn recovery_point_id_round_trips_through_hex() {
        let id = RecoveryPointId([0xab; 16]);
        assert_eq!(RecoveryPointId::parse_hex(&id.to_string()), Ok(id));
        assert!(RecoveryPointId::parse_hex("zz").is_err());
        assert!(RecoveryPointId::parse_hex(&"é".repeat(16)).is_err());
    }
}
