//! The one codec: bincode 2 through serde, fixed-int-free standard config, and a hard limit on
//! every decode so a hostile length field inside a message cannot make us allocate. Keeping
//! bincode behind these two functions is what lets us swap it (upstream is unmaintained).

use serde::{de::DeserializeOwned, Serialize};

/// The largest control message (and control frame) anyone may send: 1 MiB.
pub const CONTROL_LIMIT: usize = 1 << 20;

/// Why a message could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("message does not encode: {0}")]
    Encode(String),
    #[error("message is {len} bytes, over the {limit}-byte limit")]
    TooLarge { len: usize, limit: usize },
    #[error("malformed message: {0}")]
    Decode(String),
    #[error("malformed message: {trailing} trailing bytes after the message")]
    Trailing { trailing: usize },
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<CONTROL_LIMIT>()
}

/// Encodes a control message; refuses one larger than [`CONTROL_LIMIT`].
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    let bytes = bincode::serde::encode_to_vec(msg, config()).map_err(|e| CodecError::Encode(e.to_string()))?;
    if bytes.len() > CONTROL_LIMIT {
        return Err(CodecError::TooLarge { len: bytes.len(), limit: CONTROL_LIMIT });
    }
    Ok(bytes)
}

/// Decodes exactly one control message from `bytes`, which must hold nothing else.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    if bytes.len() > CONTROL_LIMIT {
        return Err(CodecError::TooLarge { len: bytes.len(), limit: CONTROL_LIMIT });
    }
    let (msg, used) =
        bincode::serde::decode_from_slice(bytes, config()).map_err(|e| CodecError::Decode(e.to_string()))?;
    if used != bytes.len() {
        return Err(CodecError::Trailing { trailing: bytes.len() - used });
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::HostId;
    use crate::messages::{AgentMessage, Hello};

    fn hello() -> AgentMessage {
        AgentMessage::Hello(Hello {
            min_version: 1,
            max_version: 1,
            host: HostId::new("node1").unwrap(),
            agent_version: "0.1.0".into(),
        })
    }

    #[test]
    fn messages_round_trip() {
        let bytes = encode(&hello()).unwrap();
        assert_eq!(decode::<AgentMessage>(&bytes).ok(), Some(hello()));
    }

    #[test]
    fn a_length_field_announcing_gigabytes_is_refused_without_allocating() {
        // Variant 0 (Hello), then u16 varints, then a string length of u64::MAX (0xFF marker + 8 bytes).
        let mut bytes = vec![0u8, 1, 1, 0xFF];
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(decode::<AgentMessage>(&bytes), Err(CodecError::Decode(_))));
    }

    #[test]
    fn trailing_garbage_is_refused() {
        let mut bytes = encode(&hello()).unwrap();
        bytes.push(7);
        assert!(matches!(decode::<AgentMessage>(&bytes), Err(CodecError::Trailing { trailing: 1 })));
    }
}
